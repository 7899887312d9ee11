"""permessage-deflate, in-process under pytest-twisted with Autobahn's own client.

The site is the one the daemon serves (chatd.web.make_site), listening on a
real loopback socket; the clients are Autobahn WebSocket clients.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import defer, reactor, task
from wsclient import Client

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


def connect(port: int, path: str, compress: bool, expect: int):
    f = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    f.protocol = Recorder
    f.opened, f.all_received, f.received, f.expect = defer.Deferred(), defer.Deferred(), [], expect
    if compress:
        f.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=lambda r: (
                PerMessageDeflateResponseAccept(r)
                if isinstance(r, PerMessageDeflateResponse)
                else None
            ),
        )
    reactor.connectTCP("127.0.0.1", port, f)
    return f


@pytest.fixture
def site_port():
    hub = InMemoryHub()
    port = reactor.listenTCP(0, make_site(Settings(ping_interval=0), hub), interface="127.0.0.1")
    yield port.getHost().port, hub
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_mixed_room_compressed_and_plain_members_get_identical_messages(site_port):
    port, hub = site_port
    payloads = [(os.urandom(3000), True), (("ticker " * 500).encode(), False), (b"", True)]
    factories = [connect(port, "/relay/mixed", c, len(payloads)) for c in (True, False, True)]
    protos = yield defer.gatherResults([f.opened for f in factories])
    assert protos[0]._perMessageCompress is not None  # negotiated
    assert protos[1]._perMessageCompress is None
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


def test_no_compression_declines_the_offer(daemon) -> None:
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    on = daemon()
    c = Client(on.port, "/relay/x", headers=offer)
    assert "permessage-deflate" in c.response_headers
    c.close()
    off = daemon("--no-compression")
    c = Client(off.port, "/relay/x", headers=offer)
    assert "permessage-deflate" not in c.response_headers
    c.send(b"plain")
    assert c.recv() == b"plain"
    c.close()
