"""History and chat rooms without a reactor: real SQLite files, the hub's own logic."""

from __future__ import annotations

import sqlite3

from twisted.internet.testing import StringTransport

from chatd.fanout import Link, Outbox, broadcast
from chatd.history import History
from chatd.hub import InMemoryHub, NickTaken, Unavailable
from chatd.protocols.plain import PlainRenderer
from chatd.protocols.v1 import V1Renderer


def test_ids_retention_since_and_restart(tmp_path) -> None:
    path = str(tmp_path / "h.sqlite3")
    h = History(path, retention=5)
    ids = [h.append("r", "ann", f"t{i}").id for i in range(12)]
    h.append("other", "bob", "x")
    h.commit()
    assert ids == list(range(1, 13))
    msgs, truncated = h.since("r", 0)
    assert [m.id for m in msgs] == [8, 9, 10, 11, 12] and truncated
    msgs, truncated = h.since("r", 9)
    assert [m.text for m in msgs] == ["t9", "t10", "t11"] and not truncated
    assert h.since("r", 12) == ([], False)
    assert [m.id for m in h.recent("r", 2)] == [11, 12]
    h.close()
    again = History(path, retention=5)  # a restart: ids go on
    assert again.last_id("r") == 12 and again.last_id("other") == 1
    assert again.append("r", "ann", "after").id == 13
    again.close()


def test_history_off_still_numbers() -> None:
    h = History(":memory:", retention=0)
    assert [h.append("r", "a", "x").id for _ in range(3)] == [1, 2, 3]
    assert h.since("r", 1) == ([], True)


class Member:
    def __init__(self) -> None:
        self.transport = StringTransport()
        self.link = Link(self.transport, 1 << 20, lambda reason: None)

    def frames(self) -> bytes:
        """What reached the transport by the end of this reactor turn."""
        while turns:
            turns.pop(0)()
        out = self.transport.value()
        self.transport.clear()
        return out


turns: list = []


def make_hub(history: History) -> tuple[InMemoryHub, list]:
    soon: list = []
    hub = InMemoryHub(history, call_soon=soon.append, outbox=Outbox(call_soon=turns.append))
    hub.add_format("plain", PlainRenderer())
    hub.add_format("v1", V1Renderer())
    return hub, soon


def test_post_is_stored_before_it_is_sent_and_formats_are_rendered_once_each() -> None:
    hub, soon = make_hub(History(":memory:", 100))
    v, p = Member(), Member()
    hub.chat_join("lobby", v.link, "vera", "v1")
    hub.chat_join("lobby", p.link, "ID1234", "plain", unique=False)
    assert v.frames().endswith(b'"nick":"ID1234","event":"join"}')
    d = hub.post("lobby", "vera", "hi", "r1")
    assert v.frames() == b"" and p.frames() == b""  # not yet: the batch is not committed
    assert len(soon) == 1
    soon.pop()()  # the end of the reactor turn
    assert p.frames() == b"\x81\x08vera: hi"
    assert b'"id":1' in v.frames()
    assert d.result.id == 1


def test_nick_unique_case_insensitive_and_presence_on_leave() -> None:
    hub, _ = make_hub(History(":memory:", 100))
    a, b = Member(), Member()
    hub.chat_join("r", a.link, "Ann", "v1")
    taken = hub.chat_join("r", b.link, "ann", "v1")
    assert taken.called and taken.result.check(NickTaken)
    taken.addErrback(lambda f: None)
    hub.chat_join("r", b.link, "bob", "v1")
    a.frames()
    assert hub.chat_leave("r", b.link) is True
    assert hub.chat_leave("r", b.link) is False
    assert b'"nick":"bob","event":"leave"' in a.frames()
    assert hub.rooms() == {"chat/r": 1}


def test_a_locked_database_fails_the_batch_and_sends_nothing(tmp_path) -> None:
    path = str(tmp_path / "locked.sqlite3")
    hub, soon = make_hub(History(path, 100, busy_timeout=0.05))
    m = Member()
    hub.chat_join("r", m.link, "ann", "v1")
    ok = hub.post("r", "ann", "before")
    soon.pop()()
    assert ok.result.id == 1
    m.frames()
    other = sqlite3.connect(path, isolation_level=None)  # another process holds the lock
    other.execute("BEGIN IMMEDIATE")
    failures: list = []
    hub.post("r", "ann", "during").addErrback(failures.append)
    assert failures and failures[0].check(Unavailable)
    assert m.frames() == b""
    other.execute("ROLLBACK")
    other.close()
    after = hub.post("r", "ann", "after")
    soon.pop()()
    assert after.result.id == 2  # no gap: the failed message never had an id
    assert b'"text":"after"' in m.frames()


def test_a_holding_link_pages_as_the_transport_drains_and_live_frames_wait() -> None:
    """Link.hold: pages only while the transport takes them; the rest behind, counted."""
    drops: list[str] = []
    t = StringTransport()
    link = Link(t, 200 * 1024, drops.append)
    made: list[int] = []

    def pages():
        for i in range(3):
            made.append(i)
            yield f"page{i}".encode()

    link.hold()
    assert link.put(b"joined") is None and link.put(pages(), None) is None
    link.pauseProducing()  # the transport is full: nothing is written, nothing rendered
    link.drain()
    assert t.value() == b"" and made == []
    broadcast([link], b"live", False, Outbox(call_soon=lambda f: None))  # waits behind
    link.resumeProducing()
    assert t.value() == b"\x81\x06joined\x81\x05page0\x81\x05page1\x81\x05page2\x81\x04live"
    assert link.held is None and link.send_message is None and not link.paused
    assert link.backlog == 0 and drops == []
    # While holding, what waits counts against max_backlog (a pending pager as 128 KiB,
    # or half the bound if less: here 100 KiB).
    link.hold()
    link.pauseProducing()
    assert link.put(pages(), None) is None and link.put(pages(), None) is None
    assert link.put(b"one byte too many") == "backlog" and not link.open
