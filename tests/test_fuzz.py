"""Property-based tests (Hypothesis): generated input against one real daemon.

Generated JSON, generated text, generated WebSocket frames, generated HTTP
requests (the fast upgrade path in chatd.web parses HTTP itself) and
generated push API bodies. Each example must be answered as documented: an
``error`` with a known code, a documented close code, an HTTP status line
(never 500); after each one a bystander still chats, and the daemon's log
never shows "Unhandled" or "Traceback".

The budget is small by default (a few seconds per property, for ``make
check``); ``make fuzz`` runs the same properties with HYPOTHESIS_PROFILE=fuzz,
thousands of examples each.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import struct
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from v1client import V1
from wsclient import BINARY, CLOSE, CONT, PING, PONG, TEXT, Client, Closed, frame

from tools.daemon import Daemon

settings.register_profile(
    "check",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("CHATD_FUZZ_EXAMPLES", "10000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "check"))

TOKEN = "fuzz-token-0123456789abcdef"
ERROR_CODES = {
    "bad_json",
    "bad_message",
    "unknown_type",
    "bad_field",
    "bad_nick",
    "already_hello",
    "hello_first",
    "bad_room",
    "nick_taken",
    "too_many_rooms",
    "not_joined",
    "too_long",
}
ANSWERS = {"welcome", "joined", "left", "message", "error"}
CLOSE_CODES = {1002, 1003, 1007, 1008, 1009}  # what chatd closes a bad client with
WITNESS_ROOM = "witness"
SENTINEL_ROOM = "zz-sentinel"
_serial = itertools.count()


class Fuzzed:
    """The daemon under test, and two bystanders who must keep chatting."""

    def __init__(self) -> None:
        self.d = Daemon(
            "--ping-interval", "0", "--rate", "1000000", "--rate-burst", "1000000",
            "--api-token", TOKEN, "--max-text", "1K",
        )  # fmt: skip
        self.speaker = V1(self.d.port, "witness-a")
        self.speaker.join(WITNESS_ROOM)
        self.listener = V1(self.d.port, "witness-b")
        self.listener.join(WITNESS_ROOM)
        self.speaker.next("presence")
        self.seen_lines = 0

    def still_serving(self) -> None:
        """A bystander still chats, and nothing went wrong in the log."""
        text = f"still here {next(_serial)}"
        self.speaker.say(WITNESS_ROOM, text)
        while (m := self.listener.next())["type"] != "message":
            pass
        assert m["text"] == text
        while (m := self.speaker.next())["type"] != "message":
            pass
        lines = self.d.lines[self.seen_lines :]
        self.seen_lines += len(lines)
        bad = [line for line in lines if "Unhandled" in line or "Traceback" in line]
        assert not bad, "\n".join(lines)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    f = Fuzzed()
    try:
        yield f
    finally:
        f.speaker.close()
        f.listener.close()
        f.d.stop()
    log = f.d.log()
    assert "Unhandled" not in log and "Traceback" not in log, log


# -- chatd.v1: JSON and text ------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
nicks = st.sampled_from(["fz", "Fz", "ＦＺ", "ID12", "id12", "а", "aа", ""]) | st.text(max_size=34)
rooms = st.sampled_from(["fz", "lobby", "a.b", "..", "x" * 65, "bad room", WITNESS_ROOM]) | st.text(
    max_size=10
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["hello", "join", "leave", "send", "Hello", "", "dance"])
        | json_values,
        "nick": nicks | json_values,
        "room": rooms | json_values,
        "since": st.integers(min_value=-5, max_value=2**64) | json_values,
        "text": st.text(max_size=30) | st.text(min_size=1025, max_size=1100) | json_values,
        "ref": st.text(max_size=70)
        | st.integers(min_value=-(2**60), max_value=2**60)
        | json_values,
        "extra": json_values,
    },
)


def _v1_answers(c: V1, expected: int) -> list[dict]:
    """The frames before the sentinel's error; asserts each is documented."""
    ref = f"sentinel-{next(_serial)}"
    c.req("leave", room=SENTINEL_ROOM, ref=ref)
    answers = []
    while True:
        opcode, payload = c.recv_message()
        assert opcode == TEXT
        obj = json.loads(payload)
        assert isinstance(obj, dict) and isinstance(obj.get("type"), str), obj
        if obj.get("ref") == ref:
            assert obj["type"] == "error" and obj["code"] == "not_joined", obj
            break
        if obj["type"] == "presence":
            continue
        assert obj["type"] in ANSWERS, obj
        if obj["type"] == "error":
            assert obj["code"] in ERROR_CODES, obj
            assert isinstance(obj["message"], str) and obj["message"], obj
        answers.append(obj)
    assert len(answers) == expected, answers
    return answers


@given(frames=st.lists(fields | json_values, min_size=1, max_size=3), hello=st.booleans())
def test_any_json_frame_gets_one_documented_answer(fuzzed: Fuzzed, frames, hello) -> None:
    c = V1(fuzzed.d.port, f"fz{next(_serial)}" if hello else None)
    for obj in frames:
        c.send_frame(TEXT, json.dumps(obj).encode())  # NaN and Infinity included
    _v1_answers(c, len(frames))
    c.close()
    fuzzed.still_serving()


jsonish = st.text(alphabet='{}[]":,.-+0123456789eEtrufalsnNIiyx \\/\n\tu"', max_size=60)


@given(
    payload=st.binary(max_size=200)
    | jsonish.map(str.encode)
    | st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_any_text_frame_is_answered_or_closed_1007(fuzzed: Fuzzed, payload: bytes) -> None:
    c = V1(fuzzed.d.port, f"fz{next(_serial)}")
    c.send_frame(TEXT, payload)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        assert c.expect_close() == 1007
        c.sock.close()
    else:
        _v1_answers(c, 1)
        c.close()
    fuzzed.still_serving()


# -- WebSocket frames --------------------------------------------------------------------


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]  # as permessage-deflate sends


DEFLATED = _deflate(b'{"type":"hello","nick":"fzd"}')
ws_frames = st.builds(
    lambda opcode, payload, fin, rsv, mask: (opcode, payload, fin, rsv, mask),
    st.sampled_from([TEXT, BINARY, CLOSE, PING, PONG, CONT]) | st.integers(0, 15),
    st.binary(max_size=140)
    | st.sampled_from(
        [b"", b'{"type":"hello","nick":"fzf"}', struct.pack("!H", 1000), b"\xff", DEFLATED]
    ),
    st.booleans(),
    st.sampled_from([0, 0, 0, 1, 4]),
    st.booleans() | st.just(True),
)


@given(
    path=st.sampled_from(["/", "/v1", "/relay/fz"]),
    deflate=st.booleans(),
    frames=st.lists(ws_frames, min_size=1, max_size=6),
)
def test_any_frames_are_answered_or_closed_with_a_documented_code(
    fuzzed: Fuzzed, path, deflate, frames
) -> None:
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate"} if deflate else {}
    if path == "/v1":
        headers["Sec-WebSocket-Protocol"] = "chatd.v1"
    c = Client(fuzzed.d.port, "/" if path == "/v1" else path, headers=headers)
    if deflate:  # then a frame with RSV1 (4) set is compressed: sometimes valid, mostly not
        assert "permessage-deflate" in c.response_headers
    data = b"".join(frame(op, p, fin, mask, rsv) for op, p, fin, rsv, mask in frames)
    sent_close = any(op == CLOSE for op, *_ in frames)
    marker = f"sentinel-{next(_serial)}"
    if path == "/v1":
        sentinel = json.dumps({"type": "leave", "room": SENTINEL_ROOM, "ref": marker}).encode()
    else:
        sentinel = marker.encode()
    # Then a ping: its pong (never compressed) says every frame before it was taken.
    with contextlib.suppress(OSError):  # the server may have closed already
        c.sock.sendall(data + frame(TEXT, sentinel) + frame(PING, marker.encode()))
    try:
        code = _pong_or_close(c, marker.encode())
    except TimeoutError:
        raise AssertionError("neither served nor closed") from None
    except Closed:
        raise AssertionError("dropped without a close frame") from None
    except OSError:  # a reset: our close crossed what we still sent
        assert sent_close
    else:
        if code is not None and not sent_close:
            assert code in CLOSE_CODES, code
    c.sock.close()
    fuzzed.still_serving()


def _pong_or_close(c: Client, marker: bytes) -> int | None:
    """None when the pong of ``marker`` comes back; the code of a close frame first."""
    while True:
        _, op, payload = c.recv_frame()
        if op == PONG and payload == marker:
            return None
        if op == CLOSE:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        if op == PING:
            c.send_frame(PONG, payload)


# -- HTTP: the fast upgrade path and twisted.web ---------------------------------------

header_names = st.sampled_from(
    [
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Origin",
        "Content-Length",
        "Transfer-Encoding",
        "X-Anything",
        "host",
        "UPGRADE",
        "Bad Name",
        "",
    ]
) | st.text(alphabet="abcdefXYZ-_:é\t ", max_size=12)
header_values = st.sampled_from(
    [
        "websocket",
        "WebSocket",
        "Upgrade",
        "upgrade, keep-alive",
        "dGhlIHNhbXBsZSBub25jZQ==",
        "dGhlIHNhbXBsZSBub25jZQ",
        "13",
        "8",
        "chatd.v1",
        "chatd.v1, chatd.v1",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=99",
        "http://127.0.0.1",
        "null",
        "http://[::1",
        "127.0.0.1:notaport",
        "[::1]",
        "0",
        "5",
        "-1",
        "chunked",
        "",
    ]
) | st.text(max_size=20)


def _request(method, target, version, headers, eol) -> bytes:
    lines = [f"{method} {target} {version}"] + [f"{n}: {v}" for n, v in headers]
    # Lines may end with a bare LF, but the request ends as HTTP says: a bare
    # LF end would be an unfinished request, left to the idle timeout.
    head = eol.join(lines) + "\r\n\r\n"
    raw = head.encode("utf-8", "surrogatepass")
    body = b""
    for n, v in headers:
        if n.lower() == "content-length" and v.strip().isdigit() and int(v) < 1000:
            body = b"x" * int(v)
        if n.lower() == "transfer-encoding" and v.strip().lower() == "chunked":
            body = b"0\r\n\r\n"
    return raw + body


def _handshake_headers(port: int) -> list[tuple[str, str]]:
    return [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]


@given(
    method=st.sampled_from(["GET", "GET", "POST", "HEAD", "OPTIONS", "get", "G\x00T", ""]),
    target=st.sampled_from(
        [
            "/",
            "/",
            "/relay/fz",
            "/relay/",
            "/relay/a/b",
            "/relay/bad%20room",
            "/relay/..",
            "/?x=1",
            "/#frag",
            "/api/rooms",
            "/index.html",
            "/%2e%2e/etc",
            "*",
            "",
            "//",
            "/x y",
        ]
    )
    | st.text(max_size=20).map(lambda s: "/" + s),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", "HTTP/9"]),
    keep=st.lists(st.booleans(), min_size=5, max_size=5),
    extra=st.lists(st.tuples(header_names, header_values), max_size=4),
    eol=st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]),
    protocol=st.sampled_from([None, "chatd.v1", "other, chatd.v1", "x"]),
)
def test_any_http_request_gets_a_status_line_never_500(
    fuzzed: Fuzzed, method, target, version, keep, extra, eol, protocol
) -> None:
    headers = [h for h, k in zip(_handshake_headers(fuzzed.d.port), keep, strict=True) if k]
    if protocol is not None:
        headers.append(("Sec-WebSocket-Protocol", protocol))
    headers += extra
    raw = _request(method, target, version, headers, eol)
    with socket.create_connection(("127.0.0.1", fuzzed.d.port), timeout=3) as s:
        s.sendall(raw)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            head += chunk
    assert head, f"no answer at all to {raw!r}"
    status_line = re.match(rb"HTTP/1\.[01] (\d\d\d) ", head)
    assert status_line, f"no status line: {raw!r} -> {head!r}"
    status = int(status_line.group(1))
    assert 100 <= status < 600 and status != 500, (raw, head)
    fuzzed.still_serving()


# -- the push API -------------------------------------------------------------------------


@given(body=json_values.map(json.dumps) | fields.map(json.dumps) | jsonish)
def test_any_api_body_gets_json_and_never_500(fuzzed: Fuzzed, body: str) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fuzzed.d.port, timeout=10)
    try:
        conn.request(
            "POST",
            "/api/rooms/fz/messages",
            body=body.encode("utf-8", "surrogatepass"),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        answer = json.loads(r.read())
    finally:
        conn.close()
    assert r.status in (201, 400, 413), (body, r.status, answer)
    assert r.getheader("Content-Type") == "application/json"
    if r.status != 201:
        assert isinstance(answer["error"], str)
    fuzzed.still_serving()
