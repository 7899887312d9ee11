"""permessage-deflate (RFC 7692) that scales: compress once per message, inflate per message.

What Autobahn's ``PerMessageDeflate`` costs, per connection: a zlib
compressor (about 256 KiB of zlib state with its default window and memory
level) and an inflater (a 32 KiB window and about 7 KiB of state), each made
on first use and kept for the connection's life, even when neither side
takes over context between messages; and every delivery is deflated for
that connection alone. Measured on chatd before this module (``python -m
bench.deflate``, column "base deflate" of bench/RESULTS-deflate.md): 92 KiB
of server memory per compressing connection after one message, 207 KiB
after 600, against 4.5 KiB for a plain one, and about 3.5 times the CPU per
delivery; with this module 3-5 KiB, within 0.5 KiB of a plain one, and
1.0-1.2 times its CPU.

chatd negotiates, by default:

- ``server_no_context_takeover`` (announced even when the client did not
  ask: RFC 7692 7.1.1.1 allows it): every message chatd sends is deflated
  on its own. Its deflated bytes are then the same for every recipient that
  negotiated the same window, so the fan-out (``chatd.fanout.broadcast``)
  deflates a message once per window size and queues that one frame for
  all of them, as it does the plain frame for plain recipients. The
  deflating is done by one zlib compressor per window size for the whole
  process (``chatd.fanout.shared_deflate``), flushed with ``Z_FULL_FLUSH``,
  which empties its dictionary: what follows starts afresh, so each
  message's output is exactly what a fresh compressor would give (checked
  in tests/test_deflate.py).
- ``client_no_context_takeover`` (a server may always include it: RFC 7692
  7.1.1.2): the client deflates every message on its own too, so a
  connection's inflater lives from a message's first frame to its last
  and is dropped there (``Deflate.end_decompress_message``). Between
  messages a compressing connection keeps no zlib object at all, and a
  client's compressed input can make chatd hold at most one message's
  inflate state, bounded (as by Autobahn) to ``--max-message-size`` of
  output: past it the message is refused with close 1009. A fresh
  ``zlib.decompressobj`` per message is the cheapest way: making one takes
  about 0.1 us, less than ``copy()`` of a pristine one (0.16 us), and a
  whole chat message through a fresh one about 1.5 us against 1.8 us
  through a copy (timeit, zlib 1.2.13; bench/RESULTS-deflate.md).

With ``--compression-context-takeover`` (``compression_context_takeover``)
chatd does not ask for ``server_no_context_takeover``: each such connection
keeps its own compressor (``Deflate.frame``) and gets its own deflated copy
of every message, which is smaller on the wire when messages resemble each
other, at Autobahn's old memory and CPU cost. A client that asks for
``server_no_context_takeover`` itself shares the frame either way. The
client's direction is always without context takeover.

``Deflate`` stands in for Autobahn's ``PerMessageDeflate`` on a chatd
connection (``chatd.internals.ServerInternals.use_compressor``): it has the
methods Autobahn's frame parser and ``sendMessage`` call, and ``frame``
for chatd's own ``sendMessage``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any

from autobahn.exception import PayloadCorruptError, PayloadExceededError
from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)

from chatd.fanout import MEM_LEVEL, deflate_frame, encode_frame

TAIL = b"\x00\x00\xff\xff"  # the empty stored block a flush ends with; not sent (RFC 7692 7.2.1)


class Deflate:
    """A connection's permessage-deflate: parameters, and zlib state only while needed.

    ``shared`` (server_no_context_takeover): what chatd sends is deflated by
    ``shared_deflate`` and the fan-out may give this connection the frame it
    gives every connection with the same ``bits``; otherwise the connection
    has its own ``compressor``, made at its first message and kept (context
    takeover). ``decompressor`` exists only while a compressed message is
    arriving.
    """

    EXTENSION_NAME = PerMessageDeflate.EXTENSION_NAME

    __slots__ = (
        "bits",
        "client_bits",
        "compressor",
        "decompressor",
        "max_message_size",
        "message_compressor",
        "received",
        "shared",
    )

    def __init__(
        self, shared: bool, bits: int, client_bits: int, max_message_size: int | None
    ) -> None:
        self.shared = shared
        self.bits = bits  # server_max_window_bits: what chatd deflates with
        self.client_bits = client_bits  # client_max_window_bits: what the client does
        self.max_message_size = max_message_size
        self.compressor: Any = None  # context takeover only
        self.message_compressor: Any = None  # Autobahn's own sendMessage path, per message
        self.decompressor: Any = None
        self.received = 0  # inflated bytes of the message arriving

    @classmethod
    def of(cls, pmc: PerMessageDeflate) -> Deflate:
        """The stand-in for what Autobahn negotiated (its public parameters)."""
        return cls(
            bool(pmc.server_no_context_takeover),
            pmc.server_max_window_bits,
            pmc.client_max_window_bits,
            pmc.max_message_size,
        )

    def __repr__(self) -> str:
        return (
            f"Deflate(shared={self.shared}, bits={self.bits}, client_bits={self.client_bits}, "
            f"max_message_size={self.max_message_size})"
        )

    # -- sending -------------------------------------------------------------------
    def frame(self, payload: bytes, binary: bool) -> bytes:
        """One message as a frame for this connection (chatd's sendMessage and fan-out)."""
        if self.shared:
            return deflate_frame(payload, binary, self.bits)
        c = self.compressor
        if c is None:
            c = self.compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.bits, MEM_LEVEL
            )
        data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
        return encode_frame(data[:-4], binary, rsv1=True)

    # Autobahn's sendMessage with fragments (chatd does not send any; kept correct all
    # the same): one compressor for the message's parts, dropped at its end.
    def start_compress_message(self) -> None:
        if self.shared:
            self.message_compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.bits, MEM_LEVEL
            )
        else:
            if self.compressor is None:
                self.compressor = zlib.compressobj(
                    zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.bits, MEM_LEVEL
                )
            self.message_compressor = self.compressor

    def compress_message_data(self, data: bytes) -> bytes:
        return bytes(self.message_compressor.compress(data))

    def end_compress_message(self) -> bytes:
        data = self.message_compressor.flush(zlib.Z_SYNC_FLUSH)
        self.message_compressor = None
        return bytes(data[:-4])

    # -- receiving (Autobahn's frame parser calls these) --------------------------------
    def start_decompress_message(self) -> None:
        self.decompressor = zlib.decompressobj(-self.client_bits)
        self.received = 0

    def decompress_message_data(self, data: bytes, max_output_len: int | None = None) -> bytes:
        """As Autobahn's: output capped by the message size limit, past it PayloadExceededError."""
        d = self.decompressor
        if d is None:  # (Autobahn calls start first; this only guards against misuse)
            raise PayloadCorruptError("permessage-deflate data outside a message")
        caps = []
        if self.max_message_size is not None:
            caps.append(self.max_message_size - self.received)
        if max_output_len is not None:
            caps.append(max_output_len)
        try:
            if not caps:
                out = d.decompress(data)
            else:
                # zlib takes a max_length of 0 as "no limit": an exhausted budget is
                # capped at 1 byte, and any output then exceeds it.
                limit = min(caps)
                out = d.decompress(data, limit if limit > 0 else 1)
        except zlib.error as e:
            raise PayloadCorruptError(f"invalid permessage-deflate data: {e}") from e
        self.received += len(out)
        if caps and (d.unconsumed_tail or len(out) > min(caps)):
            self.decompressor = None  # the connection is failing: hold nothing more
            raise PayloadExceededError(
                "WebSocket message exceeds decompression limit "
                f"(max_message_size={self.max_message_size}, max_output_len={max_output_len})"
            )
        return bytes(out)

    def end_decompress_message(self) -> None:
        d, self.decompressor = self.decompressor, None  # nothing kept between messages
        if d is None:
            return
        try:
            d.decompress(TAIL)
        except zlib.error as e:
            raise PayloadCorruptError(f"invalid permessage-deflate data: {e}") from e


class Accept(PerMessageDeflateOfferAccept):
    """chatd's answer to a permessage-deflate offer.

    Always ``client_no_context_takeover``; ``server_no_context_takeover``
    unless ``context_takeover`` (and then still when the client asked for
    it). Autobahn's answer names ``server_no_context_takeover`` only when
    the client offered it; chatd's names it whenever it holds, so the client
    may drop its inflater between messages too.
    """

    def __init__(
        self, offer: PerMessageDeflateOffer, context_takeover: bool, max_message_size: int
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call] # Autobahn is untyped
            offer,
            request_no_context_takeover=True,
            no_context_takeover=None if context_takeover else True,
            max_message_size=max_message_size,
        )

    def get_extension_string(self) -> str:
        parts = [self.EXTENSION_NAME]
        if self.no_context_takeover or self.offer.request_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.offer.request_max_window_bits:
            parts.append(f"server_max_window_bits={self.offer.request_max_window_bits}")
        parts.append("client_no_context_takeover")
        return "; ".join(parts)


# One permessage-deflate offer as browsers and common clients send it (Chromium and
# python websockets: "permessage-deflate; client_max_window_bits"; Firefox and Safari:
# "permessage-deflate"), with each RFC 7692 parameter at most once and window bits
# 9-15 (those Autobahn accepts). Lower case, one offer, no quotes: anything else is
# for Autobahn's own parse (and its refusals).
_OFFER_PARAM = re.compile(
    rb"[ \t]*;[ \t]*(server_no_context_takeover|client_no_context_takeover"
    rb"|server_max_window_bits=(?:9|1[0-5])|client_max_window_bits(?:=(?:9|1[0-5]))?)"
)


def plain_offer(value: bytes) -> list[tuple[str, dict[str, list[Any]]]] | None:
    """A Sec-WebSocket-Extensions value as Autobahn's parse gives it, if it is one plain
    permessage-deflate offer (``_OFFER_PARAM``); None for anything else.

    Autobahn's ``_parseExtensionsHeader`` gives ``[(name, {param: [value]})]``,
    a value ``True`` for a parameter without one and the text after ``=``
    otherwise; for this grammar that is all it does, so what its
    ``succeedHandshake`` makes of the result (the offer, chatd's answer, or a
    refusal) is what it makes of Autobahn's own parse. tests/test_deflate.py
    compares the two paths' answers.
    """
    name = b"permessage-deflate"
    if not value.startswith(name):
        return None
    params: dict[str, list[Any]] = {}
    pos = len(name)
    while pos < len(value):
        m = _OFFER_PARAM.match(value, pos)
        if m is None:
            return None
        key, eq, bits = m.group(1).partition(b"=")
        k = key.decode("ascii")
        if k in params:
            return None  # a repeated parameter: Autobahn's refusal, the long way
        params[k] = [bits.decode("ascii") if eq else True]
        pos = m.end()
    return [("permessage-deflate", params)]


def acceptor(context_takeover: bool, max_message_size: int) -> Callable[[list[Any]], Accept | None]:
    """Autobahn's ``perMessageCompressionAccept``: the first permessage-deflate offer."""

    def accept(offers: list[Any]) -> Accept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return Accept(offer, context_takeover, max_message_size)
        return None

    return accept
