"""What every chatd WebSocket connection shares: limits, backpressure, closing.

A connection owns one ``fanout.Link`` (its outgoing side) from onOpen until
its close handshake starts. Subclasses say what to do when the link opens
(``attach``), when a message arrives, and when the link goes (``detach``);
``detach`` runs exactly once, as soon as chatd sends or receives a close or
the TCP connection is lost, so a closing client is never written to again.
"""

from __future__ import annotations

from typing import ClassVar

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.logger import Logger

from chatd import limits
from chatd.config import Settings
from chatd.fanout import Budget, Link
from chatd.hub import Hub


class Connection(WebSocketServerProtocol):
    factory: ChatdFactory
    kind: ClassVar[str] = "?"
    link: Link | None = None
    _log = Logger()

    # -- lifecycle -------------------------------------------------------
    def onOpen(self) -> None:
        compressing = self._perMessageCompress is not None
        self.link = Link(
            self.transport,
            self.factory.settings.max_backlog,
            self._dropped,
            self.sendMessage if compressing else None,
            self.factory.budget,
        )
        # After the upgrade the transport still has twisted.web's HTTPChannel
        # as its producer; from now on the link is, so the transport tells
        # it when the client stops reading.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self.link, True)
        self.attach()

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False) -> None:
        self._detach()
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def onClose(self, wasClean: bool, code, reason) -> None:
        self._detach()

    def _detach(self) -> None:
        link = self.link
        if link is not None:
            self.link = None
            link.close()
            self.detach(link)

    # -- for subclasses ---------------------------------------------------
    def attach(self) -> None:
        """The connection is open: join rooms with ``self.link``."""

    def detach(self, link: Link) -> None:
        """The connection is closing: leave every room ``link`` joined."""

    @property
    def hub(self) -> Hub:
        return self.factory.hub

    def fail(self, code: int, reason: str) -> None:
        """Close with any RFC 6455 code (sendClose only takes 1000 and 3000-4999)."""
        self._fail_connection(code, reason)

    def _dropped(self, reason: str) -> None:
        if reason == "backlog":
            self.fail(
                limits.CLOSE_POLICY_VIOLATION,
                f"slow consumer: more than {self.factory.settings.max_backlog} bytes unread",
            )
        elif reason == "overload":
            self.fail(limits.CLOSE_TRY_AGAIN_LATER, "server overloaded: too much unread")
        else:
            self.dropConnection(abort=True)


class ChatdFactory(WebSocketServerFactory):
    """One per kind of endpoint; holds the hub that holds the clients."""

    def __init__(
        self,
        protocol: type[Connection],
        hub: Hub,
        settings: Settings,
        max_size: int,
        budget: Budget,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.hub = hub
        self.settings = settings
        self.budget = budget
        self.max_size = max_size
        accept = None
        if settings.compression:

            def accept(offers):
                for offer in offers:
                    if isinstance(offer, PerMessageDeflateOffer):
                        return PerMessageDeflateOfferAccept(offer, max_message_size=max_size)
                return None

        self.setProtocolOptions(
            maxMessagePayloadSize=max_size,
            maxFramePayloadSize=max_size,
            # Protocol errors get their close code (1002, 1007, ...), not a drop.
            failByDrop=False,
            webStatus=False,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout if settings.ping_interval else 0,
            openHandshakeTimeout=limits.OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=limits.CLOSE_HANDSHAKE_TIMEOUT,
            perMessageCompressionAccept=accept,
        )
