"""Broadcast peer for bench/run.py on Autobahn + Twisted (what chatd is built on).

Every message goes to every client, sender included, in one of two ways:

- ``send``: ``sendMessage`` per client (Autobahn frames the message N times);
- ``prepared``: ``prepareMessage`` once, then ``sendPreparedMessage`` per client.

The pair shows what framing once buys on the same stack chatd uses. No
compression, no pings, backlog 4096.

    python bench/peers/autobahn_server.py send|prepared [port]
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import reactor  # noqa: E402


class Broadcast(WebSocketServerProtocol):
    factory: BroadcastFactory

    def onOpen(self) -> None:
        self.factory.clients.add(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.clients.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        clients = tuple(self.factory.clients)
        if self.factory.prepared:
            msg = self.factory.prepareMessage(payload, isBinary)
            for c in clients:
                c.sendPreparedMessage(msg)
        else:
            for c in clients:
                c.sendMessage(payload, isBinary)


class BroadcastFactory(WebSocketServerFactory):
    protocol = Broadcast

    def __init__(self, prepared: bool) -> None:
        super().__init__()
        self.prepared = prepared
        self.clients: set[Broadcast] = set()
        # pings off (the default, said here); compression is off unless accepted
        self.setProtocolOptions(autoPingInterval=0)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "send"
    if variant not in ("send", "prepared"):
        sys.exit("usage: autobahn_server.py send|prepared [port]")
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    factory = BroadcastFactory(prepared=variant == "prepared")
    listening = reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    print(f"listening on {listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
