"""permessage-deflate that scales (chatd.deflate): negotiation, one shared frame, no state kept.

Negotiation includes the fast upgrade path: a browser's offer is taken there
(``chatd.deflate.plain_offer``) and gets, byte for byte, the answer and the
connection Autobahn's own handshake path gives it; every other offer still
goes that way.

In process (tests/inproc.py: the site ``twistd chatd`` serves, over
StringTransports), since what is checked is what the server holds and
writes, byte for byte; the clients are tests/wsclient.py's, offering what
Chromium offers. The same clients against Autobahn's own client and the
real loopback socket are in tests/test_compression.py.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from inproc import Site, connect, turn
from rawhttp import handshake
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wsclient import BINARY, TEXT, Client, Frame

from chatd import fanout
from chatd.deflate import Deflate, plain_offer
from chatd.fanout import Link, Outbox, broadcast, deflate_frame, shared_deflate
from chatd.protocols import base

CHROMIUM = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
CHAT = json.dumps(
    {"type": "message", "room": "lobby", "nick": "alice", "text": "see you at the standup " * 3}
).encode()


def extensions(c: Client) -> str:
    for line in c.response_headers.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-extensions":
            return value.strip()
    return ""


def deflated(data: bytes, bits: int = 15) -> bytes:
    """As a client without context takeover sends a message: on its own, less the tail."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflated(f: Frame) -> bytes:
    """A frame's message as a client without context takeover reads it (a fresh inflater)."""
    if f.rsv != 4:
        return f.payload
    return zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff")


def server_side(c: Client) -> Any:
    """The site's protocol for the client ``c`` (over inproc.Socket)."""
    return c.sock.t.protocol  # type: ignore[attr-defined]


# -- negotiation ------------------------------------------------------------------------


def test_a_chromium_offer_gets_no_context_takeover_both_ways() -> None:
    c = Site().client("/relay/n", headers=CHROMIUM)
    assert extensions(c) == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    pmc = server_side(c).compressor
    assert isinstance(pmc, Deflate) and pmc.shared and pmc.bits == 15


def test_the_context_takeover_option_keeps_the_server_context() -> None:
    site = Site("--compression-context-takeover")
    c = site.client("/relay/n", headers=CHROMIUM)
    assert extensions(c) == "permessage-deflate; client_no_context_takeover"
    assert not server_side(c).compressor.shared
    # a client that asks for server_no_context_takeover gets it (and the shared frame)
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; server_no_context_takeover"}
    c2 = site.client("/relay/n", headers=offer)
    assert extensions(c2) == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert server_side(c2).compressor.shared


def test_a_smaller_server_window_is_honoured() -> None:
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=10"}
    c = Site().client("/relay/w", headers=offer)
    assert extensions(c) == (
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; "
        "client_no_context_takeover"
    )
    assert server_side(c).compressor.bits == 10
    text = os.urandom(600).hex().encode() * 4  # repeats 2400 bytes back: beyond a 1 KiB window
    c.send_frame(TEXT, text)
    f = c.read_frame()
    assert f.rsv == 4
    assert zlib.decompressobj(-10).decompress(f.payload + b"\x00\x00\xff\xff") == text


# -- compress once, share the frame ------------------------------------------------------


def test_shared_deflate_is_a_fresh_compressor_every_time() -> None:
    """One compressor for the process, yet each message's bytes are those of a fresh one,
    and each decodes on its own."""
    messages = [CHAT, CHAT, b"x" * 5000, os.urandom(300), CHAT[:50], b"", CHAT]
    for m in messages:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15, fanout.MEM_LEVEL)
        fresh = (c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        out = shared_deflate(m, 15)
        if m:
            assert out == fresh
        assert zlib.decompressobj(-15).decompress(out + b"\x00\x00\xff\xff") == m


def test_a_message_that_does_not_shrink_goes_uncompressed() -> None:
    assert deflate_frame(b"hi", False, 15) == fanout.encode_frame(b"hi", False)
    assert deflate_frame(b"", True, 15) == fanout.encode_frame(b"", True)
    assert deflate_frame(CHAT, False, 15)[0] == fanout.OP_TEXT | fanout.RSV1


def test_broadcast_deflates_once_per_window_and_queues_the_same_bytes() -> None:
    calls: list[int] = []
    outbox = Outbox(call_soon=lambda f: None)  # flushed by hand below

    def own(payload: bytes, binary: bool) -> None:
        raise AssertionError("a link with a shared deflated frame is not sent to alone")

    def link(bits: int) -> Link:
        return Link(
            StringTransport(), 1 << 20, lambda reason: None, own if bits else None, deflate=bits
        )

    links = [link(15) for _ in range(5)] + [link(0) for _ in range(3)] + [link(10), link(10)]
    real = fanout.deflate_frame

    def counting(payload: bytes, binary: bool, bits: int) -> bytes:
        calls.append(bits)
        return real(payload, binary, bits)

    fanout.deflate_frame = counting  # type: ignore[assignment]
    try:
        assert broadcast(links, CHAT, False, outbox) == len(links)
    finally:
        fanout.deflate_frame = real  # type: ignore[assignment]
    assert sorted(calls) == [10, 15]  # once per window size, not per recipient
    queued = [lk.pending[0] for lk in links]  # type: ignore[index]
    assert all(q is queued[0] for q in queued[:5])  # one object, shared
    assert all(q is queued[5] for q in queued[5:8])
    assert queued[8] is queued[9]
    assert queued[5] == fanout.encode_frame(CHAT, False)
    assert queued[0] != queued[5] and queued[0][0] & fanout.RSV1
    # window sizes interleaved: still one deflate per size, each link the right frame
    calls.clear()
    mixed = [link(15), link(10), link(0), link(15), link(10), link(15)]
    fanout.deflate_frame = counting  # type: ignore[assignment]
    try:
        assert broadcast(mixed, CHAT, False, outbox) == len(mixed)
    finally:
        fanout.deflate_frame = real  # type: ignore[assignment]
    assert sorted(calls) == [10, 15]
    got = [lk.pending[0] for lk in mixed]  # type: ignore[index]
    assert got[0] is got[3] is got[5] and got[1] is got[4] and got[0] is not got[1]
    assert got[0] == deflate_frame(CHAT, False, 15) and got[1] == deflate_frame(CHAT, False, 10)
    assert got[2] == fanout.encode_frame(CHAT, False)


def test_a_room_of_deflate_members_gets_one_frame_all_decode() -> None:
    site = Site()
    members = [site.client("/relay/shared", headers=CHROMIUM) for _ in range(6)]
    plain = site.client("/relay/shared")
    for payload, opcode in ((CHAT, TEXT), (os.urandom(4096), BINARY), (CHAT * 40, TEXT)):
        plain.send_frame(opcode, payload)
        frames = [m.read_frame() for m in members]
        assert len({f.payload for f in frames}) == 1  # the same bytes for all
        assert all(f.opcode == opcode and inflated(f) == payload for f in frames)
        assert plain.read_frame() == Frame(True, 0, opcode, payload)
        if opcode == TEXT:  # text deflates: RSV1; random bytes do not shrink: sent as they are
            assert frames[0].rsv == 4 and len(frames[0].payload) < len(payload)
        else:
            assert frames[0].rsv == 0


def test_replies_to_one_client_are_deflated_too() -> None:
    """chatd.v1's replies (one connection's own, not the fan-out) go through Deflate.frame."""
    site = Site()
    c = site.client("/", headers={**CHROMIUM, "Sec-WebSocket-Protocol": "chatd.v1"})
    c.send_frame(TEXT, deflated(b'{"type":"hello","nick":"zed"}'), rsv=4)
    f = c.read_frame()
    assert json.loads(inflated(f))["type"] == "welcome"


# -- memory: no zlib state between messages -----------------------------------------------


def test_no_zlib_state_kept_per_connection_after_traffic() -> None:
    site = Site()
    a = site.client("/relay/mem", headers=CHROMIUM)
    b = site.client("/relay/mem", headers=CHROMIUM)
    chat = site.client("/", headers=CHROMIUM)
    for i in range(50):  # bounded: 50 messages each way
        a.send_frame(TEXT, deflated(CHAT + str(i).encode()), rsv=4)
        for c in (a, b):
            assert inflated(c.read_frame()) == CHAT + str(i).encode()
        chat.send_frame(TEXT, deflated(b"hello " * 20), rsv=4)
        assert inflated(chat.read_frame()).endswith(b"hello " * 20)
    for c in (a, b, chat):
        pmc = server_side(c).compressor
        assert isinstance(pmc, Deflate)
        assert pmc.compressor is None and pmc.message_compressor is None
        assert pmc.decompressor is None
        assert not hasattr(pmc, "__dict__")  # slots only: a few words per connection
        assert server_side(c).link.deflate == 15  # broadcast gives it the shared frame


def test_with_context_takeover_each_connection_has_its_own_compressor() -> None:
    """The contrast (and what --compression-context-takeover costs): a compressor kept."""
    site = Site("--compression-context-takeover")
    a = site.client("/relay/own", headers=CHROMIUM)
    b = site.client("/relay/own", headers=CHROMIUM)
    first: list[int] = []
    for _ in range(3):
        a.send_frame(TEXT, CHAT)
        fa, fb = a.read_frame(), b.read_frame()
        first.append(len(fa.payload))
        assert fa.rsv == fb.rsv == 4
    assert first[1] < first[0]  # the second refers back to the first
    for c in (a, b):
        pmc = server_side(c).compressor
        assert pmc.compressor is not None and pmc.decompressor is None
        assert server_side(c).link.deflate == 0  # broadcast calls send_message: its own copy


# -- bounded inflate ------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [1, 8])
def test_a_compressed_bomb_is_refused_with_1009_while_inflating(pieces: int) -> None:
    site = Site()  # --max-message-size 64K on "/"
    c = site.client("/", headers=CHROMIUM)
    blob = deflated(b"a" * (4 << 20))  # 4 MiB inflated, about 4 KiB on the wire
    assert len(blob) < 8192
    step = -(-len(blob) // pieces)
    parts = [blob[i : i + step] for i in range(0, len(blob), step)]
    for i, part in enumerate(parts):
        c.send_frame(TEXT if i == 0 else 0, part, fin=i == len(parts) - 1, rsv=4 if i == 0 else 0)
        if server_side(c).failedByMe:
            break
    assert c.expect_close() == 1009
    assert server_side(c).compressor.decompressor is None  # nothing held past the refusal


def test_a_message_just_under_the_limit_still_arrives() -> None:
    site = Site("--relay-max-size", "4K")
    a = site.client("/relay/edge", headers=CHROMIUM)
    payload = b"b" * 4096
    a.send_frame(BINARY, deflated(payload), rsv=4)
    assert inflated(a.read_frame()) == payload
    a.send_frame(BINARY, deflated(payload + b"!"), rsv=4)
    assert a.expect_close() == 1009


def test_a_client_that_keeps_its_context_anyway_is_refused_1007() -> None:
    """client_no_context_takeover is binding: a message that refers back to the one
    before cannot be inflated on its own, and the connection closes (1007)."""
    site = Site()
    c = site.client("/relay/ctx", headers=CHROMIUM)
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    c.send_frame(TEXT, (z.compress(CHAT) + z.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv=4)
    assert inflated(c.read_frame()) == CHAT
    c.send_frame(TEXT, (z.compress(CHAT) + z.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv=4)
    assert c.expect_close() == 1007


def test_a_paged_history_reaches_a_deflate_client_whole() -> None:
    """History pages go out through the link's hold (Link.drain): deflated there too."""
    site = Site("--rate", "1000000", "--rate-burst", "1000000")
    v1 = {"Sec-WebSocket-Protocol": "chatd.v1"}
    writer = site.client("/", headers=v1)
    writer.send('{"type":"hello","nick":"w"}')
    writer.send('{"type":"join","room":"tea"}')
    for i in range(100):  # 100 x 1 KiB: more than one 64 KiB page
        writer.send(json.dumps({"type": "send", "room": "tea", "text": f"{i} " + "tea " * 256}))
    reader = site.client("/", headers={**CHROMIUM, **v1})
    reader.send_frame(TEXT, deflated(b'{"type":"hello","nick":"r"}'), rsv=4)
    reader.send_frame(TEXT, deflated(b'{"type":"join","room":"tea","since":0}'), rsv=4)
    ids: list[int] = []
    more = True
    for _ in range(200):  # bounded: welcome, joined, the pages
        f = reader.read_frame()
        assert f.rsv == 4  # every one deflated
        obj = json.loads(inflated(f))
        if obj["type"] == "joined":
            ids += [m["id"] for m in obj["history"]]
            more = obj.get("more", False)
        elif obj["type"] == "history":
            ids += [m["id"] for m in obj["messages"]]
            more = obj["more"]
        if obj["type"] in ("joined", "history") and not more:
            break
    assert ids == list(range(1, 101))
    pmc = server_side(reader).compressor
    assert pmc.compressor is None and pmc.decompressor is None


def test_a_holding_link_that_shares_deflated_frames_queues_behind_its_reply() -> None:
    sent: list[bytes] = []
    link = Link(
        StringTransport(),
        1 << 20,
        lambda reason: None,
        lambda payload, binary: sent.append(payload),
        deflate=15,
    )
    outbox = Outbox(call_soon=lambda f: None)
    link.hold()
    assert link.put(b"page 1") is None
    assert broadcast([link], CHAT, False, outbox) == 1
    assert link.pending is None and sent == []  # held, behind the page
    link.drain()
    assert sent == [b"page 1", CHAT]  # in order, through the link's own send
    assert link.held is None and link.deflate == 15  # shares frames again
    broadcast([link], CHAT, False, outbox)
    assert link.pending == [deflate_frame(CHAT, False, 15)]


# -- the fast upgrade path takes browser offers ------------------------------------------

# Offers Upgrades/Connection._take_handshake take (one plain permessage-deflate offer) ...
FAST_OFFERS = [
    "permessage-deflate; client_max_window_bits",  # Chromium, python websockets
    "permessage-deflate",  # Firefox, Safari
    "permessage-deflate;client_max_window_bits=10",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    "permessage-deflate; server_max_window_bits=9; client_max_window_bits=15",
]
# ... and what still goes through Autobahn's own parse, accepted or refused as before.
SLOW_OFFERS = [
    "permessage-deflate; server_max_window_bits=8",  # Autobahn refuses 8
    "permessage-deflate; server_max_window_bits",  # no value: refused
    "permessage-deflate; client_max_window_bits=16",
    "permessage-deflate; client_max_window_bits; client_max_window_bits",  # repeated: refused
    "permessage-deflate; x-unknown",  # refused
    'permessage-deflate; client_max_window_bits="10"',
    "Permessage-Deflate; Client_Max_Window_Bits",
    "permessage-deflate; client_max_window_bits, permessage-deflate",  # two offers
    "x-webkit-deflate-frame",  # not one chatd speaks: no extension
    "permessage-deflate;; client_max_window_bits",
]


def answer(offer: str, one_read: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, str, bool]:
    """chatd's whole answer to a handshake offering ``offer`` (in process), the
    connection's permessage-deflate once open, and whether Connection._take_handshake
    took it. Sent in two reads, the head never takes the fast path (the door hands a
    split head to twisted.web): that is the slow path's answer."""
    taken: list[bool] = []
    take = base.Connection._take_handshake

    def spy(conn: Any, parsed: Any, end: int) -> bool:
        ok = take(conn, parsed, end)
        taken.append(ok)
        return ok

    monkeypatch.setattr(base.Connection, "_take_handshake", spy)
    site = Site()
    t = connect(site.site)
    data = handshake("/relay/offer", f"Sec-WebSocket-Extensions: {offer}")
    if one_read:
        t.protocol.dataReceived(data)
    else:
        t.protocol.dataReceived(data[:20])
        assert t.value() == b""
        t.protocol.dataReceived(data[20:])
    assert turn(lambda: b"\r\n\r\n" in t.value())
    out = t.value()
    compressor = repr(getattr(t.protocol, "compressor", None))
    t.protocol.connectionLost(Failure(ConnectionDone()))
    monkeypatch.undo()
    return out, compressor, taken == [True]


@pytest.mark.parametrize("offer", FAST_OFFERS + SLOW_OFFERS)
def test_an_offer_gets_the_same_answer_on_either_path(
    offer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, fast_pmc, taken = answer(offer, True, monkeypatch)
    slow, slow_pmc, taken_slow = answer(offer, False, monkeypatch)
    assert not taken_slow
    assert taken == (offer in FAST_OFFERS)
    assert fast == slow  # byte for byte: status, Sec-WebSocket-Extensions, everything
    assert fast_pmc == slow_pmc  # the same Deflate (parameters), or None on both
    if offer in FAST_OFFERS:
        assert fast.startswith(b"HTTP/1.1 101 ") and fast_pmc.startswith("Deflate(")


def test_the_offers_the_fast_path_takes_parse_as_autobahn_parses_them() -> None:
    # Autobahn's own parse (private: read here only to compare with chatd's)
    parse = WebSocketServerProtocol()._parseExtensionsHeader
    for offer in FAST_OFFERS:
        assert plain_offer(offer.encode()) == parse(offer), offer
    for offer in SLOW_OFFERS:
        assert plain_offer(offer.encode()) is None, offer


def test_a_chromium_offer_takes_the_fast_path_and_compresses_both_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[bool] = []
    take = base.Connection._take_handshake

    def spy(conn: Any, parsed: Any, end: int) -> bool:
        ok = take(conn, parsed, end)
        taken.append(ok)
        return ok

    monkeypatch.setattr(base.Connection, "_take_handshake", spy)
    site = Site()
    a = site.client("/relay/fast", headers=CHROMIUM)
    b = site.client("/relay/fast", headers=CHROMIUM)
    assert taken == [True, True]  # both on the fast path
    assert extensions(a) == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    pmc = server_side(a).compressor
    assert isinstance(pmc, Deflate) and pmc.shared and pmc.bits == 15 and pmc.client_bits == 15
    assert server_side(a).link.deflate == 15
    a.send_frame(TEXT, deflated(CHAT), rsv=4)  # compressed in
    for c in (a, b):
        f = c.read_frame()
        assert f.rsv == 4 and len(f.payload) < len(CHAT)  # compressed out
        assert inflated(f) == CHAT
