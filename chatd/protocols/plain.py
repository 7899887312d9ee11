"""The seed's chat on "/": every text message goes to everyone as ``ID<port>: <text>``.

Plain clients are members of the chat room ``lobby``, so later protocols can
share that room with them.
"""

from __future__ import annotations

from chatd import limits
from chatd.fanout import Link
from chatd.protocols.base import Connection

LOBBY = "chat/lobby"


def sender_id(peer: object, fallback: int) -> bytes:
    """``ID<remote TCP port>``, as the seed named senders."""
    port = getattr(peer, "port", None)
    return b"ID%d" % (port if isinstance(port, int) else fallback)


class PlainChat(Connection):
    kind = "plain"

    def attach(self) -> None:
        assert self.link is not None
        self.prefix = sender_id(self.transport.getPeer(), id(self) & 0xFFFF) + b": "
        self.hub.join(LOBBY, self.link)

    def detach(self, link: Link) -> None:
        self.hub.leave(LOBBY, link)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary:  # refuse at the first frame, before buffering any of it
            self.fail(limits.CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted on /")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.hub.publish(LOBBY, self.prefix + payload, False)
