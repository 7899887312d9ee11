"""The per-message hot path: one message in, N frames out.

Everything chatd delivers goes through ``broadcast``. It is shaped for the
common case: the WebSocket frame is encoded once per message and the same
``bytes`` object is queued for every recipient, so the cost per recipient in
the loop is a list append and a few attribute reads. A connection that
negotiated permessage-deflate without server context takeover (chatd's
default: ``chatd.deflate`` says why) is no different: the message is
deflated once per window size, by one compressor for the whole process
(``shared_deflate``), and that frame is shared the same way (its link's
``deflate`` says the window; the plain path of the loop does not even read
it). Only a connection with context takeover
(``--compression-context-takeover``) gets its own copy, because its
compressor state is its own (RFC 7692): its link's ``send_message`` frames
and deflates each message itself.

Writes are coalesced per reactor turn: at the end of the turn (``Outbox``)
each connection's queued frames are joined and written once. On a plain TCP
connection whose Twisted buffer is empty they go straight to the socket
(``chatd.internals.write``, which says what it assumes of Twisted and how
that is checked), so a delivery costs one ``send`` and no ``epoll_ctl``
(Twisted would register the socket for writability, wake up, write, and
unregister it: two more system calls and a pass through its write path per
connection and turn);
whatever the kernel does not take goes to the transport, which buffers it
and tells us when it is full. Every other byte a connection sends (pongs,
replies, the close frame) joins the same queue while it is not empty, so the
order on the wire is the order of the calls.

Backpressure lives here too, because it is checked on every write: each
connection has a ``Link`` registered as its transport's push producer. The
transport pauses the link when its buffer passes Twisted's bufferSize
(64 KiB); from then on every byte handed to the transport is counted,
whatever produced it (fan-out here; replies, pongs and the rest through
``Link.charge``, which the connection's ``sendData`` calls), and once a
client is more than ``max_backlog`` behind, the link stops writing and asks
its owner to close it. Memory per slow client is therefore bounded by
bufferSize + one message + max_backlog, whatever the publishers or the
client itself do. A ``Budget`` shared by all links bounds the sum: past it
the server is overloaded, and a client that is behind at all is dropped
(close 1013, try again later).

A link can also *hold* (``hold``/``put``/``drain``): while a long reply (a
room's history, in pages) goes out at the pace the client reads it, what
else is sent to the link waits behind it, in order, counted against the
same ``max_backlog``. Holding swaps ``send_message`` for a function that
queues the payload (and sets ``deflate`` to 0, so that a link sharing
deflated frames calls it too), so ``broadcast`` pays nothing for it: a
holding link is simply one that looks paused. A pending paged reply counts as
``PAGER_CHARGE`` bytes (the page it renders and what it reads ahead; half
of ``max_backlog`` if that is less); the
pages themselves are written only when the transport has room (when it
resumes the link), so they are never more than a page ahead of the socket.
A pager may answer ``b""``: its next page is being read (from Redis), and it
calls ``drain`` again when it is here.

This module knows nothing of Autobahn, rooms or protocols: it moves bytes.
Its one reach into Twisted's TCP transport is in ``chatd.internals``
(``write`` and ``direct_socket``, imported from there: ``Link.drain`` calls
``write``, and ``Link.flush`` keeps an inline copy of it).
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from struct import pack
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer

# The direct socket write reaches into Twisted's TCP transport: chatd.internals says how.
from chatd.internals import direct_socket, write

OP_TEXT = 0x81  # FIN + text opcode
OP_BINARY = 0x82  # FIN + binary opcode
RSV1 = 0x40  # "compressed" (RFC 7692), on a message's first frame

PAGER_CHARGE = 128 * 1024  # what a pending paged reply counts as, against max_backlog
DRAIN_PER_TURN = 256 * 1024  # bytes a holding link writes per reactor turn, at most
MEM_LEVEL = 8  # zlib's memory level for deflating (its default, as Autobahn's)


def encode_frame(payload: bytes, binary: bool, rsv1: bool = False) -> bytes:
    """One unmasked, unfragmented server-to-client frame (RFC 6455 5.2)."""
    first = OP_BINARY if binary else OP_TEXT
    if rsv1:
        first |= RSV1
    n = len(payload)
    if n < 126:
        header = pack("!BB", first, n)
    elif n < 65536:
        header = pack("!BBH", first, 126, n)
    else:
        header = pack("!BBQ", first, 127, n)
    return header + payload


# One compressor per window size, for the whole process.
_shared: dict[int, Any] = {}


def shared_deflate(payload: bytes, bits: int) -> bytes:
    """``payload`` deflated on its own with a ``bits`` window, less the 4-byte tail.

    The compressor is the process's one for ``bits``; ``Z_FULL_FLUSH`` resets
    its dictionary after each message, so nothing of one message is used for
    the next, and the output equals a fresh compressor's.
    """
    c = _shared.get(bits)
    if c is None:
        c = _shared[bits] = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, MEM_LEVEL
        )
    try:
        out = c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH)
    except BaseException:  # (MemoryError) its state is unknown now: the next call makes another
        _shared.pop(bits, None)
        raise
    return out[:-4]


def deflate_frame(payload: bytes, binary: bool, bits: int) -> bytes:
    """The frame of one message for a recipient without context takeover.

    Deflated (RSV1 set) unless deflating does not make it smaller (tiny
    messages): RFC 7692 lets each message be sent compressed or not.
    """
    data = shared_deflate(payload, bits)
    if len(data) >= len(payload):
        return encode_frame(payload, binary)
    return encode_frame(data, binary, rsv1=True)


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
        "deflate",
        "draining",
        "held",
        "held_bytes",
        "max_backlog",
        "on_drop",
        "open",
        "own_deflate",
        "own_send",
        "paused",
        "pending",
        "send_message",
        "sock",
        "stalled",
        "transport",
    )

    def __init__(
        self,
        transport: ITransport,
        max_backlog: int,
        on_drop: Callable[[str], object],
        send_message: Callable[[bytes, bool], object] | None = None,
        budget: Budget = UNLIMITED,
        deflate: int = 0,
    ) -> None:
        self.transport = transport
        # Set for a compressing connection: it frames (and deflates) a message
        # itself. ``broadcast`` calls it only when ``deflate`` is 0 (context
        # takeover: its compressor is its own). While the link holds, this is
        # ``_hold`` and the real one is ``own_send``.
        self.send_message = send_message
        # Not 0 for a compressing connection without server context takeover: the
        # window bits of the deflated frame ``broadcast`` shares with it. 0 while
        # the link holds (the real one is then ``own_deflate``).
        self.deflate = deflate
        self.own_deflate = 0
        self.own_send: Callable[[bytes, bool], object] | None = None
        # Called (after the fan-out loop) when a link is given up on: the reason
        # is "backlog" for a slow consumer, "overload" for one that is behind
        # while the budget is spent, or "error" for a failed write.
        self.on_drop = on_drop
        self.max_backlog = max_backlog
        self.budget = budget
        self.open = True
        self.stalled = False  # the transport paused us: its buffer is full
        self.paused = False  # what broadcast sees: stalled, or holding
        # Bytes counted against max_backlog (and the budget): what was handed to
        # the transport since it paused us, plus what is held.
        self.backlog = 0
        self.pending: list[bytes] | None = None  # queued this reactor turn
        self.held: deque[tuple[bytes | Iterator[bytes], bool | None]] | None = None
        # ^ while holding: (payload, binary) or (pager, None)
        self.held_bytes = 0
        self.draining = False
        self.sock = direct_socket(transport)

    # IPushProducer: the transport tells us when its buffer is full or drained.
    def pauseProducing(self) -> None:
        self.stalled = self.paused = True

    def resumeProducing(self) -> None:
        self.stalled = False
        self.budget.total -= self.backlog - self.held_bytes
        self.backlog = self.held_bytes
        if self.held is None:
            self.paused = False
        else:
            self.drain()

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        """Write nothing more; give back what this link held of the budget."""
        self.open = False
        self.budget.total -= self.backlog
        self.backlog = 0
        self.held = None
        self.held_bytes = 0

    def charge(self, n: int) -> str | None:
        """Count ``n`` more bytes against the bounds; past one, close and say which."""
        self.backlog += n
        self.budget.total += n
        if self.backlog > self.max_backlog:
            reason = "backlog"
        elif self.budget.total > self.budget.limit:
            reason = "overload"
        else:
            return None
        self.close()
        return reason

    # -- holding: a paged reply goes out first, everything else waits behind it
    def hold(self) -> None:
        """From now on what is sent to this link waits (counted) until ``drain`` empties."""
        if self.held is not None:
            return
        self.held = deque()
        self.own_send = self.send_message
        self.send_message = self._hold
        self.own_deflate, self.deflate = self.deflate, 0  # so broadcast calls _hold
        self.paused = True  # so broadcast counts what it hands to _hold

    def _hold(self, payload: bytes, binary: bool) -> None:
        # From broadcast, which has counted it already (a holding link is "paused").
        assert self.held is not None  # _hold is send_message only while holding
        self.held.append((payload, binary))
        self.held_bytes += len(payload)

    def put(self, item: bytes | Iterator[bytes], binary: bool | None = False) -> str | None:
        """Queue a payload, or (``binary`` None) an iterator of text payloads, while holding.

        Returns a reason ("backlog", "overload") if that passed a bound: the
        link is then closed and the caller must tell its owner.
        """
        size = self.pager_charge() if binary is None else len(cast(bytes, item))
        reason = self.charge(size)
        if reason is not None:
            return reason
        assert self.held is not None  # put is for a holding link
        self.held.append((item, binary))
        self.held_bytes += size
        return None

    def pager_charge(self) -> int:
        # (half the bound if that is less: a tiny --max-backlog still lets one through)
        return min(PAGER_CHARGE, self.max_backlog // 2)

    def drain(self) -> None:
        """Write what is held while the transport takes it; stop holding once all is out."""
        held = self.held
        if held is None or self.draining:
            return
        self.draining = True
        try:
            if self.pending is not None:
                self.flush()  # what was queued before goes first
            left = DRAIN_PER_TURN
            while held and self.open and not self.stalled:
                if left <= 0:  # others get their turn; the rest in the next one
                    from twisted.internet import reactor

                    reactor.callLater(0, self.drain)
                    return
                item, binary = held[0]
                if binary is None:  # a pager: its next page, or it is done
                    try:
                        payload = next(cast(Iterator[bytes], item), None)
                    except Exception:  # e.g. its database read failed: give up on the link
                        self.close()
                        self.on_drop("error")
                        return
                    if payload is None:
                        held.popleft()
                        self._unhold(self.pager_charge())
                        continue
                    if not payload:  # b"": it waits for a read, and calls drain when done
                        return
                    binary = False
                else:
                    payload = cast(bytes, item)
                    held.popleft()
                    self._unhold(len(payload))
                left -= len(payload)
                if self.own_send is not None:
                    self.own_send(payload, binary)
                else:
                    write(self.transport, self.sock, encode_frame(payload, binary))
            if not held and self.open:
                self.held = None
                self.send_message, self.own_send = self.own_send, None
                self.deflate, self.own_deflate = self.own_deflate, 0
                self.paused = self.stalled
        finally:
            self.draining = False

    def _unhold(self, n: int) -> None:
        self.held_bytes -= n
        self.backlog -= n
        self.budget.total -= n

    def queue(self, data: bytes) -> bool:
        """Append ``data`` behind frames queued this turn; False if none are."""
        if self.pending is None:
            return False
        self.pending.append(data)
        return True

    def flush(self) -> None:
        """Write what was queued this turn: to the socket if nothing is ahead of it."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        # internals.write(self.transport, self.sock, data), inline: this is the hot
        # path. Its reach into the transport is listed and checked in chatd.internals;
        # self.sock is None (so this is transport.write) unless DIRECT_WRITE_OK.
        # (The ignores: these are tcp.Connection's, which ITransport does not declare.)
        t = self.transport
        sock = self.sock
        if (
            sock is not None
            and not t._tempDataBuffer  # type: ignore[attr-defined]
            and t.offset >= len(t.dataBuffer)  # type: ignore[attr-defined]
            and t.connected  # type: ignore[attr-defined]
            and not t.disconnecting  # type: ignore[attr-defined]
        ):
            try:
                sent = sock.send(data)
            except OSError:  # would block, or broken: the transport finds out which
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)


class Outbox:
    """The links with frames queued this reactor turn, flushed once at its end."""

    def __init__(self, call_soon: Callable[[Callable[[], object]], object] | None = None):
        self.dirty: list[Link] = []
        self._call_soon = call_soon

    def add(self, link: Link) -> None:
        if not self.dirty:
            call_soon = self._call_soon
            if call_soon is None:
                from twisted.internet import reactor

                call_soon = self._call_soon = lambda f: reactor.callLater(0, f)
            call_soon(self.flush)
        self.dirty.append(link)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for link in dirty:
            try:
                link.flush()
            except Exception:  # one broken connection must not cost the others
                link.close()
                link.on_drop("error")


OUTBOX = Outbox()


def broadcast(links: Iterable[Link], payload: bytes, binary: bool, outbox: Outbox = OUTBOX) -> int:
    """Deliver one message to every open link; return how many got it.

    Links that fall too far behind, or whose write raises, are closed and
    told only after the loop, so one bad recipient never costs the others
    their copy and the caller's collection is not changed while iterated.

    The frame is encoded once, and deflated at most once per window size
    (``Link.deflate``): every recipient of the same kind queues the same
    ``bytes``. What a paused link is charged is the payload's size, deflated
    or not.
    """
    frame: bytes | None = None
    deflated: dict[int, bytes] | None = None
    shared_bits, shared = 0, b""  # the last window size's deflated frame
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
                pending = link.pending
                if pending is None:
                    link.pending = [frame]
                    outbox.add(link)
                else:
                    pending.append(frame)
            elif bits := link.deflate:
                if bits != shared_bits:  # (nearly always one window size: no lookup)
                    if deflated is None:
                        deflated = {}
                    got = deflated.get(bits)
                    if got is None:
                        got = deflated[bits] = deflate_frame(payload, binary, bits)
                    shared, shared_bits = got, bits
                pending = link.pending
                if pending is None:
                    link.pending = [shared]
                    outbox.add(link)
                else:
                    pending.append(shared)
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
