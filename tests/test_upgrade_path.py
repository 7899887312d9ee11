"""The fast upgrade path (chatd.web.FrontDoor/Upgrades, Connection.processHandshake).

Ordinary handshakes skip twisted.web and Autobahn's own parse; everything
else must get exactly the answers it got before. The routing decision is
tested in process, and a head split over reads on a real site in process;
the answers against the real daemon.
"""

from __future__ import annotations

import socket
import struct

import pytest
from inproc import connect, turn
from rawhttp import ACCEPT, KEY, exchange, handshake
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from wsclient import BINARY, TEXT, Client, frame

from chatd.config import Settings
from chatd.hub import InMemoryHub
from chatd.web import Origins, Upgrades, make_site
from tools.daemon import Daemon


@pytest.fixture
def upgrades() -> Upgrades:
    return Upgrades("plain", "v1", "relay", Origins(()))  # type: ignore[arg-type]


def factory_of(upgrades: Upgrades, data: bytes):
    route = upgrades.route(data)
    return None if route is None else route[0]


def test_ordinary_handshakes_are_taken(upgrades) -> None:
    assert factory_of(upgrades, handshake("/relay/quotes")) == "relay"
    assert factory_of(upgrades, handshake("/relay/a%40b?x=1")) == "relay"
    assert factory_of(upgrades, handshake("/")) == "plain"
    assert factory_of(upgrades, handshake("/?since=3")) == "plain"
    v1 = handshake("/", "Sec-WebSocket-Protocol: other, chatd.v1")
    assert factory_of(upgrades, v1) == "v1"
    own = handshake("/", "Origin: http://127.0.0.1:9000")
    assert factory_of(upgrades, own) == "plain"
    _, target, headers = upgrades.route(v1)
    assert target == b"/" and headers[b"sec-websocket-protocol"] == b"other, chatd.v1"


@pytest.mark.parametrize(
    "data",
    [
        handshake("/relay/a b"),  # not even a valid request line
        handshake("/relay/a%20b"),  # bad room name: twisted.web answers 400
        handshake("/relay/"),  # 404
        handshake("/relay/a/b"),  # 404
        handshake("/relay/a;b"),
        handshake("/relay/a#frag"),
        handshake("/healthz"),  # not a WebSocket path
        handshake("/plain.html"),
        handshake("/", "Origin: https://evil.example"),  # 403
        handshake("/", "Upgrade: websocket"),  # repeated Upgrade
        handshake("/", "Host: other"),  # repeated Host
        handshake("/", f"Sec-WebSocket-Key: {KEY}"),  # repeated key
        handshake("/", "Content-Length: 5"),  # a body
        handshake("/", "Transfer-Encoding: chunked"),
        handshake("/", "X-Folded: a", " b"),  # obsolete line folding
        handshake("/", "Bad Header: x"),  # not a token
        handshake(first="POST / HTTP/1.1"),
        handshake(first="GET / HTTP/1.0"),
        handshake(first="GET http://127.0.0.1:9000/ HTTP/1.1"),  # absolute form
        handshake("/")[:-2],  # incomplete: the rest may come in the next read
        handshake("/").replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # the page
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
)
def test_everything_else_goes_to_twisted_web(upgrades, data: bytes) -> None:
    assert upgrades.route(data) is None


def test_allowed_origin_list_and_any() -> None:
    listed = Upgrades("plain", "v1", "relay", Origins(("https://app.example",)))  # type: ignore[arg-type]
    assert listed.route(handshake("/", "Origin: https://app.example")) is not None
    assert listed.route(handshake("/", "Origin: http://127.0.0.1:9000")) is None
    anyone = Upgrades("plain", "v1", "relay", Origins(("*",)))  # type: ignore[arg-type]
    assert anyone.route(handshake("/", "Origin: https://evil.example")) is not None


def test_answers_on_the_wire(chatd: Daemon) -> None:
    p = chatd.port
    ok = exchange(p, handshake("/relay/wire"), 30, head_only=True)
    assert ok.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Sec-WebSocket-Accept: {ACCEPT}\r\n".encode() in ok
    v1 = exchange(p, handshake("/", "Sec-WebSocket-Protocol: chatd.v1"), 30, head_only=True)
    assert b"\r\nSec-WebSocket-Protocol: chatd.v1\r\n" in v1
    # refusals keep their status, from whichever layer gave them before
    statuses = {
        "/relay/a%20b": 400,
        "/relay/a/b": 404,
        "/relay/": 404,
    }
    for path, status in statuses.items():
        head = exchange(p, handshake(path), 30, head_only=True).split(b"\r\n", 1)[0]
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (path, head)
    refused = {
        "badkey": (handshake("/relay/r").replace(KEY.encode(), b"short=="), 400),
        "version": (handshake("/relay/r").replace(b"Version: 13", b"Version: 12"), 400),
        "no-connection": (handshake("/relay/r").replace(b"Connection: Upgrade\r\n", b""), 400),
        "dup-protocol": (handshake("/", "Sec-WebSocket-Protocol: a, a"), 400),
        "origin": (handshake("/relay/r", "Origin: https://evil.example"), 403),
        "post": (handshake(first="POST /relay/r HTTP/1.1"), 405),
    }
    for name, (data, status) in refused.items():
        head = exchange(p, data, 30, head_only=True).split(b"\r\n", 1)[0]
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (name, head)
    get = b"GET /plain.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    page = exchange(p, get, 30, head_only=True)
    assert page.startswith(b"HTTP/1.1 200 OK") and b"Content-Security-Policy" in page


def test_frames_right_behind_the_handshake_are_kept(chatd: Daemon) -> None:
    s = socket.create_connection(("127.0.0.1", chatd.port), timeout=10)
    try:
        s.sendall(handshake("/relay/eager") + frame(TEXT, b"first") + frame(BINARY, b"\x00\x01"))
        data = b""
        want = struct.pack("!BB", 0x81, 5) + b"first" + struct.pack("!BB", 0x82, 2) + b"\x00\x01"
        while not data.endswith(want):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
    finally:
        s.close()


def test_a_handshake_in_pieces_still_works() -> None:
    """A request split over reads goes through twisted.web, as before (in process: the two
    reads are certain, where two sends on a socket may arrive as one)."""
    site = make_site(Settings(ping_interval=0), InMemoryHub())
    t = connect(site)
    data = handshake("/relay/slow")
    assert site.upgrades.route(data) is not None  # in one read, the fast path would take it
    t.protocol.dataReceived(data[:20])
    assert t.value() == b""
    t.protocol.dataReceived(data[20:])
    head, _, rest = t.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and f"Sec-WebSocket-Accept: {ACCEPT}".encode() in head
    assert rest == b""
    t.clear()
    t.protocol.dataReceived(frame(TEXT, b"hello"))  # the relay echoes to its sender
    assert turn(lambda: t.value() == b"\x81\x05hello"), t.value()
    t.protocol.connectionLost(Failure(ConnectionDone()))


def test_connection_state_is_small_once_open(chatd: Daemon) -> None:
    """Open connections still behave after the handshake state is dropped."""
    a = Client(chatd.port, "/relay/state")
    b = Client(chatd.port, "/relay/state", headers={"Origin": f"http://127.0.0.1:{chatd.port}"})
    try:
        a.send("x" * 70_000)  # a text message: the UTF-8 validator is made on first use
        assert b.recv() == "x" * 70_000
        assert a.recv() == "x" * 70_000
        a.send(b"\xff")
        assert b.recv() == b"\xff"
    finally:
        assert a.close() == 1000
        assert b.close() == 1000
