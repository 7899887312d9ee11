"""The hub and the fan-out without a reactor: rooms, delivery, backpressure."""

from __future__ import annotations

from inproc import text_frames
from twisted.internet.testing import StringTransport

from chatd.fanout import Link, Outbox, broadcast, encode_frame
from chatd.hub import InMemoryHub

# The end of a reactor turn, by hand: queued frames are written when flushed.
turns: list = []
outbox = Outbox(call_soon=turns.append)


def end_turn() -> None:
    while turns:
        turns.pop(0)()


class Member:
    def __init__(self, max_backlog: int = 1 << 20) -> None:
        self.transport = StringTransport()
        self.dropped: list[str] = []
        self.link = Link(self.transport, max_backlog, self.dropped.append)


def test_encode_frame_lengths() -> None:
    assert encode_frame(b"hi", False) == b"\x81\x02hi"
    assert encode_frame(b"x" * 126, True)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(b"x" * 65536, True)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_rooms_created_on_join_dropped_when_empty() -> None:
    hub = InMemoryHub(outbox=outbox)
    a, b = Member(), Member()
    hub.join("r", a.link)
    hub.join("r", b.link)
    hub.join("s", a.link)
    assert hub.rooms() == {"relay/r": 2, "relay/s": 1}
    hub.leave("r", a.link)
    hub.leave("r", a.link)  # idempotent
    hub.leave("s", a.link)
    assert hub.rooms() == {"relay/r": 1}
    hub.leave("nowhere", a.link)


def test_publish_encodes_once_and_reaches_only_the_room() -> None:
    hub = InMemoryHub(outbox=outbox)
    r = [Member() for _ in range(3)]
    other = Member()
    for m in r:
        hub.join("r", m.link)
    hub.join("other", other.link)
    assert hub.publish("r", b"\x00\xff", True) == 3
    assert r[0].transport.value() == b""  # queued until the end of the turn
    end_turn()
    for m in r:
        assert m.transport.value() == b"\x82\x02\x00\xff"
    assert other.transport.value() == b""
    assert hub.publish("empty", b"x", False) == 0


def test_paused_link_is_dropped_past_its_backlog_others_unharmed() -> None:
    slow, ok = Member(max_backlog=10), Member()
    slow.link.pauseProducing()  # what the transport does when its buffer is full
    links = [slow.link, ok.link]
    assert broadcast(links, b"12345", False, outbox) == 2
    assert broadcast(links, b"12345", False, outbox) == 2  # backlog 10: at the bound, still written
    assert slow.dropped == []
    assert broadcast(links, b"1", False, outbox) == 1  # 11 > 10: dropped, not written
    assert slow.dropped == ["backlog"]
    assert not slow.link.open
    end_turn()
    assert ok.transport.value() == b"\x81\x0512345" * 2 + b"\x81\x011"
    assert slow.transport.value() == b"\x81\x0512345" * 2
    assert broadcast(links, b"x", False, outbox) == 1  # a closed link is skipped


def test_resume_clears_the_backlog() -> None:
    m = Member(max_backlog=8)
    m.link.pauseProducing()
    broadcast([m.link], b"1234567", False, outbox)
    m.link.resumeProducing()
    m.link.pauseProducing()
    broadcast([m.link], b"1234567", False, outbox)
    assert m.dropped == []


def test_failing_transport_does_not_stop_the_loop() -> None:
    bad, good = Member(), Member()

    def boom(data: bytes) -> None:
        raise OSError("gone")

    bad.transport.write = boom  # type: ignore[method-assign]
    assert broadcast([bad.link, good.link], b"x", False, outbox) == 2  # both queued
    end_turn()  # the write fails at the end of the turn: that link alone is dropped
    assert bad.dropped == ["error"]
    assert not bad.link.open
    assert good.transport.value() == b"\x81\x01x"


def test_compressing_link_frames_itself() -> None:
    sent: list[tuple[bytes, bool]] = []
    m = Member()
    m.link.send_message = lambda p, b: sent.append((p, b))
    plain = Member()
    broadcast([m.link, plain.link], b"abc", True, outbox)
    end_turn()
    assert sent == [(b"abc", True)]
    assert m.transport.value() == b""
    assert plain.transport.value() == b"\x82\x03abc"


# -- presence per user: counted once, its leave debounced (time injected) -------------------


def _sent(m: Member) -> list[dict]:
    """The JSON frames written to ``m`` so far, and clear them."""
    return text_frames(m.transport)


def test_a_user_is_present_once_and_leaves_after_the_debounce_unless_back() -> None:
    from twisted.internet.task import Clock

    from chatd.session import V1Renderer

    clock = Clock()
    hub = InMemoryHub(call_soon=turns.append, outbox=outbox, presence_debounce=5, clock=clock)
    hub.add_format("v1", V1Renderer())
    watcher, tab1, tab2 = Member(), Member(), Member()
    hub.chat_join("r", watcher.link, "bob", "v1")
    hub.chat_join("r", tab1.link, "Alice", "v1", unique=False, user="a1")
    end_turn()
    assert _sent(watcher) == [
        {"type": "presence", "room": "r", "nick": "Alice", "event": "join", "user": "a1"}
    ]
    j = hub.chat_join("r", tab2.link, "Alice", "v1", unique=False, user="a1").result
    assert sorted(j.members) == ["Alice", "bob"] and hub.members("r") == ["bob", "Alice"]
    hub.chat_leave("r", tab1.link)  # one tab of two closes
    hub.chat_leave("r", tab2.link)  # the other too: a reload, or a phone switching networks
    clock.advance(4.9)
    back = Member()
    hub.chat_join("r", back.link, "Alice", "v1", unique=False, user="a1")  # back within 5 s
    clock.advance(10)
    end_turn()
    assert _sent(watcher) == []  # no leave, no join: she never left
    hub.chat_leave("r", back.link)
    clock.advance(4.9)
    end_turn()
    assert _sent(watcher) == []
    clock.advance(0.1)  # her last link left 5 s ago
    end_turn()
    assert _sent(watcher) == [
        {"type": "presence", "room": "r", "nick": "Alice", "event": "leave", "user": "a1"}
    ]
    assert hub.members("r") == ["bob"] and clock.getDelayedCalls() == []
    # A leave still held back when the process stops is said at once.
    hub.chat_join("r", tab1.link, "Alice", "v1", unique=False, user="a1")
    hub.chat_leave("r", tab1.link)
    end_turn()
    assert [f["event"] for f in _sent(watcher)] == ["join"]
    hub.close()
    end_turn()
    assert [f["event"] for f in _sent(watcher)] == ["leave"]
    assert clock.getDelayedCalls() == []


def test_typing_reaches_every_member_but_the_typers_own_connections() -> None:
    from chatd.session import V1Renderer

    hub = InMemoryHub(call_soon=turns.append, outbox=outbox)
    hub.add_format("v1", V1Renderer())
    tab1, tab2, bob, namesake = Member(), Member(), Member(), Member()
    hub.chat_join("r", tab1.link, "Alice", "v1", unique=False, user="a1")
    hub.chat_join("r", tab2.link, "Alice", "v1", unique=False, user="a1")
    hub.chat_join("r", bob.link, "bob", "v1")
    hub.chat_join("r", namesake.link, "Alice", "v1", unique=False, user="a2")  # another Alice
    end_turn()
    for m in (tab1, tab2, bob, namesake):
        _sent(m)
    hub.say_typing("r", "a1", "Alice")
    end_turn()
    said = {"type": "typing", "room": "r", "name": "Alice", "user": "a1"}
    assert (_sent(bob), _sent(namesake)) == ([said], [said])
    assert (_sent(tab1), _sent(tab2)) == ([], [])
    hub.say_typing("r", "", "bob")  # an anonymous typer: by its nick
    end_turn()
    assert _sent(bob) == [] and _sent(tab1) == [{"type": "typing", "room": "r", "name": "bob"}]


def test_in_a_big_room_a_read_marker_goes_to_the_readers_own_connections_only() -> None:
    from chatd import limits
    from chatd.session import V1Renderer

    hub = InMemoryHub(call_soon=turns.append, outbox=outbox)
    hub.add_format("v1", V1Renderer())
    tab1, tab2 = Member(), Member()
    hub.chat_join("r", tab1.link, "Alice", "v1", unique=False, user="a1")
    hub.chat_join("r", tab2.link, "Alice", "v1", unique=False, user="a1")
    others = [Member() for _ in range(limits.READ_RECEIPTS_MAX_MEMBERS - 1)]
    for i, m in enumerate(others):
        hub.chat_join("r", m.link, f"m{i}", "v1")
    hub.post("r", "m0", "hi")
    hub.flush()
    end_turn()
    for m in (tab1, tab2, *others):
        _sent(m)
    said = {"type": "read", "room": "r", "name": "Alice", "id": 1, "user": "a1"}
    hub.local.read("r", "a1", "Alice", 1)  # 51 members here: more than the bound
    end_turn()
    assert (_sent(tab1), _sent(tab2)) == ([said], [said])
    assert all(_sent(m) == [] for m in others)
    hub.chat_leave("r", others[0].link)  # 50: at the bound, everyone is told
    end_turn()
    _sent(tab1), _sent(tab2), [_sent(m) for m in others]
    hub.local.read("r", "a1", "Alice", 1)
    end_turn()
    assert _sent(others[1]) == [said] and _sent(tab1) == [said]
