"""chatd.v1 over Autobahn: the WebSocket side of ``chatd.session.ChatSession``.

Chosen by the WebSocket subprotocol ``chatd.v1`` (docs/PROTOCOL.md says
every detail). Everything the protocol decides (parsing, checks, the rate
limit's verdicts, frames waiting behind a join, errors, history pages) is
the session's, which has no I/O; this class only carries it:

- the connection opens (``attach``): a ``ChatSession`` with this
  connection's link, the settings' limits and ``time.monotonic()``;
- a whole text message (``received``): ``session.receive(payload, now)``;
  a binary one is refused here, at its first frame (close 1003);
- the close handshake starts or the connection is lost (``detach``):
  ``session.close()``.

The connection is the session's ``Output``: ``send_payload`` (straight to
the socket, or behind the history pages the link holds), ``send_pages``
(the link holds, and writes a page each time its transport drains),
``fail`` (a close code) and ``writable``. Live messages and presence do not
pass through here: the hub fans them out to the link (``fanout.broadcast``).
"""

from __future__ import annotations

import time

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall

from chatd import limits
from chatd.protocols.base import Connection
from chatd.session import (  # V1Renderer re-exported: chatd.web imports it from here
    ChatSession,
    HistoryPages,
    V1Renderer,
)

__all__ = ["SUBPROTOCOL", "V1Chat", "V1Renderer"]

SUBPROTOCOL = "chatd.v1"


class V1Chat(Connection):
    kind = "v1"
    chat: ChatSession | None = None

    _expiry: IDelayedCall | None = None  # closes the connection when its token runs out
    _deadline: float | None = None

    def onConnect(self, request):
        if SUBPROTOCOL not in request.protocols:  # web.py routes only offers of it here
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, f"subprotocol {SUBPROTOCOL} needed")
        # A token on the upgrade is checked now (401 if bad); without one, hello brings it.
        self.identify(request, required=False)
        return SUBPROTOCOL

    def attach(self) -> None:
        s = self.factory.settings
        assert self.link is not None
        self.chat = ChatSession(
            self.hub,
            self.link,
            self,
            time.monotonic(),
            rate=s.rate,
            rate_burst=s.rate_burst,
            rate_flood=s.rate_flood,
            max_text=s.max_text,
            stats=self.factory.stats,
            policy=self.factory.policy,
            identity=self.identity,
            resume=self._take_over,
            node=self.hub.node,
        )
        self.factory.clients.resumable[self.chat.resume_secret] = self
        self._watch_expiry()

    def user(self) -> str | None:
        chat = self.chat  # (hello may have brought the token)
        identity = chat.identity if chat is not None else self.identity
        return identity.sub if identity is not None else None

    def _take_over(self, secret: str, sub: str | None) -> Deferred[list[str] | None]:
        """The session holding ``secret``, on this node or another, is closed (4000)
        and its rooms given; None if there is none, or it is another user's."""
        if self.chat is not None and secret == self.chat.resume_secret:
            return succeed(None)
        return self.hub.take_over(secret, sub or "")

    @staticmethod
    def hand_over(resumable: dict[str, Connection], secret: str, user: str) -> list[str] | None:
        """This node's part of a take-over (``Hub.resume_listeners``): close the session
        of ``resumable`` holding ``secret`` (4000) if it is ``user``'s ("" anonymous),
        and give its rooms, which it has left by then; None if there is none here."""
        old = resumable.get(secret)
        if not isinstance(old, V1Chat) or old.chat is None:
            return None
        if (old.user() or "") != user:
            return None
        del resumable[secret]
        rooms = sorted(old.chat.joined)
        old.fail(limits.CLOSE_RESUMED, "resumed on another connection")
        return rooms

    def detach(self, link) -> None:
        chat = self.chat
        if chat is not None:
            resumable = self.factory.clients.resumable
            if resumable.get(chat.resume_secret) is self:
                del resumable[chat.resume_secret]
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        chat, self.chat = self.chat, None
        if chat is not None:
            chat.close()

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary:
            self.fail(limits.CLOSE_UNSUPPORTED_DATA, "chatd.v1 frames are JSON text")

    def received(self, payload: bytes, isBinary: bool) -> None:
        chat = self.chat
        if chat is not None:
            chat.receive(payload, time.monotonic())
            if chat.identity is not None:
                self._watch_expiry()

    def _watch_expiry(self) -> None:
        """Keep one timer at the session's deadline (a token's exp plus the grace)."""
        chat = self.chat
        deadline = chat.deadline() if chat is not None else None
        if deadline == self._deadline:
            return
        self._deadline = deadline
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if deadline is not None:
            from twisted.internet import reactor

            self._expiry = reactor.callLater(max(0.0, deadline - time.time()), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.chat is not None:
            self.chat.check_expiry(time.time())

    # -- the session's Output ----------------------------------------------
    @property
    def writable(self) -> bool:
        link = self.link
        return link is not None and link.open

    def send_payload(self, payload: bytes) -> None:
        """One frame to this client, behind a paged history still going out."""
        link = self.link
        if link is None or not link.open:
            return
        if link.held is None:
            self.sendMessage(payload, False)
            return
        reason = link.put(payload)
        if reason is not None:
            self._dropped(reason)

    def send_pages(self, pages: HistoryPages) -> None:
        """Hold the link: each page as the transport drains, everything else behind."""
        link = self.link
        if link is None or not link.open:
            return
        pages.wake = link.drain
        link.hold()
        reason = link.put(pages, None)
        if reason is not None:
            self._dropped(reason)
            return
        link.drain()
