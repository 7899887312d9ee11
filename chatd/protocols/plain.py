"""The seed's chat on "/": every text message goes to everyone as ``ID<port>: <text>``.

Plain clients are members of the chat room ``lobby`` under the name
``ID<port>``: what they send is stored and numbered like any chat message and
shows to chatd.v1 clients with ``from: "ID<port>"``; what v1 clients send in
``lobby`` reaches plain clients as ``<nick>: <text>``, each line after the
first indented by two spaces (``plain_text``). Plain clients get no
history and no presence (the seed had neither) and, having no way to read an
error, are closed with 1008 when they send faster than the rate limit and with
1009 when a text is over ``--max-text`` bytes of UTF-8 (as v1 clients, they
cannot fill the history with bigger ones). An empty or whitespace-only text is
dropped: not stored, not sent (v1 members never see an empty text).
"""

from __future__ import annotations

import re
import time

from chatd import limits
from chatd.fanout import Link
from chatd.history import Message
from chatd.protocols.base import Connection, Refused

LOBBY = "lobby"


def sender_id(peer: object, fallback: int) -> str:
    """``ID<remote TCP port>``, as the seed named senders."""
    port = getattr(peer, "port", None)
    return f"ID{port if isinstance(port, int) else fallback}"


# Control characters other than tab and line breaks: shown as U+FFFD, so no
# escape sequence reaches a terminal. (Line breaks are str.splitlines' own:
# \n \v \f \r \x1c \x1d \x1e \x85 U+2028 U+2029, and \r\n.)
_CONTROLS = dict.fromkeys(
    (*range(0x00, 0x09), *range(0x0E, 0x1C), 0x1F, 0x7F, *range(0x80, 0x85), *range(0x86, 0xA0)),
    "\ufffd",
)
_ODD = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
CONTINUATION = "\n  "  # what starts each line of a message after its first


def plain_text(text: str) -> str:
    """``text`` as one plain-chat message shows it: no line can pass for another sender's.

    Every line break (any of Unicode's) becomes ``\\n`` followed by two spaces,
    so each line after the first is indented, and a sender's line always
    starts at the left with ``<nick>: ``; other control characters become
    U+FFFD.
    """
    if _ODD.search(text) is None:
        return text
    return CONTINUATION.join(text.translate(_CONTROLS).splitlines())


class PlainRenderer:
    """Chat events as the seed showed them: ``<from>: <text>``, no presence; an edit
    as ``<from> (edited): <text>``, no deletes or reactions (a line cannot be
    taken back)."""

    def message(self, msg: Message) -> bytes | None:
        if msg.kind:
            if msg.kind != "edit":
                return None
            return f"{msg.sender} (edited): {plain_text(msg.text)}".encode()
        return f"{msg.sender}: {plain_text(msg.text)}".encode()

    def presence(self, room: str, nick: str, event: str, user: str) -> None:
        return None

    def reset(self, event: object) -> None:
        return None

    def typing(self, room: str, user: str, name: str) -> None:
        return None

    def read(self, room: str, user: str, name: str, id: int) -> None:
        return None


class PlainChat(Connection):
    kind = "plain"
    may_post = True

    def onConnect(self, request):
        policy = self.factory.policy
        if policy.enabled:  # (the plain chat has no hello: a token comes with the upgrade)
            identity = self.identify(request, policy.required)
            right = policy.chat_right(identity, LOBBY)
            if not right:
                raise Refused(403, "forbidden", f"no right to read {LOBBY}")
            self.may_post = right == "rw"
        return None

    def attach(self) -> None:
        assert self.link is not None
        s = self.factory.settings
        self.bucket = limits.TokenBucket(s.rate, s.rate_burst, 0, time.monotonic())
        transport = self.transport
        assert transport is not None  # attached once open
        if self.identity is not None:
            self.nick = self.identity.name
        else:
            self.nick = sender_id(transport.getPeer(), id(self) & 0xFFFF)
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
        if not self.may_post:
            self.fail(limits.CLOSE_FORBIDDEN, f"no right to post in {LOBBY}")
            return
        max_text = self.factory.settings.max_text
        if len(payload) > max_text:  # (UTF-8 already: its length is the text's size)
            self.fail(limits.CLOSE_MESSAGE_TOO_BIG, f"a message is at most {max_text} bytes")
            return
        text = payload.decode("utf-8")
        if not text.strip():
            return  # nothing to say: not stored, not sent
        if self.waiting is not None:
            self.waiting.append(text)  # bounded: the rate limit closes a flood
        else:
            self.post(text)

    def post(self, text: str) -> None:
        if self.link is not None:
            self.hub.post(LOBBY, self.nick, text).addErrback(self._unavailable)

    def _unavailable(self, failure: object) -> None:
        self.fail(limits.CLOSE_TRY_AGAIN_LATER, "chat history unavailable, message not sent")
