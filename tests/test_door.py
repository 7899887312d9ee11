"""What a client can hold before its request is in (chatd.web: Gate, FrontDoor, ChatdChannel).

Request-head deadline (not reset by trickled bytes), header caps, bodies
refused on their head, the pending and per-address caps, the origin's
scheme, NUL bytes in paths, and a slowloris run against the real daemon.
The deadline's bookkeeping is tested in process on a Clock; the rest on
the wire, where the socket is the point.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from inproc import Site, connect, turn
from rawhttp import exchange, handshake, status_of
from test_ops import TOKEN, make_cert
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from v1client import V1
from wsclient import Client

from chatd.config import Settings
from chatd.stats import Stats
from chatd.web import ChatdSite, Gate
from tools.daemon import Daemon

GiB = 1024**3


# -- in process: the deadline and the counts ---------------------------------------


def site_on(clock: Clock, **settings) -> ChatdSite:
    site = ChatdSite(Resource(), timeout=10, reactor=clock)
    site.gate = Gate(Settings(**settings), Stats(), clock)
    return site


def test_trickled_head_is_cut_at_the_deadline_not_reset_per_byte() -> None:
    clock = Clock()
    site = site_on(clock, handshake_timeout=10)
    t = connect(site)
    stats = site.gate.stats
    assert stats.pending == 1
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":  # 26 bytes, one a second: 26 s
        if t.disconnecting:
            break
        t.protocol.dataReceived(bytes([byte]))
        clock.advance(1)
    assert t.disconnecting and t.disconnected  # aborted, not waited on
    assert clock.seconds() == 10
    assert stats.head_timeouts == 1 and stats.pending == 0
    t.protocol.connectionLost(None)
    assert stats.pending == 0  # not counted twice


def test_silent_connection_is_dropped_and_counts_stay_exact() -> None:
    clock = Clock()
    site = site_on(clock, handshake_timeout=3, max_connections_per_ip=2)
    silent = connect(site)
    clock.advance(2.9)
    assert not silent.disconnecting
    clock.advance(0.2)
    assert silent.disconnected
    silent.protocol.connectionLost(None)
    # a complete request disarms the deadline; the answer re-arms it for the next head
    t = connect(site)
    t.protocol.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 404 ")
    assert site.gate.stats.pending == 1  # waiting for the next request on the connection
    clock.advance(3.1)
    assert t.disconnecting
    t.protocol.connectionLost(None)
    assert site.gate.stats.pending == 0 and not site.gate.per_ip


@pytest.mark.parametrize(
    ("key", "value"),
    [("handshake_timeout", 0), ("max_pending", 0), ("max_connections_per_ip", -1)],
)
def test_door_settings_are_checked(key: str, value: float) -> None:
    from chatd.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match=key):
        from_mapping({key: value}, "").check()
    ok = from_mapping({"handshake_timeout": "2.5", "max_pending": 10}, "")
    ok.check()
    assert (ok.handshake_timeout, ok.max_pending, ok.max_connections_per_ip) == (2.5, 10, 0)


def test_one_431_then_a_lingering_close() -> None:
    clock = Clock()
    site = site_on(clock)
    t = connect(site)
    t.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n")
    t.protocol.dataReceived(b"X-More: still sending\r\n" * 10)
    assert t.value().count(b" 431 ") == 1 and not t.disconnecting
    assert site.gate.stats.pending == 0  # answered: no head deadline any more
    clock.advance(1)  # the linger ends
    assert t.disconnecting
    t.protocol.connectionLost(None)
    assert not site.gate.waiting


def test_autobahn_handshake_timeout_is_the_option() -> None:
    from chatd.hub import InMemoryHub
    from chatd.web import make_site

    site = make_site(Settings(handshake_timeout=3.5), InMemoryHub())
    for factory in (site.upgrades.plain, site.upgrades.v1, site.upgrades.relay):
        assert factory.protocol.openHandshakeTimeout == 3.5
    assert site.timeOut == 3.5  # twisted.web's idle timer (body reads, between requests)


def test_caps_at_accept() -> None:
    clock = Clock()
    site = site_on(clock, max_pending=3, max_connections_per_ip=2)
    stats = site.gate.stats
    a = [connect(site, "127.0.0.2") for _ in range(2)]
    refused = connect(site, "127.0.0.2")
    assert refused.disconnected and stats.refused["per_ip"] == 1
    b = connect(site, "127.0.0.3")
    # a fourth waiting connection: the one that waited longest makes room
    clock.advance(1)
    c = connect(site, "127.0.0.4")
    assert a[0].disconnected and not c.disconnecting and stats.refused["pending"] == 1
    a[0].protocol.connectionLost(None)  # its address has a free slot again
    again = connect(site, "127.0.0.2")
    assert a[1].disconnected and not again.disconnecting and stats.pending == 3
    for t in (a[1], b, c, again):
        t.protocol.connectionLost(None)
    assert stats.pending == 0 and not site.gate.per_ip and not site.gate.waiting


# -- on the wire ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_daemon() -> Iterator[Daemon]:
    """One daemon with the push API on, shared by the tests of bodies and odd paths."""
    with Daemon("--api-token", TOKEN) as d:
        yield d
    assert "Unhandled" not in d.log(), d.log()


def post_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_bodies_refused_on_their_head(api_daemon: Daemon) -> None:
    """1 GiB declared, only the head sent: each answer comes at once, and the connection closes."""
    d = api_daemon
    big = f"Content-Length: {GiB}"
    cases = [
        (post_head("/api/relay/r/messages", big), 401),
        (post_head("/api/relay/r/messages", big, "Authorization: Bearer wrong-token-0123"), 403),
        (post_head("/api/relay/r/messages", big, f"Authorization: Bearer {TOKEN}"), 413),
        (
            post_head(
                "/api/rooms/lobby/messages",
                big,
                "Content-Type: application/json",
                f"Authorization: Bearer {TOKEN}",
            ),
            413,
        ),
        (post_head("/api/nowhere", big, f"Authorization: Bearer {TOKEN}"), 404),
        (post_head("/api/relay/r/messages", "Transfer-Encoding: chunked"), 401),
        (post_head("/api/rooms/lobby/messages", big, f"Authorization: Bearer {TOKEN}"), 415),
        # no 100 Continue for a body that will not be read
        (post_head("/api/relay/r/messages", big, "Expect: 100-continue"), 401),
        # paths that take no body: their usual answer, the body unread
        (post_head("/", big), 405),
        (post_head("/healthz", big), 405),
        (post_head("/relay/r", big, "Upgrade: websocket", "Connection: Upgrade"), 405),
        (post_head("/", big).replace(b"POST", b"GET"), 200),
    ]
    for data, status in cases:
        started = time.monotonic()
        answer = exchange(d.port, data)
        assert status_of(answer) == status, (data, answer)
        assert b"100 Continue" not in answer
        # the answer did not wait for a body (which never comes: exchange's 5 s would run out)
        assert time.monotonic() - started < 4, data
        if b"/api/" in data:
            assert answer.rstrip().endswith(b"}"), answer  # the API's JSON answer
    # a body within the limit, with the token, is still read and published
    ok = (
        post_head(
            "/api/relay/r/messages",
            "Content-Length: 5",
            "Connection: close",
            f"Authorization: Bearer {TOKEN}",
        )
        + b"hello"
    )
    assert status_of(exchange(d.port, ok + b"", wait=2)) == 200


def test_a_refused_body_sent_anyway_does_not_lose_the_answer(api_daemon: Daemon) -> None:
    """The server reads and drops the rest (a lingering close) instead of resetting."""
    d = api_daemon
    body = b"x" * 300_000
    for _ in range(3):
        data = post_head("/api/relay/r/messages", f"Content-Length: {len(body)}") + body
        answer = exchange(d.port, data)  # raises on a reset
        assert status_of(answer) == 401
    # one that keeps sending past the bound is cut off
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(post_head("/api/relay/r/messages", f"Content-Length: {GiB}"))
    sent, deadline = 0, time.monotonic() + 10
    with pytest.raises(OSError):  # reset (or broken pipe) once past the bound
        while time.monotonic() < deadline:
            s.sendall(b"y" * 65536)
            sent += 65536
    assert sent < 64 * 1024 * 1024, sent
    s.close()


def test_chunked_body_is_cut_past_the_limit() -> None:
    """In process: each chunk is one read of the site's, so "past the limit" is exact."""
    site = Site("--api-token", TOKEN, "--relay-max-size", "1K").site
    head = post_head(
        "/api/relay/r/messages", "Transfer-Encoding: chunked", f"Authorization: Bearer {TOKEN}"
    )
    t = connect(site)
    t.protocol.dataReceived(head)
    sent = 0
    while not t.value() and sent < 8:  # 512 bytes a chunk, never a last chunk
        t.protocol.dataReceived(b"200\r\n" + b"x" * 512 + b"\r\n")
        sent += 1
    turn(lambda: b"over 1024 bytes" in t.value())
    answer = t.value()
    assert sent == 3, sent  # 1,536 bytes: the first chunk past 1 KiB is answered
    assert status_of(answer) == 413 and b"over 1024 bytes" in answer
    t.protocol.connectionLost(Failure(ConnectionDone()))
    # within the limit, chunked still works
    t = connect(site)
    t.protocol.dataReceived(head + b"5\r\nhello\r\n0\r\n\r\n")
    assert turn(lambda: b"\r\n\r\n" in t.value())
    assert status_of(t.value()) == 200
    t.protocol.connectionLost(Failure(ConnectionDone()))


def test_header_floods_get_431(chatd) -> None:
    p = chatd.port
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"
    assert status_of(exchange(p, many)) == 431
    long_line = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 20_000 + b"\r\n\r\n"
    assert status_of(exchange(p, long_line)) == 431
    # a WebSocket handshake in one read does not get around it on the fast path
    flood = handshake("/relay/r", *(f"X-{i}: y" for i in range(150)))
    assert status_of(exchange(p, flood)) == 431
    huge = handshake("/relay/r", "X-Big: " + "y" * 20_000)
    assert status_of(exchange(p, huge)) == 431
    s = socket.create_connection(("127.0.0.1", p), timeout=5)
    s.sendall(handshake("/relay/r", *(f"X-{i}: y" for i in range(50))))  # under the caps
    assert s.recv(65536).startswith(b"HTTP/1.1 101 ")
    s.close()


def test_nul_in_a_path_is_not_found_without_a_traceback(api_daemon: Daemon) -> None:
    d = api_daemon
    for path, statuses in [
        ("/%00", {404}),
        ("/a%00b/c", {404}),
        ("/static%00.js", {404}),
        ("/relay/a%00b", {400, 404}),
    ]:
        answer = exchange(
            d.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(answer) in statuses, (path, answer[:100])
    api = post_head(
        "/api/rooms/a%00/messages",
        "Content-Type: application/json",
        "Content-Length: 2",
        "Connection: close",
        f"Authorization: Bearer {TOKEN}",
    )
    assert status_of(exchange(d.port, api + b"{}")) == 400  # not a room name
    log = d.log()
    assert "Traceback" not in log and " 500 " not in log, log


def test_origin_scheme_must_match_the_connection(chatd: Daemon, daemon, tmp_path) -> None:
    """On a real TCP and a real TLS listener: the connection's own scheme is its origin.

    (Both ways in, a head in one read and split over two, on http and https:
    tests/test_routing.py, in process, where the split is certain.)
    """
    d = chatd
    own_host = f"127.0.0.1:{d.port}"

    def answer(data: bytes, port: int, ctx: ssl.SSLContext | None = None) -> int:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        s.sendall(data)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        s.close()
        return status_of(head)

    def hs(origin: str, host: str) -> bytes:
        return handshake("/relay/r", f"Origin: {origin}").replace(
            b"Host: 127.0.0.1:9000", f"Host: {host}".encode()
        )

    assert answer(hs(f"http://{own_host}", own_host), d.port) == 101
    assert answer(hs(f"https://{own_host}", own_host), d.port) == 403
    key, cert = make_cert(tmp_path)
    from test_ops import free_port

    port = free_port()
    tls = daemon("--endpoint", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    ctx = ssl.create_default_context(cafile=str(cert))
    host = f"127.0.0.1:{port}"
    assert answer(hs(f"https://{host}", host), tls.port, ctx) == 101
    assert answer(hs(f"http://{host}", host), tls.port, ctx) == 403


def test_tls_connection_that_never_handshakes_is_dropped_at_the_deadline(daemon, tmp_path):
    from test_ops import free_port

    key, cert = make_cert(tmp_path)
    port = free_port()
    daemon(
        "--handshake-timeout",
        "1",
        "--endpoint",
        f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(1) == b""  # no TLS handshake, no bytes: dropped
    assert 0.9 <= time.monotonic() - started < 4
    s.close()


def client_from(port: int, host: str, path: str = "/relay/cap") -> Client:
    """A WebSocket client from the source address ``host`` (all of 127/8 is loopback)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(host, 0))
    return Client(port, path, sock=s)


def dropped(port: int, host: str, wait: float = 3.0) -> bool:
    """Whether a new connection from ``host`` is closed by the server before any answer."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=wait, source_address=(host, 0))
    except ConnectionResetError:  # reset before connect() even returned
        return True
    try:
        s.sendall(handshake("/relay/r"))
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        s.close()


def metric(port: int, name: str) -> float:
    text = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
    assert m, (name, text)
    return float(m.group(1))


def test_per_ip_cap(daemon) -> None:
    d = daemon("--max-connections-per-ip", "3")
    held = [client_from(d.port, "127.0.0.2") for _ in range(3)]
    assert dropped(d.port, "127.0.0.2")
    other = client_from(d.port, "127.0.0.3")  # another address is not affected
    other.send("still here")
    assert other.recv() == "still here"
    held.pop().close()
    deadline = time.monotonic() + 30
    while dropped(d.port, "127.0.0.2", wait=10):  # until the server has seen the close
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(d.port, 'chatd_connections_refused_total{reason="per_ip"}') >= 1
    for c in (*held, other):
        c.close()


def test_pending_cap_drops_the_oldest_not_the_newcomer(daemon) -> None:
    d = daemon("--max-pending", "50", "--metrics-endpoint", "tcp:0:interface=127.0.0.1")
    ops = d.port_of("metrics", timeout=30)
    flood = [
        socket.create_connection(("127.0.0.1", d.port), timeout=5, source_address=("127.0.0.2", 0))
        for _ in range(200)
    ]
    deadline = time.monotonic() + 30
    while metric(ops, 'chatd_connections_refused_total{reason="pending"}') < 150:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert metric(ops, "chatd_connections_pending") == 50
    # a newcomer gets in and chats, well within the (default 10 s) head deadline
    v = V1(d.port, "newcomer")
    v.join("p")
    v.say("p", "in")
    assert v.next("message")["text"] == "in"
    v.close()
    # the first of the flood were the ones dropped
    first = flood[0]
    first.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert first.recv(1) == b""
    for s in flood:
        s.close()


def test_slowloris_does_not_lock_out_and_is_cut_at_the_deadline(daemon) -> None:
    timeout = 1.0
    d = daemon("--handshake-timeout", str(timeout))
    rss_before = d.rss_kib()
    n = 400
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closed: dict[socket.socket, float] = {}
    trickle = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 100
    for i in range(n):
        before = time.monotonic()  # before connect: the server's clock cannot start earlier
        s = socket.create_connection(
            ("127.0.0.1", d.port), timeout=10, source_address=(f"127.0.0.{2 + i % 4}", 0)
        )
        s.setblocking(False)
        opened[s] = before
        sel.register(s, selectors.EVENT_READ, i)
    # a new client still gets in and chats while all of them are held
    v = V1(d.port, "through", host="127.0.0.1")
    v.join("slow")
    v.say("slow", "not locked out")
    assert v.next("message")["text"] == "not locked out"
    position = dict.fromkeys(opened, 0)  # of each trickling socket in ``trickle``
    deadline = time.monotonic() + timeout + 30  # ends as soon as all are closed
    while len(closed) < n and time.monotonic() < deadline:
        # half of them send nothing; the other half a byte a round (~50 ms)
        for s, at in position.items():
            if s not in closed and sel.get_key(s).data % 2 and at < len(trickle):
                try:
                    s.send(trickle[at : at + 1])
                    position[s] = at + 1
                except OSError:
                    pass
        for key, _ in sel.select(0.05):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            assert data == b"", data  # no answer: just dropped
            closed[s] = time.monotonic()
            sel.unregister(s)
    assert len(closed) == n, f"{n - len(closed)} still open"
    lifetimes = sorted(closed[s] - opened[s] for s in closed)
    assert lifetimes[0] >= timeout - 0.05, lifetimes[:5]  # not cut before the deadline
    assert lifetimes[-1] <= timeout + 3, lifetimes[-5:]  # and cut at it, slack for a busy box
    assert metric(d.port, "chatd_request_head_timeouts_total") >= n
    # the chat still works, and memory came back down to about where it was
    v.say("slow", "after")
    assert v.next("message")["text"] == "after"
    v.close()
    rss_after = d.rss_kib()
    print(
        f"slowloris: {n} sockets, lifetimes {lifetimes[0]:.2f}-{lifetimes[-1]:.2f} s, "
        f"RSS {rss_before} -> {rss_after} KiB"
    )
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    for s in opened:
        s.close()
    sel.close()
