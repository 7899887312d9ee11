"""History, epochs and chat rooms without a reactor: real SQLite files, the hub's own logic."""

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


# -- epochs ------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
"""  # a database made by chatd before epochs


def test_epoch_created_with_the_first_id_and_kept_across_restarts(tmp_path) -> None:
    path = str(tmp_path / "h.sqlite3")
    h = History(path, retention=5)
    assert h.epoch("r") is None  # no message, no epoch
    h.append("r", "ann", "one")
    epoch = h.epoch("r")
    assert isinstance(epoch, str) and len(epoch) >= 11
    h.append("r", "ann", "two")
    h.commit()
    assert h.epoch("r") == epoch and h.epoch("other") is None
    h.close()
    again = History(path, retention=5)
    assert again.epoch("r") == epoch
    again.close()
    (tmp_path / "h.sqlite3").unlink()  # the database is gone: ids and epoch start anew
    fresh = History(path, retention=5)
    assert fresh.epoch("r") is None
    assert fresh.append("r", "ann", "one again").id == 1
    assert fresh.epoch("r") not in (None, epoch)
    fresh.close()


def test_a_rolled_back_first_message_leaves_no_epoch(tmp_path) -> None:
    h = History(str(tmp_path / "h.sqlite3"), retention=5)
    h.append("r", "ann", "lost")
    h.rollback()
    assert h.epoch("r") is None and h.last_id("r") == 0
    h.append("r", "ann", "kept")
    h.commit()
    epoch = h.epoch("r")
    h.close()
    assert History(str(tmp_path / "h.sqlite3"), retention=5).epoch("r") == epoch


def test_a_database_from_before_epochs_gets_one_on_first_use(tmp_path) -> None:
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.executemany(
        "INSERT INTO messages VALUES ('r', ?, 0, 'ann', ?)", [(i, f"t{i}") for i in (1, 2, 3)]
    )
    db.commit()
    db.close()
    h = History(path, retention=5)
    epoch = h.epoch("r")  # a join, before any new message
    assert epoch is not None and h.epoch("empty") is None
    assert h.append("r", "ann", "t4").id == 4 and h.epoch("r") == epoch
    h.commit()
    h.close()
    again = History(path, retention=5)
    assert again.epoch("r") == epoch and [m.id for m in again.since("r", 2)[0]] == [3, 4]
    again.close()


def test_a_database_from_before_users_keeps_its_messages_and_stores_senders_users(
    tmp_path,
) -> None:
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)  # (no user column either)
    db.execute("INSERT INTO messages VALUES ('r', 1, 0, 'ann', 'old')")
    db.commit()
    db.close()
    h = History(path, retention=5)
    h.append("r", "Alice", "new", None, "a1")
    h.append("r", "bob", "anonymous")
    h.commit()
    h.close()
    again = History(path, retention=5)
    got = again.since("r", 0)[0]
    assert [(m.sender, m.text, m.user) for m in got] == [
        ("ann", "old", ""),
        ("Alice", "new", "a1"),
        ("bob", "anonymous", ""),
    ]
    again.close()


def test_without_storage_the_epoch_is_new_each_run() -> None:
    h = History(":memory:", retention=0)
    h.append("r", "a", "x")
    epoch = h.epoch("r")
    assert epoch is not None and h.epoch("r") == epoch
    other = History(":memory:", retention=0)
    other.append("r", "a", "x")
    assert other.epoch("r") not in (None, epoch)


def test_join_naming_another_epoch_is_a_fresh_join_marked_reset() -> None:
    hub, soon = make_hub(History(":memory:", 100))
    m = Member()
    empty = hub.chat_join("r", m.link, "ann", "v1").result
    assert empty.epoch is None and not empty.reset
    for k in range(5):
        hub.post("r", "ann", f"t{k}")
    soon.pop()()
    epoch = hub.broker.history.epoch("r")  # type: ignore[attr-defined]
    j = hub.chat_join("r", m.link, "ann", "v1", since=3, epoch=epoch).result
    assert (j.epoch, j.reset, [x.id for x in j.history]) == (epoch, False, [4, 5])
    j = hub.chat_join("r", m.link, "ann", "v1", since=3, epoch="another").result
    assert j.epoch == epoch and j.reset and [x.id for x in j.history] == [1, 2, 3, 4, 5]
    j = hub.chat_join("r", m.link, "ann", "v1", since=3).result  # no epoch said: as before
    assert not j.reset and [x.id for x in j.history] == [4, 5]


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


def test_room_caches_are_bounded_and_read_back(tmp_path, monkeypatch) -> None:
    """Clients name rooms freely: the per-room caches keep only the most recently used."""
    import chatd.history

    monkeypatch.setattr(chatd.history, "ROOM_CACHE", 50)
    h = History(str(tmp_path / "h.sqlite3"), retention=10)
    h.append("kept", "ann", "first")
    h.append("kept", "ann", "second")
    h.commit()
    epoch = h.epoch("kept")
    for i in range(2000):  # joins of rooms nobody posts in, and posts to new rooms
        h.last_id(f"empty{i}")
        h.epoch(f"empty{i}")
        if i % 10 == 0:
            h.append(f"busy{i}", "ann", "x")
    h.commit()
    for cache in (h._last, h._epochs, h._since_trim, h._recent):
        assert len(cache) <= 50, len(cache)
    assert "kept" not in h._last  # evicted long ago: read back from the database
    assert h.last_id("kept") == 2 and h.epoch("kept") == epoch
    assert h.append("kept", "ann", "third").id == 3 and h.epoch("kept") == epoch
    h.commit()
    h.close()


def test_without_storage_an_evicted_room_starts_a_new_epoch(monkeypatch) -> None:
    import chatd.history

    monkeypatch.setattr(chatd.history, "ROOM_CACHE", 5)
    h = History(":memory:", retention=0)
    h.append("r", "ann", "x")
    before = h.epoch("r")
    for i in range(10):
        h.append(f"other{i}", "ann", "x")
    assert h.append("r", "ann", "y").id == 1  # its ids restart...
    assert h.epoch("r") not in (None, before)  # ...and clients can tell by the epoch


def test_an_idempotency_key_is_kept_for_the_window_and_across_a_restart(
    tmp_path, monkeypatch
) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr("chatd.history.time.time", lambda: now[0])
    path = str(tmp_path / "h.sqlite3")
    h = History(path, retention=5)
    h.dedupe_ms = 60_000
    made = h.append("r", "ann", "once", None, "", "~ann\nc1")
    h.commit()
    h.close()
    h = History(path, retention=5)  # a restart keeps the keys
    h.dedupe_ms = 60_000
    now[0] += 59.0
    assert h.sent("r", "~ann\nc1") == made
    assert h.sent("r", "~bob\nc1") is None and h.sent("other", "~ann\nc1") is None
    now[0] += 2.0  # past the window: a new send
    assert h.sent("r", "~ann\nc1") is None
    h.close()
    # Without storage the keys live in memory, and expire the same way.
    m = History(":memory:", 0)
    m.dedupe_ms = 60_000
    first = m.append("r", "ann", "once", None, "", "k")
    assert m.sent("r", "k").id == first.id  # (no text kept without storage)
    now[0] += 61.0
    m.append("r", "ann", "another", None, "", "k2")  # expired keys are dropped as keys come
    assert m.sent("r", "k") is None and list(m._sends) == [("r", "k2")]


def test_read_markers_survive_a_restart_and_never_move_back(tmp_path) -> None:
    path = str(tmp_path / "h.sqlite3")
    h = History(path, retention=5)
    for i in range(4):
        h.append("r", "ann", f"t{i}")
    h.commit()
    assert h.mark_read("r", "@a1", 3) == 3 and h.mark_read("r", "@a1", 1) == 3
    h.close()
    again = History(path, retention=5)
    assert again.read_marker("r", "@a1") == 3 and again.read_marker("r", "@b2") == 0
    again.close()


def test_messages_past_the_ttl_are_gone_from_reads_and_storage(tmp_path, monkeypatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr("chatd.history.time.time", lambda: now[0])
    h = History(str(tmp_path / "h.sqlite3"), retention=100)
    h.ttl_ms = 60_000
    for i in range(3):  # ids 1-3 in "quiet", 1-3 in "busy", a second apart
        h.append("quiet", "ann", f"q{i}")
        h.append("busy", "ann", f"b{i}")
        now[0] += 1
    h.commit()
    now[0] += 57.5  # ids 1 are 60.5 s old, ids 3 58.5 s
    msgs, truncated = h.since("busy", 0)
    assert [m.id for m in msgs] == [2, 3] and truncated  # 1 is past the TTL
    assert h.range("busy", 0, None, 10, True) == (msgs, False)
    assert h.since("busy", 1) == (msgs, False)  # nothing after 1 is lost
    now[0] += 10
    assert h.since("busy", 0) == ([], True)  # all past it; ids go on
    assert h.append("busy", "ann", "new").id == 4
    h.commit()
    assert h.sweep() == 6  # rows of both rooms, the quiet one too, are deleted
    assert h.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    h.close()
