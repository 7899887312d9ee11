"""The seed's chat on "/": every text message goes to everyone as ``ID<port>: <text>``.

Plain clients are members of the chat room ``lobby`` under the name
``ID<port>``: what they send is stored and numbered like any chat message and
shows to chatd.v1 clients with ``from: "ID<port>"``; what v1 clients send in
``lobby`` reaches plain clients as ``<nick>: <text>``. Plain clients get no
history and no presence (the seed had neither) and, having no way to read an
error, are closed with 1008 when they send faster than the rate limit.
"""

from __future__ import annotations

import time

from chatd import limits
from chatd.fanout import Link
from chatd.history import Message
from chatd.protocols.base import Connection

LOBBY = "lobby"


def sender_id(peer: object, fallback: int) -> str:
    """``ID<remote TCP port>``, as the seed named senders."""
    port = getattr(peer, "port", None)
    return f"ID{port if isinstance(port, int) else fallback}"


class PlainRenderer:
    """Chat events as the seed showed them: ``<from>: <text>``, no presence."""

    def message(self, msg: Message) -> bytes:
        return f"{msg.sender}: {msg.text}".encode()

    def presence(self, room: str, nick: str, event: str) -> None:
        return None

    def reset(self, event: object) -> None:
        return None


class PlainChat(Connection):
    kind = "plain"

    def attach(self) -> None:
        assert self.link is not None
        s = self.factory.settings
        self.bucket = limits.TokenBucket(s.rate, s.rate_burst, 0, time.monotonic())
        self.nick = sender_id(self.transport.getPeer(), id(self) & 0xFFFF)
        # Ports can repeat across client hosts, so plain names need not be unique.
        # Until the hub has answered the join (at once in one process, after
        # Redis in a cluster), what the client sends waits, so it sees its own.
        self.waiting: list[str] | None = []
        d = self.hub.chat_join(LOBBY, self.link, self.nick, "plain", unique=False, snapshot=False)
        d.addCallbacks(self._joined, self._unavailable)

    def _joined(self, _: object) -> None:
        waiting, self.waiting = self.waiting, None
        for text in waiting or ():
            self.post(text)

    def detach(self, link: Link) -> None:
        self.hub.chat_leave(LOBBY, link)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary:  # refuse at the first frame, before buffering any of it
            self.fail(limits.CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted on /")

    def received(self, payload: bytes, isBinary: bool) -> None:
        if self.bucket.take(time.monotonic()) != limits.TokenBucket.OK:
            self.factory.stats.rate_limited[self.kind] += 1
            self.fail(limits.CLOSE_POLICY_VIOLATION, "rate limit: too many messages")
            return
        text = payload.decode("utf-8")
        if self.waiting is not None:
            self.waiting.append(text)  # bounded: the rate limit closes a flood
        else:
            self.post(text)

    def post(self, text: str) -> None:
        if self.link is not None:
            self.hub.post(LOBBY, self.nick, text).addErrback(self._unavailable)

    def _unavailable(self, failure: object) -> None:
        self.fail(limits.CLOSE_TRY_AGAIN_LATER, "chat history unavailable, message not sent")
