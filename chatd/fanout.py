"""The per-message hot path: one message in, N frames out.

Everything chatd delivers goes through ``broadcast``. It is shaped for the
common case: the WebSocket frame is encoded once per message and the same
``bytes`` object is handed to every recipient's transport, so the cost per
recipient is one ``transport.write`` and a few attribute reads. Only a
connection that negotiated permessage-deflate gets its own copy, because its
compressor state is its own (RFC 7692 context takeover).

Backpressure lives here too, because it is checked on every write: each
connection has a ``Link`` registered as its transport's push producer. The
transport pauses the link when its buffer passes Twisted's bufferSize
(64 KiB); from then on every byte is counted, and once a client is more than
``max_backlog`` behind, the link stops writing and asks its owner to close it.
Memory per slow client is therefore bounded by bufferSize + one message +
max_backlog, whatever the publishers do. A ``Budget`` shared by all links
bounds the sum: past it the server is overloaded, and a client that is
behind at all is dropped (close 1013, try again later).

This module knows nothing of Autobahn, rooms or protocols: it moves bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from struct import pack

from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer

OP_TEXT = 0x81  # FIN + text opcode
OP_BINARY = 0x82  # FIN + binary opcode


def encode_frame(payload: bytes, binary: bool) -> bytes:
    """One unmasked, unfragmented server-to-client frame (RFC 6455 5.2)."""
    first = OP_BINARY if binary else OP_TEXT
    n = len(payload)
    if n < 126:
        header = pack("!BB", first, n)
    elif n < 65536:
        header = pack("!BBH", first, 126, n)
    else:
        header = pack("!BBQ", first, 127, n)
    return header + payload


class Budget:
    """Unsent bytes over every paused link of a server, against one limit."""

    __slots__ = ("limit", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0


UNLIMITED = Budget(2**63)


@implementer(IPushProducer)
class Link:
    """A connection's outgoing side, as the fan-out sees it."""

    __slots__ = (
        "__weakref__",
        "backlog",
        "budget",
        "max_backlog",
        "on_drop",
        "open",
        "paused",
        "send_message",
        "transport",
    )

    def __init__(
        self,
        transport: ITransport,
        max_backlog: int,
        on_drop: Callable[[str], object],
        send_message: Callable[[bytes, bool], object] | None = None,
        budget: Budget = UNLIMITED,
    ) -> None:
        self.transport = transport
        # Set for a compressing connection: it frames (and deflates) itself.
        self.send_message = send_message
        # Called (after the fan-out loop) when a link is given up on: the reason
        # is "backlog" for a slow consumer, "overload" for one that is behind
        # while the budget is spent, or "error" for a failed write.
        self.on_drop = on_drop
        self.max_backlog = max_backlog
        self.budget = budget
        self.open = True
        self.paused = False
        self.backlog = 0  # bytes handed over since the transport paused us

    # IPushProducer: the transport tells us when its buffer is full or drained.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.budget.total -= self.backlog
        self.backlog = 0

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        """Write nothing more; give back what this link held of the budget."""
        self.open = False
        self.budget.total -= self.backlog
        self.backlog = 0


def broadcast(links: Iterable[Link], payload: bytes, binary: bool) -> int:
    """Deliver one message to every open link; return how many got it.

    Links that fall too far behind, or whose write raises, are closed and
    told only after the loop, so one bad recipient never costs the others
    their copy and the caller's collection is not changed while iterated.
    """
    frame: bytes | None = None
    size = len(payload)
    delivered = 0
    dropped: list[tuple[Link, str]] | None = None
    for link in links:
        if not link.open:
            continue
        if link.paused:
            link.backlog += size
            link.budget.total += size
            if link.backlog > link.max_backlog or link.budget.total > link.budget.limit:
                reason = "backlog" if link.backlog > link.max_backlog else "overload"
                link.close()
                if dropped is None:
                    dropped = []
                dropped.append((link, reason))
                continue
        try:
            if link.send_message is None:
                if frame is None:
                    frame = encode_frame(payload, binary)
                link.transport.write(frame)
            else:
                link.send_message(payload, binary)
        except Exception:  # a broken transport must not stop the loop
            link.close()
            if dropped is None:
                dropped = []
            dropped.append((link, "error"))
            continue
        delivered += 1
    if dropped is not None:
        for link, reason in dropped:
            link.on_drop(reason)
    return delivered
