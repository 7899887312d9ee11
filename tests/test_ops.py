"""Operations against the real daemon: systemd, config, TLS, shutdown, health, metrics,
logs and the push API; origin checks on a real site in process."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
from inproc import Site, connect, turn
from rawhttp import handshake, status_of
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from v1client import V1
from wsclient import TEXT, Client, Closed, frame

import chatd
from chatd.config import Settings
from chatd.hub import InMemoryHub
from chatd.web import make_site
from tools.daemon import REPO, Daemon, child_env, twistd

TOKEN = "s3cret-token-for-tests-0123456789"


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers=None,
    context: ssl.SSLContext | None = None,
):
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- systemd ------------------------------------------------------------------


def test_systemd_units_verify(tmp_path) -> None:
    """systemd-analyze verify passes on both units (ExecStart pointed at this venv)."""
    unit = (REPO / "etc" / "chatd.service").read_text()
    assert "/opt/chatd/bin/twistd --nodaemon --pidfile= chatd" in unit
    (tmp_path / "chatd.service").write_text(unit.replace("/opt/chatd/bin/twistd", twistd()))
    shutil.copy(REPO / "etc" / "chatd.socket", tmp_path / "chatd.socket")
    r = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "chatd.socket"),
            str(tmp_path / "chatd.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "chatd" not in r.stdout + r.stderr, r.stdout + r.stderr  # not a single warning


def test_socket_activation_for_real(tmp_path) -> None:
    port = free_port()
    argv = [
        "systemd-socket-activate",
        "--fdname=chatd.socket",
        "-E",
        "PYTHONPATH",
        "-E",
        "PYTHONUNBUFFERED",
        "-l",
        f"127.0.0.1:{port}",
        twistd(),
        "-n",
        "--pidfile=",
        "chatd",
        "--endpoint",
        "systemd:domain=INET:index=0",
    ]
    proc = subprocess.Popen(
        argv,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,  # where its database goes
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "Listening on" in first, first
        # systemd holds the socket: this connection waits while chatd starts on it.
        c = V1(port, "activated", timeout=20)
        c.join("sd")
        c.say("sd", "via systemd")
        assert c.next("message")["text"] == "via systemd"
        c.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "web listening on 127.0.0.1:" in out


# -- config file ----------------------------------------------------------------


def test_example_config_has_every_setting_and_parses(tmp_path) -> None:
    from chatd.config import COERCE, from_mapping, load_file

    text = (REPO / "etc" / "chatd.toml").read_text()
    for key in COERCE:
        assert f"# {key} =" in text, f"{key} is not in etc/chatd.toml"
    # Uncomment every "# key = value" line: the result must be a valid file.
    lines = [
        ln[2:] if ln.startswith("# ") and " = " in ln.split("#")[1] else ln
        for ln in text.splitlines()
    ]
    seen: set[str] = set()
    kept = []
    for ln in lines:  # keep the first of each key (the file shows alternatives)
        key = ln.split("=")[0].strip() if "=" in ln and not ln.startswith("#") else None
        if key in seen:
            continue
        if key:
            seen.add(key)
        kept.append(ln)
    path = tmp_path / "all.toml"
    path.write_text("\n".join(kept))
    values = load_file(str(path))
    assert set(values) == set(COERCE)
    settings = from_mapping(values, "test: ")
    assert settings.max_backlog == 4 * 1024 * 1024 and settings.compression is True


def test_config_file_and_command_line_override(tmp_path) -> None:
    """On the site the options make (in process): the file and the command line, merged."""
    cfg = tmp_path / "chatd.toml"
    cfg.write_text('[chatd]\nport = 0\nmax_text = "10"\nrelay_max_size = "1K"\n')
    d = Site("--config", str(cfg), "--max-text", "20")
    c = d.v1("cfg")
    c.join("c")
    c.say("c", "x" * 20)  # 20 allowed: the command line wins over the file's 10
    assert c.next("message")["text"] == "x" * 20
    c.say("c", "x" * 21)
    assert c.next("error")["code"] == "too_long"
    r = d.client("/relay/r")
    r.send(b"z" * 1025)  # the file's relay_max_size
    assert r.expect_close() == 1009


# -- TLS ------------------------------------------------------------------------


def make_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_page_over_https_and_wss(daemon, tmp_path) -> None:
    key, cert = make_cert(tmp_path)
    port = free_port()
    d = daemon("--endpoint", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    assert d.port == port
    ctx = ssl.create_default_context(cafile=str(cert))
    status, _headers, body = request(port, "GET", "/", context=ctx)
    assert status == 200 and b'src="chat.js"' in body
    # wss: the same client, over a verified TLS socket
    raw = socket.create_connection(("127.0.0.1", port))
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    c = Client(port, "/relay/secure", sock=tls)
    c.send(b"\x00secret")
    assert c.recv() == b"\x00secret"
    c.close()


# -- graceful shutdown ----------------------------------------------------------


def test_sigterm_closes_1001_keeps_everything_and_exits_0(tmp_path) -> None:
    d = Daemon(
        "--shutdown-timeout",
        "3",
        "--metrics-endpoint",
        "tcp:0:interface=127.0.0.1",
        cwd=str(tmp_path),
    )
    ops_port = d.port_of("metrics", timeout=30)
    listener = V1(d.port, "listener")
    listener.join("bye")
    sender = V1(d.port, "sender")
    sender.join("bye")
    listener.next("presence")
    plain = Client(d.port, "/")
    stubborn = Client(d.port, "/relay/x")  # will not answer the close handshake
    # Messages accepted just before the signal must be stored and delivered. The
    # twenty go in one write (one read for the server, one batch): once the first is
    # through, the rest were accepted with it.
    sends = [{"type": "send", "room": "bye", "text": f"last words {i}"} for i in range(20)]
    sender.sock.sendall(b"".join(frame(TEXT, json.dumps(o).encode()) for o in sends))
    listener_first = listener.next("message")["text"]
    assert listener_first == "last words 0"
    started = time.monotonic()
    os.kill(d.pid, signal.SIGTERM)
    got: list[str] = []
    while True:
        try:
            m = listener.next()
        except Closed as e:
            assert e.code == 1001, e
            break
        if m["type"] == "message":
            got.append(m["text"])
    assert [listener_first, *got] == [f"last words {i}" for i in range(20)]
    assert plain.expect_close() == 1001
    # While the stubborn client holds the drain open, health says "stopping".
    status, _, body = request(ops_port, "GET", "/healthz")
    assert status == 503 and json.loads(body)["status"] == "stopping"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()  # not accepting
    assert d.proc.wait(30) == 0
    assert time.monotonic() - started < 3 + 12  # the 3 s drain deadline, plus slack for load
    stubborn.sock.close()
    d2 = Daemon(cwd=str(tmp_path))
    try:
        again = V1(d2.port, "later")
        j = again.join("bye", since=0)
        assert [m["text"] for m in j["history"]] == [f"last words {i}" for i in range(20)]
        again.close()
    finally:
        d2.stop()


# -- health, metrics, logs ------------------------------------------------------


def metrics_until(port: int, lines: list[str], timeout: float = 30.0) -> tuple[int, dict, str]:
    """GET /metrics until every one of ``lines`` is in it (bounded); the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = request(port, "GET", "/metrics")
        text = body.decode()
        if all(line in text for line in lines) or time.monotonic() > deadline:
            return status, headers, text
        time.sleep(0.05)


def test_healthz_and_metrics(daemon) -> None:
    d = daemon("--max-backlog", "64K")
    status, headers, body = request(d.port, "GET", "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["version"] == chatd.__version__
    v = V1(d.port, "metered")
    v.join("m")
    v.say("m", "count me")
    v.next("message")
    p = Client(d.port, "/")
    r = Client(d.port, "/relay/metrics")
    r.send(b"1234")
    r.recv()
    bad = Client(d.port, "/")
    bad.send(b"\x00")
    assert bad.expect_close() == 1003
    bad.sock.close()
    expected = [
        'chatd_connections{kind="v1"} 1.0',
        'chatd_connections{kind="plain"} 1.0',
        'chatd_connections{kind="relay"} 1.0',
        'chatd_rooms{kind="relay"} 1.0',
        'chatd_rooms{kind="chat"} 2.0',
        'chatd_closes_total{code="1003"} 1.0',
        'chatd_received_bytes_total{kind="relay"} 4.0',
        'chatd_messages_sent_total{room_kind="relay"} 1.0',
        "chatd_up 1.0",
        "chatd_history_commit_seconds_count 1.0",
        'chatd_messages_received_total{kind="v1"} 3.0',  # hello, join, send
    ]
    # The close is counted when the daemon sees the TCP connection go: poll for it.
    status, headers, text = metrics_until(d.port, expected)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in expected:
        assert line in text, (line, text)
    for c in (v, p, r):
        c.close()


def test_metrics_on_a_separate_endpoint_only(daemon) -> None:
    d = daemon("--metrics-endpoint", "tcp:0:interface=127.0.0.1")
    ops = d.port_of("metrics", timeout=30)
    assert request(ops, "GET", "/metrics")[0] == 200
    assert request(ops, "GET", "/healthz")[0] == 200
    assert request(d.port, "GET", "/metrics")[0] == 404
    assert request(d.port, "GET", "/healthz")[0] == 404


def test_json_logs_one_line_per_connection_and_no_message_text(daemon) -> None:
    d = daemon("--log-format", "json")
    v = V1(d.port, "logged")
    v.join("l")
    v.say("l", "TOP-SECRET-TEXT")
    v.next("message")
    r = Client(d.port, "/relay/l")
    r.send("RELAY-SECRET")
    r.recv()
    v.close()
    r.close()
    d.wait_for_log(r'"kind": "relay".*"code": 1000|"code": 1000.*"kind": "relay"', timeout=30)
    records = [json.loads(line) for line in d.lines if line.startswith("{")]
    assert records and all({"time", "level", "namespace", "msg"} <= set(x) for x in records)
    opens = [x for x in records if x["msg"].startswith("open ")]
    closes = [x for x in records if x["msg"].startswith("close ")]
    assert {x["kind"] for x in opens} == {"v1", "relay"}
    for x in closes:
        assert x["code"] == 1000 and x["duration"] >= 0 and x["peer"].startswith("tcp4:127.0.0.1")
    assert "SECRET" not in d.log()


# -- origin checks --------------------------------------------------------------


def origin_status(allowed: tuple[str, ...], path: str, origin: str | None) -> int:
    """The status a real site (in process) answers a handshake from ``origin`` with."""
    site = make_site(Settings(ping_interval=0, allowed_origins=allowed), InMemoryHub())
    t = connect(site)
    try:
        t.protocol.dataReceived(handshake(path, *([f"Origin: {origin}"] if origin else [])))
        return status_of(t.value())
    finally:
        t.protocol.connectionLost(Failure(ConnectionDone()))


def test_origin_checks() -> None:
    """In process: the daemon's own origin checks on the real wire are in tests/test_door.py."""
    own = "http://127.0.0.1:9000"  # handshake()'s Host
    assert origin_status((), "/", own) == 101
    assert origin_status((), "/", None) == 101  # no Origin: not a browser, let in
    for path in ("/", "/relay/r"):
        assert origin_status((), path, "https://evil.example") == 403
    assert origin_status((), "/", "http://127.0.0.1:9001") == 403
    listed = ("https://app.example", "http://other.example:8080")
    assert origin_status(listed, "/", "https://app.example") == 101
    assert origin_status(listed, "/", "http://other.example:8080") == 101
    assert origin_status(listed, "/", "https://evil.example") == 403
    assert origin_status(listed, "/", own) == 403  # a list replaces the own-host default
    assert origin_status(("*",), "/", "https://evil.example") == 101


# -- push API -------------------------------------------------------------------


def api(d: Daemon | Site, method: str, path: str, body=None, token=TOKEN, ctype="application/json"):
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if ctype is not None:
        headers["Content-Type"] = ctype
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if isinstance(d, Site):
        status, _h, data = d.request(method, path, body, headers)
    else:
        status, _h, data = request(d.port, method, path, body, headers)
    return status, json.loads(data) if data else None


def test_api_off_without_token() -> None:
    """On the site the options make (in process)."""
    d = Site()
    assert api(d, "GET", "/api/rooms")[0] == 404


def test_push_api_chat_relay_and_rooms() -> None:
    """On the site the options make (in process)."""
    d = Site("--api-token", TOKEN, "--relay-max-size", "1K", "--max-text", "100")
    v = d.v1("reader")
    v.join("lobby")
    p = d.client("/")
    v.next("presence")
    status, body = api(
        d, "POST", "/api/rooms/lobby/messages", {"text": "deploy finished", "from": "ci"}
    )
    assert status == 201 and body["room"] == "lobby" and body["id"] >= 1
    m = v.next("message")
    assert m["from"] == "ci" and m["text"] == "deploy finished" and m["id"] == body["id"]
    assert p.recv() == "ci: deploy finished"
    status, body = api(d, "POST", "/api/rooms/lobby/messages", {"text": "no sender"})
    assert status == 201 and v.next("message")["from"] == "api"
    # relay: text/* as a text frame, anything else binary, byte-exact
    r = d.client("/relay/ticks")
    assert api(d, "POST", "/api/relay/ticks/messages", b"AAPL 1.0", ctype="text/plain") == (
        200,
        {"room": "ticks", "delivered": 1},
    )
    assert r.recv() == "AAPL 1.0"
    blob = bytes(range(256))
    assert (
        api(d, "POST", "/api/relay/ticks/messages", blob, ctype="application/octet-stream")[1][
            "delivered"
        ]
        == 1
    )
    assert r.recv() == blob
    status, body = api(d, "GET", "/api/rooms", ctype=None)
    assert status == 200
    assert {"kind": "relay", "name": "ticks", "members": 1} in body["rooms"]
    assert {"kind": "chat", "name": "lobby", "members": 2} in body["rooms"]
    # the answers to bad requests
    assert api(d, "GET", "/api/rooms", token=None)[0] == 401
    assert api(d, "GET", "/api/rooms", token="wrong-token-wrong-token")[0] == 403
    assert api(d, "GET", "/api/nowhere")[0] == 404
    assert api(d, "GET", "/api/rooms/lobby/messages")[0] == 405
    assert api(d, "POST", "/api/rooms/lobby/messages", b"text", ctype="text/plain")[0] == 415
    assert api(d, "POST", "/api/rooms/lobby/messages", b"{bad json")[0] == 400
    assert api(d, "POST", "/api/rooms/lobby/messages", {"text": ""})[0] == 400
    assert api(d, "POST", "/api/rooms/lobby/messages", {"text": "x", "from": "ID12"})[0] == 400
    assert api(d, "POST", "/api/rooms/bad%20room/messages", {"text": "x"})[0] == 400
    assert api(d, "POST", "/api/rooms/lobby/messages", {"text": "x" * 101})[0] == 413
    assert api(d, "POST", "/api/relay/ticks/messages", b"x" * 1025, ctype="text/plain")[0] == 413
    assert api(d, "POST", "/api/relay/ticks/messages", b"\xff", ctype="text/plain")[0] == 400
    for c in (v, p, r):
        c.close()


def test_api_token_from_environment(monkeypatch) -> None:
    """On the site the options make with CHATD_API_TOKEN set (in process)."""
    monkeypatch.setenv("CHATD_API_TOKEN", TOKEN)
    site = Site().site
    for token, status in ((TOKEN, 200), ("wrong-token-wrong-token", 403)):
        t = connect(site)
        get = f"GET /api/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        t.protocol.dataReceived(get.encode())
        assert turn(lambda t=t: b"\r\n\r\n" in t.value())
        assert status_of(t.value()) == status
        t.protocol.connectionLost(Failure(ConnectionDone()))


def test_client_close_codes_do_not_grow_the_metric_labels() -> None:
    """Clients choose among 2000 application codes; the metric counts them as 3xxx / 4xxx.

    (In process: each close is counted by the time the client has closed.)"""
    d = Site()
    codes = (3000, 3999, 4000, 4321, 4999, 1000)
    for code in codes:
        d.client("/relay/codes").close(code)
    expected = [
        'chatd_closes_total{code="3xxx"} 2.0',
        'chatd_closes_total{code="4xxx"} 3.0',
        'chatd_closes_total{code="1000"} 1.0',
    ]
    status, _, metrics = d.request("GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    for line in expected:
        assert line in text, (line, text)
    for code in codes[:-1]:
        assert f'code="{code}"' not in text
