"""permessage-deflate, in-process under pytest-twisted with Autobahn's own client.

The site is the one the daemon serves (chatd.web.make_site), listening on a
real loopback socket; the clients are Autobahn WebSocket clients. Whether
the offer is taken at all is checked on a site over a StringTransport.
"""

from __future__ import annotations

import os

import inproc
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from rawhttp import handshake
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from wsclient import BINARY, frame

from chatd.config import Settings
from chatd.hub import InMemoryHub
from chatd.web import make_site


class Recorder(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))
        if len(self.factory.received) == self.factory.expect:
            self.factory.all_received.callback(self.factory.received)


def connect(port: int, path: str, compress: bool, expect: int, no_server_context: bool = False):
    """An Autobahn client; ``no_server_context``: its offer asks for server_no_context_takeover."""
    f = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    f.protocol = Recorder
    f.opened, f.all_received, f.received, f.expect = defer.Deferred(), defer.Deferred(), [], expect
    if compress:
        f.setProtocolOptions(
            perMessageCompressionOffers=[
                PerMessageDeflateOffer(request_no_context_takeover=no_server_context)
            ],
            perMessageCompressionAccept=lambda r: (
                PerMessageDeflateResponseAccept(r)
                if isinstance(r, PerMessageDeflateResponse)
                else None
            ),
        )
    reactor.connectTCP("127.0.0.1", port, f)
    return f


@pytest.fixture(params=[False, True], ids=["shared", "context-takeover"])
def site_port(request):
    hub = InMemoryHub()
    settings = Settings(ping_interval=0, compression_context_takeover=request.param)
    port = reactor.listenTCP(0, make_site(settings, hub), interface="127.0.0.1")
    yield port.getHost().port, hub
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_mixed_room_compressed_and_plain_members_get_identical_messages(site_port):
    port, hub = site_port
    payloads = [(os.urandom(3000), True), (("ticker " * 500).encode(), False), (b"", True)]
    payloads += [(f'{{"type":"message","text":"tick {i}"}}'.encode(), False) for i in range(5)]
    # deflate, plain, deflate asking for server_no_context_takeover: on the context
    # takeover server the first has its own compressor, the third the shared frame
    kinds = ((True, False), (False, False), (True, True))
    factories = [connect(port, "/relay/mixed", c, len(payloads), n) for c, n in kinds]
    protos = yield defer.gatherResults([f.opened for f in factories])
    assert protos[0]._perMessageCompress is not None  # negotiated
    assert protos[1]._perMessageCompress is None
    assert protos[2]._perMessageCompress.server_no_context_takeover
    assert hub.rooms() == {"relay/mixed": 3}
    for payload, binary in payloads:
        protos[1].sendMessage(payload, binary)
    results = yield defer.gatherResults([f.all_received for f in factories])
    for r in results:
        assert r == payloads
    for p in protos:
        p.sendClose()
    # The server forgets the room once it has seen the last close: poll for it (bounded).
    deadline = reactor.seconds() + 30
    while hub.rooms() and reactor.seconds() < deadline:
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert hub.rooms() == {}


@pytest_twisted.inlineCallbacks
def test_compressed_plain_chat(site_port):
    port, _ = site_port
    f = connect(port, "/", True, 1)
    p = yield f.opened
    p.sendMessage("ünïcode ".encode() * 200)
    (payload, binary), *_ = yield f.all_received
    assert payload == f"ID{p.transport.getHost().port}: ".encode() + "ünïcode ".encode() * 200
    assert binary is False
    p.sendClose()


def offer_answer(compression: bool) -> tuple[bytes, bytes]:
    """A real site (in process) given a permessage-deflate offer on a relay room: the
    response head, and what comes back for a binary frame sent on."""
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    site = make_site(Settings(ping_interval=0, compression=compression), InMemoryHub())
    t = inproc.connect(site)
    try:
        t.protocol.dataReceived(handshake("/relay/x", offer))
        head = t.value()
        t.clear()
        t.protocol.dataReceived(frame(BINARY, b"plain"))
        inproc.turn(lambda: len(t.value()) >= 7)
        return head, t.value()
    finally:
        t.protocol.connectionLost(Failure(ConnectionDone()))


def test_no_compression_declines_the_offer() -> None:
    head, _ = offer_answer(compression=True)
    assert head.startswith(b"HTTP/1.1 101 ") and b"permessage-deflate" in head
    head, echo = offer_answer(compression=False)
    assert head.startswith(b"HTTP/1.1 101 ") and b"permessage-deflate" not in head
    assert echo == b"\x82\x05plain"  # RSV1 clear: not compressed
