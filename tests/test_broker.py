"""The broker contract (chatd/broker.py), one body of tests run against both brokers.

``memory``: ``MemoryBroker`` over an SQLite ``History``; ``redis``:
``RedisBroker`` against a real redis-server on a loopback port (one per
test, nothing persisted). Each test drives the broker directly, as the hub
does, with a ``Recorder`` in the hub's place that keeps every event in the
order it came; waits are on those events (a Deferred that fires when the
condition holds, or fails after a bound), never fixed sleeps. Tests about
several processes (one order across nodes, relay across nodes, presence
expiring with its node) need a broker whose state outlives a process: they
run against Redis only, and say so.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from chatd.broker import Duplicate, Joined, MemoryBroker, NickTaken, Refused, Unavailable
from chatd.cluster import RedisBroker
from chatd.history import MAX_REACTIONS, History, Message
from tools.redis import RedisServer

WAIT = 15.0  # seconds any awaited event may take (a loaded CI machine)
RETENTION = 50


class Recorder:
    """The hub's side of the contract (``BrokerEvents``): every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.subscriptions: set[str] = set()
        self.states: list[bool] = []
        self.live: list[tuple[str, str, str, bool, str]] = []
        self.sessions: dict[str, tuple[str, list[str]]] = {}  # resume secret -> (user, rooms)
        self._waits: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    # BrokerEvents
    def message(self, room: str, msg: Message, epoch: str | None) -> None:
        self._add(("m", room, msg.id, msg.sender, msg.text, epoch))

    def presence(self, room: str, mid: str, nick: str, kind: str, user: str) -> None:
        self._add(("p", room, mid, nick, kind, user) if user else ("p", room, mid, nick, kind))

    def relay(self, room: str, payload: bytes, binary: bool) -> None:
        self._add(("r", room, payload, binary))

    def expired(self, room: str, mid: str, nick: str, user: str) -> None:
        self._add(("x", room, mid, nick, user))

    def typing(self, room: str, user: str, name: str) -> None:
        self._add(("t", room, user, name))

    def read(self, room: str, user: str, name: str, id: int) -> None:
        self._add(("rd", room, user, name, id))

    def kicked(self, user: str) -> None:
        self._add(("k", "", user))

    def resume(self, secret: str, user: str) -> list[str] | None:
        held = self.sessions.get(secret)
        if held is None or held[0] != user:
            return None
        del self.sessions[secret]
        self._add(("t", "", secret))
        return held[1]

    def subscribed(self, room: str) -> None:
        self.subscriptions.add(room)
        self._check()

    def channels_lost(self) -> None:
        self.subscriptions.clear()

    def state(self, up: bool) -> None:
        self.states.append(up)
        self._check()

    def live_members(self) -> Iterator[tuple[str, str, str, bool, str]]:
        return iter(self.live)

    # for the tests
    def _add(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)
        self._check()

    def _check(self) -> None:
        for wait in list(self._waits):
            check, d = wait
            if check():
                self._waits.remove(wait)
                d.callback(None)

    def until(self, check: Callable[[], bool], what: str) -> defer.Deferred[None]:
        """Fires once ``check()`` holds (checked at each event); fails after WAIT seconds."""
        if check():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        wait = (check, d)
        self._waits.append(wait)

        def late() -> None:
            if wait in self._waits:
                self._waits.remove(wait)
                d.errback(AssertionError(f"not within {WAIT} s: {what}; events: {self.events}"))

        call = reactor.callLater(WAIT, late)
        return d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])

    def kinds(self, room: str) -> list[tuple[Any, ...]]:
        """The room's events without the room."""
        return [(e[0], *e[2:]) for e in self.events if e[1] == room]

    def ids(self, room: str) -> list[int]:
        return [e[2] for e in self.events if e[0] == "m" and e[1] == room]


class Kit:
    """Makes started brokers of one kind, and breaks their store on demand."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.request = request
        self.made: list[Any] = []
        self.server: RedisServer | None = None

    @property
    def multi(self) -> bool:
        """Whether several processes can share this broker's state."""
        return self.kind == "redis"

    def needs_processes(self) -> None:
        if not self.multi:
            pytest.skip("MemoryBroker is one process: there is no other node to share with")

    @defer.inlineCallbacks
    def broker(self, retention: int = RETENTION, ttl: float = 30.0) -> Any:
        rec = Recorder()
        b: Any
        if self.kind == "memory":
            b = MemoryBroker(History(":memory:", retention))
        else:
            if self.server is None:
                self.server = RedisServer(persist=False)
            b = RedisBroker(self.server.url, retention=retention, ttl=ttl, reactor=reactor)
        b.attach(rec)
        b.start()
        self.made.append(b)
        yield rec.until(lambda: b.up, "broker up")
        b.recorder = rec
        return b

    @defer.inlineCallbacks
    def subscribed(self, b: Any, room: str) -> Any:
        b.subscribe(room)
        yield b.recorder.until(lambda: room in b.recorder.subscriptions, f"{room} subscribed")

    @defer.inlineCallbacks
    def break_store(self, b: Any) -> Any:
        """From now on the broker cannot store: SQLite closed under it, or Redis gone."""
        if self.kind == "memory":
            b.history.db.close()
            return
        assert self.server is not None
        self.server.stop()
        yield b.recorder.until(lambda: b.recorder.states[-1:] == [False], "broker down")

    def close(self) -> None:
        for b in self.made:
            with_db = getattr(b, "history", None)
            if with_db is not None:
                with contextlib.suppress(sqlite3.Error):  # (closed under it by break_store)
                    b.close()
            else:
                pytest_twisted.blockon(b.close())
        if self.server is not None:
            self.server.close()


@pytest.fixture(params=["memory", "redis"])
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    k = Kit(request.param, request)
    yield k
    k.close()


def gather(ds: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    return defer.gatherResults(ds, consumeErrors=True)


# -- publish: atomic, ordered ------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_publish_gives_ids_in_order_and_every_subscriber_gets_them_in_that_order(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    stored = yield gather([b.publish("tea", "ann", f"t{i}") for i in range(20)])
    assert [m.id for m in stored] == list(range(1, 21))
    assert all(m.ts > 0 and m.room == "tea" for m in stored)
    rec = b.recorder
    yield rec.until(lambda: len(rec.ids("tea")) == 20, "20 messages")
    assert rec.ids("tea") == list(range(1, 21))
    assert [e[4] for e in rec.events if e[0] == "m"] == [f"t{i}" for i in range(20)]
    epochs = {e[5] for e in rec.events if e[0] == "m"}
    assert len(epochs) == 1 and None not in epochs  # one epoch, made with the first id
    # Rooms count on their own.
    yield kit.subscribed(b, "other")
    m = yield b.publish("other", "bob", "hi")
    assert m.id == 1


@pytest_twisted.inlineCallbacks
def test_refs_come_back_with_the_stored_message(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    m = yield b.publish("tea", "ann", "x", 7)
    assert (m.sender, m.text, m.ref) == ("ann", "x", 7)


@pytest_twisted.inlineCallbacks
def test_an_idempotency_key_makes_one_message_and_a_retry_gets_it_back(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    first = yield b.publish("tea", "ann", "hello", None, "", "~ann\nc1")
    with pytest.raises(Duplicate) as again:
        yield b.publish("tea", "ann", "hello", None, "", "~ann\nc1")
    made = again.value.original
    assert (made.id, made.text, made.sender, made.ts) == (first.id, "hello", "ann", first.ts)
    other = yield b.publish("tea", "ann", "hello", None, "", "~ann\nc2")  # another cid
    elsewhere = yield b.publish("cafe", "ann", "hello", None, "", "~ann\nc1")  # another room
    assert (other.id, elsewhere.id) == (2, 1)
    # Retries racing the first (one batch, or in flight together): still one message.
    ds = [b.publish("tea", "bob", "hi", None, "", "~bob\nc9") for _ in range(3)]
    results = yield defer.DeferredList(ds, consumeErrors=True)
    stored = [r for ok, r in results if ok]
    repeats = [r.value.original for ok, r in results if not ok and r.check(Duplicate)]
    assert len(stored) == 1 and [m.id for m in repeats] == [stored[0].id] * 2
    rec = b.recorder
    yield rec.until(lambda: rec.ids("tea") == [1, 2, 3], "three messages, once each")
    assert [e[4] for e in rec.events if e[0] == "m" and e[1] == "tea"] == ["hello", "hello", "hi"]


@pytest_twisted.inlineCallbacks
def test_pages_of_the_kept_history_by_id(kit):
    b = yield kit.broker(retention=8)
    yield kit.subscribed(b, "tea")
    yield gather(
        [b.publish("tea", "ann", f"t{i}", None, "a1" if i % 2 else "") for i in range(1, 11)]
    )

    @defer.inlineCallbacks
    def page(after: int, before: int | None, limit: int, newest: bool) -> Any:
        p = yield b.read_page("tea", after, before, limit, newest)
        assert p.epoch is not None
        return [m.id for m in p.messages], p.more

    assert (yield page(0, None, 3, True)) == ([8, 9, 10], True)
    assert (yield page(0, 8, 3, True)) == ([5, 6, 7], True)
    assert (yield page(0, 5, 3, True)) == ([3, 4], False)  # 1 and 2 are past the retention
    assert (yield page(5, None, 2, False)) == ([6, 7], True)
    assert (yield page(5, 8, 10, False)) == ([6, 7], False)
    assert (yield page(10, None, 5, False)) == ([], False)
    p = yield b.read_page("tea", 8, None, 1, False)
    assert [(m.id, m.text, m.sender, m.user) for m in p.messages] == [(9, "t9", "ann", "a1")]
    empty = yield b.read_page("nowhere", 0, None, 5, True)
    assert (empty.messages, empty.more, empty.epoch) == ([], False, None)


@pytest_twisted.inlineCallbacks
def test_typing_reaches_every_process_of_the_room_and_is_not_stored(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    others = []
    if kit.multi:
        other = yield kit.broker()
        yield kit.subscribed(other, "tea")
        others.append(other)
    b.typing("tea", "a1", "Alice")
    b.typing("tea", "", "ann")
    for x in (b, *others):
        yield x.recorder.until(
            lambda x=x: (
                [e for e in x.recorder.events if e[0] == "t"]
                == [("t", "tea", "a1", "Alice"), ("t", "tea", "", "ann")]
            ),
            "both typing events, in order",
        )
    assert (yield b.read_after("tea", None, 0))[1] == []  # nothing stored


@pytest_twisted.inlineCallbacks
def test_read_markers_only_move_up_are_told_when_they_move_and_come_with_a_join(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    yield gather([b.publish("tea", "ann", f"t{i}") for i in range(5)])
    assert (yield b.mark_read("tea", "@a1", 3, "a1", "Alice")) == 3
    assert (yield b.mark_read("tea", "@a1", 2, "a1", "Alice")) == 3  # never back
    assert (yield b.mark_read("tea", "@a1", 99, "a1", "Alice")) == 5  # never past the last
    assert (yield b.mark_read("tea", "~bob", 1, "", "bob")) == 1  # (anonymous: by nick)
    joined = yield b.join("tea", f"{b.node}.1", "Alice", False, None, True, 10, None, "a1", "@a1")
    assert (joined.read, joined.last_id) == (5, 5)
    other = yield b.join("tea", f"{b.node}.2", "cy", True, None, False, 0, None, "", "~cy")
    assert (other.read, other.unread) == (0, 5)  # (none yet; a join without snapshot has it too)
    bobs = yield b.join("tea", f"{b.node}.3", "bob", True, None, True, 10, None, "", "~bob")
    assert (bobs.read, bobs.unread) == (1, 4)
    # Unread counts messages: not edits, deletes or reactions, nor deleted messages.
    yield b.publish("tea", "ann", "t1!", None, "", "", "edit", 2, True)
    yield b.publish("tea", "ann", "👍", None, "", "", "react", 3)
    yield b.publish("tea", "ann", "", None, "", "", "delete", 4, True)
    yield b.publish("tea", "ann", "t5")
    bobs = yield b.join("tea", f"{b.node}.3", "bob", True, None, True, 10, None, "", "~bob")
    assert (bobs.read, bobs.last_id, bobs.unread) == (1, 9, 4)  # 2, 3, 5 and 9
    rec = b.recorder
    yield rec.until(
        lambda: (
            [e for e in rec.events if e[0] == "rd"]
            == [
                ("rd", "tea", "a1", "Alice", 3),
                ("rd", "tea", "a1", "Alice", 5),
                ("rd", "tea", "", "bob", 1),
            ]
        ),
        "three moves told, the one back not",
    )


@pytest_twisted.inlineCallbacks
def test_messages_past_the_history_ttl_are_not_replayed(kit):
    import time

    b = yield kit.broker()
    if kit.kind == "memory":
        b.history.ttl_ms = 400
    else:
        b.ttl_ms = 400
    yield kit.subscribed(b, "tea")
    old = yield gather([b.publish("tea", "ann", f"old{i}") for i in range(3)])
    for _ in range(200):  # until the three are past the TTL (bounded: 2 s at most)
        if time.time() * 1000 > old[-1].ts + 450:
            break
        yield _turn(0.01)
    new = yield b.publish("tea", "ann", "new")
    assert new.id == 4  # ids go on
    joined = yield b.join("tea", f"{b.node}.1", "bob", True, 0, True, 10, None)
    assert [m.text for m in joined.history] == ["new"] and joined.truncated
    page = yield b.read_page("tea", 0, None, 10, True)
    assert [m.id for m in page.messages] == [4]


@pytest_twisted.inlineCallbacks
def test_two_processes_see_one_order(kit):
    kit.needs_processes()
    a = yield kit.broker()
    b = yield kit.broker()
    yield kit.subscribed(a, "tea")
    yield kit.subscribed(b, "tea")
    ds = []
    for i in range(30):
        ds.append((a if i % 2 else b).publish("tea", "ann", f"t{i}"))
    yield gather(ds)
    for x in (a, b):
        yield x.recorder.until(lambda x=x: len(x.recorder.ids("tea")) == 30, "30 on each")
    assert a.recorder.kinds("tea") == b.recorder.kinds("tea")
    assert a.recorder.ids("tea") == list(range(1, 31))


@pytest_twisted.inlineCallbacks
def test_a_failed_store_fails_the_publish_and_publishes_nothing(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    yield b.publish("tea", "ann", "before")
    yield b.recorder.until(lambda: b.recorder.ids("tea") == [1], "the first")
    yield kit.break_store(b)
    with pytest.raises(Unavailable):
        yield b.publish("tea", "ann", "lost")
    with pytest.raises(Unavailable):
        yield b.join("tea", f"{b.node}.1", "ann", True, None, True, 10, None)
    with pytest.raises(Unavailable):
        yield b.read_after("tea", None, 0)
    b.leave("tea", f"{b.node}.1", True)  # never fails
    assert b.recorder.ids("tea") == [1]


# -- join: the marker splits the stream ------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_join_marker_splits_the_stream_exactly(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    first = b.publish("tea", "ann", "one")  # accepted before the join, not yet awaited
    joined: Joined = yield b.join("tea", f"{b.node}.1", "bob", True, None, True, 10, None)
    second = yield b.publish("tea", "ann", "two")
    assert (yield first).id == 1 and second.id == 2
    assert [m.id for m in joined.history] == [1] and joined.last_id == 1
    assert joined.members == ["bob"] and not joined.truncated and not joined.reset
    rec = b.recorder
    yield rec.until(lambda: len(rec.kinds("tea")) == 3, "message, marker, message")
    assert rec.kinds("tea") == [
        ("m", 1, "ann", "one", joined.epoch),
        ("p", f"{b.node}.1", "bob", "join"),
        ("m", 2, "ann", "two", joined.epoch),
    ]


@pytest_twisted.inlineCallbacks
def test_nick_keys_are_exclusive_a_rejoin_is_a_mark_and_leave_frees_the_nick(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    n = b.node
    yield b.join("tea", f"{n}.1", "Ann", True, None, True, 10, None)
    with pytest.raises(NickTaken):  # the same key: case and look-alikes folded
        yield b.join("tea", f"{n}.2", "ann", True, None, True, 10, None)
    again = yield b.join("tea", f"{n}.1", "Ann", True, None, True, 10, None)
    assert again.members == ["Ann"]
    both = yield b.join("tea", f"{n}.3", "ann", False, None, True, 10, None)  # claims nothing
    assert sorted(both.members) == ["Ann", "ann"]
    b.leave("tea", f"{n}.1", False)
    b.leave("tea", f"{n}.9", False)  # not a member: nothing happens
    yield b.join("tea", f"{n}.2", "ANN", True, None, True, 10, None)  # free again
    rec = b.recorder
    yield rec.until(lambda: len(rec.kinds("tea")) == 5, "five presence events")
    assert rec.kinds("tea") == [
        ("p", f"{n}.1", "Ann", "join"),
        ("p", f"{n}.1", "", "mark"),
        ("p", f"{n}.3", "ann", "join"),
        ("p", f"{n}.1", "Ann", "leave"),
        ("p", f"{n}.2", "ANN", "join"),
    ]


@pytest_twisted.inlineCallbacks
def test_a_users_presence_is_counted_once_however_many_member_ids_it_has(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    n = b.node
    first = yield b.join("tea", f"{n}.1", "Alice", False, None, True, 10, None, user="a1")
    assert first.members == ["Alice"]
    second = yield b.join("tea", f"{n}.2", "Alice", False, None, True, 10, None, user="a1")
    assert second.members == ["Alice"]  # her second tab: listed once
    yield b.join("tea", f"{n}.3", "Alice", False, None, True, 10, None, user="a2")  # another
    yield b.join("tea", f"{n}.4", "ann", True, None, True, 10, None)  # anonymous, as before
    assert sorted((yield b.members("tea"))) == ["Alice", "Alice", "ann"]
    b.leave("tea", f"{n}.1", False)  # a1 still has .2: nothing to say
    b.leave("tea", f"{n}.2", False)  # her last: she leaves
    again = yield b.join("tea", f"{n}.5", "Alice", False, None, True, 10, None, user="a1")
    assert sorted(again.members) == ["Alice", "Alice", "ann"]
    rec = b.recorder
    yield rec.until(lambda: len(rec.kinds("tea")) == 6, "six presence events")
    assert rec.kinds("tea") == [
        ("p", f"{n}.1", "Alice", "join", "a1"),
        ("p", f"{n}.2", "", "mark"),
        ("p", f"{n}.3", "Alice", "join", "a2"),
        ("p", f"{n}.4", "ann", "join"),
        ("p", f"{n}.2", "Alice", "leave", "a1"),
        ("p", f"{n}.5", "Alice", "join", "a1"),
    ]
    m = yield b.publish("tea", "Alice", "hi", None, "a1")  # a message carries its user
    assert m.user == "a1"
    yield rec.until(lambda: rec.ids("tea") == [m.id], "the message")
    _, stored = yield b.read_after("tea", None, 0)
    assert [(x.sender, x.user) for x in stored] == [("Alice", "a1")]
    recent = yield b.join("tea", f"{n}.6", "bob", True, None, True, 10, None)
    assert [(x.text, x.user) for x in recent.history] == [("hi", "a1")]


@pytest_twisted.inlineCallbacks
def test_snapshots_recent_since_truncated_and_without_history(kit):
    b = yield kit.broker(retention=5)
    yield kit.subscribed(b, "tea")
    yield gather([b.publish("tea", "ann", f"t{i}") for i in range(1, 11)])
    n = b.node
    recent = yield b.join("tea", f"{n}.1", "a", True, None, True, 3, None)
    assert [m.id for m in recent.history] == [8, 9, 10] and not recent.truncated
    assert [m.text for m in recent.history] == ["t8", "t9", "t10"]
    since = yield b.join("tea", f"{n}.2", "b", True, 7, True, 3, None)
    assert [m.id for m in since.history] == [8, 9, 10] and not since.truncated
    lost = yield b.join("tea", f"{n}.3", "c", True, 2, True, 3, None)  # 3..5 are gone
    assert [m.id for m in lost.history] == [6, 7, 8, 9, 10] and lost.truncated
    capped = yield b.join("tea", f"{n}.4", "d", True, None, True, 100, None)  # the retention
    assert [m.id for m in capped.history] == [6, 7, 8, 9, 10]
    bare = yield b.join("tea", f"{n}.5", "e", True, None, False, 3, None)
    assert (bare.members, bare.history, bare.last_id) == ([], [], 10)
    assert bare.epoch == recent.epoch is not None


@pytest_twisted.inlineCallbacks
def test_another_epoch_is_a_fresh_snapshot_marked_reset(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    n = b.node
    empty = yield b.join("tea", f"{n}.1", "a", True, None, True, 10, None)
    assert empty.epoch is None and empty.last_id == 0 and empty.history == []
    yield gather([b.publish("tea", "ann", f"t{i}") for i in range(4)])
    same = yield b.join("tea", f"{n}.2", "b", True, 2, True, 10, "x" * 12)
    assert same.reset and same.epoch is not None
    assert [m.id for m in same.history] == [1, 2, 3, 4]  # the recent ones, not after 2
    ok = yield b.join("tea", f"{n}.3", "c", True, 2, True, 10, same.epoch)
    assert not ok.reset and [m.id for m in ok.history] == [3, 4]


@pytest_twisted.inlineCallbacks
def test_a_long_replay_is_read_in_pages_without_a_gap(kit):
    b = yield kit.broker(retention=400)
    yield kit.subscribed(b, "tea")
    yield gather([b.publish("tea", "ann", f"{i:04d}" + "x" * 1000) for i in range(300)])
    joined = yield b.join("tea", f"{b.node}.1", "bob", True, 0, True, 10, None)
    assert 0 < len(joined.history) < 300 and joined.more is not None
    got = [m.id for m in joined.history]
    cursor = joined.more
    pages = 1
    while cursor.after < cursor.until:
        page = yield defer.maybeDeferred(cursor.read)
        assert page, "a page came back empty before the end"
        assert sum(len(m.text) for m in page) <= 256 * 1024
        got += [m.id for m in page]
        pages += 1
        assert pages < 300
    assert got == list(range(1, 301)) and pages > 2


# -- edits, deletes, reactions ---------------------------------------------------------


def _stored_text(kit: Kit, b: Any) -> str:
    """Everything the store holds, as one string (to look for a text in it)."""
    if kit.kind == "memory":
        rows = b.history.db.execute("SELECT * FROM messages").fetchall()
        rows += b.history.db.execute("SELECT * FROM reactions").fetchall()
        return repr(rows)
    assert kit.server is not None
    keys = kit.server.command("KEYS", "*").decode(errors="replace").split()
    return "".join(kit.server.command("DUMP", k).decode("latin-1") for k in keys) + repr(
        [kit.server.command("XRANGE", k, "-", "+") for k in keys if k.endswith(":log")]
    )


@pytest_twisted.inlineCallbacks
def test_edits_deletes_and_reactions_are_events_applied_to_their_target(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    m1 = yield b.publish("tea", "Alice", "first draft", None, "a1")
    m2 = yield b.publish("tea", "ann", "anonymous words")
    edit = yield b.publish("tea", "Alice", "second draft", None, "a1", "", "edit", m1.id, True)
    assert (edit.id, edit.kind, edit.target, edit.text) == (3, "edit", m1.id, "second draft")
    # Only the author edits or deletes: the same user; for an anonymous message, no user
    # and the same nick.
    for sender, user, target in [
        ("Bob", "b1", m1.id),
        ("Alice", "", m1.id),
        ("ann", "a1", m2.id),
        ("Ann", "", m2.id),
    ]:
        with pytest.raises(Refused) as no:
            yield b.publish("tea", sender, "x", None, user, "", "edit", target, True)
        assert no.value.code == "forbidden"
    yield b.publish("tea", "ann", "still anonymous", None, "", "", "edit", m2.id, True)
    # Anyone reacts, once per emoji (a set), to messages only.
    for sender, user, emoji, kind in [
        ("Bob", "b1", "👍", "react"),
        ("ann", "", "👍", "react"),
        ("Bob", "b1", "👍", "react"),
        ("Bob", "b1", "🎉", "react"),
        ("Bob", "b1", "🎉", "unreact"),
        ("Bob", "b1", "🙂", "unreact"),  # (none to take back: stored, changes nothing)
    ]:
        yield b.publish("tea", sender, emoji, None, user, "", kind, m1.id)
    for target in (edit.id, 99, 0):
        with pytest.raises(Refused) as no:
            yield b.publish("tea", "Bob", "👍", None, "b1", "", "react", target)
        assert no.value.code == "not_found"
    rec = b.recorder
    yield rec.until(lambda: rec.ids("tea") == list(range(1, 11)), "every event, in order")

    p = yield b.read_page("tea", 0, None, 50, True)
    now = {m.id: m for m in p.messages}
    assert (now[1].text, now[1].edited, now[1].deleted, now[1].updated) == (
        "second draft",
        3,
        0,
        10,
    )
    assert {k: sorted(v) for k, v in (now[1].reactions or {}).items()} == {"👍": ["ann", "b1"]}
    assert (now[2].text, now[2].edited, now[2].reactions) == ("still anonymous", 4, None)
    assert [(m.kind, m.target) for m in p.messages[2:4]] == [("edit", 1), ("edit", 2)]
    assert [m.text for m in p.messages[4:]] == ["👍", "👍", "👍", "🎉", "🎉", "🙂"]

    # A delete takes the text out of storage (the message's, and its edits'), keeps the id.
    gone = yield b.publish("tea", "Alice", "", None, "a1", "", "delete", m1.id, True)
    for kind, text in [("edit", "again"), ("react", "👍"), ("delete", "")]:
        with pytest.raises(Refused) as no:
            yield b.publish("tea", "Alice", text, None, "a1", "", kind, m1.id, True)
        assert no.value.code == "not_found"
    stored = _stored_text(kit, b)
    assert "draft" not in stored and "anonymous" in stored
    for read in (
        (yield b.read_page("tea", 0, None, 50, False)).messages,
        (yield b.join("tea", f"{b.node}.1", "carol", True, 0, True, 10, None)).history,
        (yield b.read_after("tea", None, 0))[1],
    ):
        assert [m.id for m in read] == list(range(1, gone.id + 1))
        first, its_edit = read[0], read[2]
        assert (first.text, first.deleted, first.reactions, first.sender) == (
            "",
            gone.id,
            None,
            "Alice",
        )
        assert (its_edit.kind, its_edit.target, its_edit.text) == ("edit", 1, "")
        assert (read[1].text, read[1].edited) == ("still anonymous", 4)
        assert (read[-1].kind, read[-1].target) == ("delete", 1)


@pytest_twisted.inlineCallbacks
def test_reactions_are_bounded_per_message(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    m = yield b.publish("tea", "ann", "react to me")
    for i in range(MAX_REACTIONS):
        yield b.publish("tea", "bob", chr(0x1F600 + i), None, "b1", "", "react", m.id)
    with pytest.raises(Refused) as no:
        yield b.publish("tea", "bob", "🦀", None, "b1", "", "react", m.id)
    assert no.value.code == "too_many"
    yield b.publish("tea", "cy", chr(0x1F600), None, "c1", "", "react", m.id)  # one of them: fine
    p = yield b.read_page("tea", 0, 2, 1, False)
    assert len(p.messages[0].reactions or {}) == MAX_REACTIONS
    assert (p.messages[0].reactions or {})[chr(0x1F600)] in (["b1", "c1"], ["c1", "b1"])


@pytest_twisted.inlineCallbacks
def test_a_replay_in_pages_has_no_gap_where_messages_were_deleted(kit):
    b = yield kit.broker(retention=400)
    yield kit.subscribed(b, "tea")
    yield gather([b.publish("tea", "ann", f"{i:04d}" + "x" * 1000) for i in range(100)])
    for target in (1, 2, 50, 51, 99, 100):
        yield b.publish("tea", "ann", "", None, "", "", "delete", target, True)
    joined = yield b.join("tea", f"{b.node}.1", "bob", True, 0, True, 10, None)
    assert not joined.truncated
    got = list(joined.history)
    cursor = joined.more
    while cursor is not None and cursor.after < cursor.until:
        page = yield defer.maybeDeferred(cursor.read)
        assert page, "a page came back empty before the end"
        got += page
        assert len(got) < 1000
    assert [m.id for m in got] == list(range(1, 107))
    assert [m.id for m in got if m.deleted] == [1, 2, 50, 51, 99, 100]
    assert all(m.text == "" for m in got if m.deleted)


@pytest_twisted.inlineCallbacks
def test_a_silent_listener_gets_a_marker_and_is_no_member(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    yield b.join("tea", f"{b.node}.1", "ann", True, None, True, 10, None)
    heard = yield b.join("tea", f"{b.node}.2", "ann", True, None, True, 10, None, "", "", True)
    assert heard.members == ["ann"]  # (its nick claimed nothing: ann's stays ann's)
    assert (yield b.members("tea")) == ["ann"]
    b.leave("tea", f"{b.node}.2", False)
    yield b.publish("tea", "ann", "after")  # a marker after the leave: nothing came before it
    rec = b.recorder
    yield rec.until(lambda: rec.ids("tea") == [1], "the message")
    presence = [e[1:] for e in rec.kinds("tea") if e[0] == "p"]
    assert presence == [(f"{b.node}.1", "ann", "join"), (f"{b.node}.2", "", "mark")]


@pytest_twisted.inlineCallbacks
def test_read_after_gives_what_a_gap_missed(kit):
    b = yield kit.broker()
    yield kit.subscribed(b, "tea")
    stored = yield gather([b.publish("tea", "ann", f"t{i}") for i in range(6)])
    epoch, after = yield b.read_after("tea", None, 3)
    assert [m.id for m in after] == [4, 5, 6] and [m.text for m in after] == ["t3", "t4", "t5"]
    assert epoch is not None and all(m.room == "tea" for m in after)
    same, again = yield b.read_after("tea", epoch, 3)
    assert same == epoch and [m.id for m in again] == [4, 5, 6]
    _, everything = yield b.read_after("tea", "y" * 12, 3)  # another epoch: from the start
    assert [m.id for m in everything] == [m.id for m in stored]


# -- several processes -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_relay_reaches_the_other_processes_not_the_publisher(kit):
    kit.needs_processes()
    a = yield kit.broker()
    b = yield kit.broker()
    for x in (a, b):
        x.relay_subscribe("fx")

    def relayed(x: Any) -> list[tuple[Any, ...]]:
        return [e[1:] for e in x.recorder.events if e[0] == "r"]

    # (a relay subscription is not confirmed: at most once, as a relay is)
    for _ in range(500):
        a.relay_publish("fx", b"\x00\xff", True)
        yield _turn()
        if relayed(b):
            break
    assert relayed(b)[0] == ("fx", b"\x00\xff", True)
    assert relayed(a) == []


def _turn(seconds: float = 0.01) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_presence_expires_with_a_silent_process_and_comes_back_after_a_resync(kit):
    kit.needs_processes()
    a = yield kit.broker(ttl=1.0)
    b = yield kit.broker(ttl=1.0)
    yield kit.subscribed(b, "tea")
    yield a.join("tea", f"{a.node}.1", "ann", True, None, True, 10, None)
    yield b.recorder.until(
        lambda: ("p", f"{a.node}.1", "ann", "join") in b.recorder.kinds("tea"), "ann joins"
    )
    a._beat.stop()  # node a goes silent (its connection stays: a cut-off node)
    yield b.recorder.until(
        lambda: ("p", f"{a.node}.1", "ann", "leave") in b.recorder.kinds("tea"), "ann reaped"
    )
    held = yield b.join("tea", f"{b.node}.1", "ann", True, None, True, 10, None)  # nick free
    assert held.members == ["ann"]


@pytest_twisted.inlineCallbacks
def test_a_users_presence_expires_once_with_its_silent_process(kit):
    kit.needs_processes()
    a = yield kit.broker(ttl=1.0)
    b = yield kit.broker(ttl=1.0)
    yield kit.subscribed(b, "tea")
    for i in (1, 2):  # two tabs of one user on node a
        yield a.join("tea", f"{a.node}.{i}", "Alice", False, None, True, 10, None, user="a1")
    yield b.join("tea", f"{b.node}.1", "Alice", False, None, True, 10, None, user="a1")
    yield a.join("tea", f"{a.node}.3", "Zed", False, None, True, 10, None, user="z1")
    a._beat.stop()  # node a goes silent: its two member ids are reaped, the user stays (on b)
    yield _reaped(b, a.node)
    assert (yield b.members("tea")) == ["Alice"]
    # The user gone with the silent node (Zed, not Alice) is said by the reaper, once.
    assert [e for e in b.recorder.events if e[0] == "x"] == [
        ("x", "tea", f"{a.node}.3", "Zed", "z1")
    ]
    b.leave("tea", f"{b.node}.1", True)
    yield b.recorder.until(
        lambda: ("p", f"{b.node}.1", "Alice", "leave", "a1") in b.recorder.kinds("tea"),
        "her last member id leaves",
    )
    kinds = [e for e in b.recorder.kinds("tea") if e[0] == "p" and e[2] != "Zed"]
    assert [e[3] for e in kinds] == ["join", "mark", "mark", "leave"]  # once each
    assert (yield b.members("tea")) == []


@defer.inlineCallbacks
def _reaped(b: Any, node: str) -> Any:
    """Until none of ``node``'s member ids is left in the room (polled, bounded)."""
    for _ in range(int(WAIT / 0.05)):
        left = yield b.conn.call("HKEYS", "chatd:c:{tea}:m")
        if not any(k.decode().startswith(node + ".") for k in left):
            return
        yield _turn(0.05)
    raise AssertionError(f"{node}'s members were not reaped within {WAIT} s")


@pytest_twisted.inlineCallbacks
def test_a_session_is_handed_over_by_the_process_holding_it_once(kit, monkeypatch):
    if not kit.multi:  # one process: no other node's session to ask for
        b = yield kit.broker()
        assert (yield b.resume("elsewhere", "elsewhere.x", "")) is None
        return
    monkeypatch.setattr("chatd.limits.RESUME_ASK_TIMEOUT", 0.5)
    a = yield kit.broker()
    b = yield kit.broker()
    a.recorder.sessions[f"{a.node}.s1"] = ("", ["lobby", "tea"])
    a.recorder.sessions[f"{a.node}.s2"] = ("alice", ["dm:alice,bob"])
    assert (yield b.resume(a.node, f"{a.node}.s1", "")) == ["lobby", "tea"]
    assert (yield b.resume(a.node, f"{a.node}.s1", "")) is None  # once
    assert (yield b.resume(a.node, f"{a.node}.s2", "mallory")) is None  # another user's
    assert (yield b.resume(a.node, f"{a.node}.s2", "alice")) == ["dm:alice,bob"]
    # A node that is gone (or never was) does not answer: None after the timeout.
    assert (yield b.resume("0123456789ab", "0123456789ab.s3", "")) is None
    assert [e for e in b.recorder.events if e[0] == "t"] == []  # b held none of them


# -- the hub, written once, over either broker ----------------------------------------------


class Plain:
    """A wire format for the hub: one line per event."""

    def message(self, msg: Message) -> bytes:
        return f"m {msg.id} {msg.sender}: {msg.text}".encode()

    def presence(self, room: str, nick: str, event: str, user: str) -> bytes:
        return f"p {nick} {event}".encode()

    def reset(self, event: Any) -> bytes:
        return f"r {event.epoch}".encode()

    def typing(self, room: str, user: str, name: str) -> bytes:
        return f"t {name}".encode()

    def read(self, room: str, user: str, name: str, id: int) -> bytes:
        return f"rd {name} {id}".encode()


class Client:
    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        from chatd.fanout import Link

        self.transport = StringTransport()
        self.link = Link(self.transport, 1 << 20, lambda why: None)

    def lines(self) -> list[str]:
        """The text frames written so far (short, unmasked: 2-byte headers)."""
        data, out = self.transport.value(), []
        while data:
            n = data[1]
            out.append(data[2 : 2 + n].decode())
            data = data[2 + n :]
        return out


@defer.inlineCallbacks
def seen(c: Client, line: str) -> Any:
    for _ in range(1500):
        if line in c.lines():
            return
        yield _turn()
    raise AssertionError(f"{line!r} not in {c.lines()}")


@pytest_twisted.inlineCallbacks
def test_the_hub_is_the_same_chat_over_either_broker(kit):
    from chatd.hub import Hub

    hubs = []
    for _ in range(2 if kit.multi else 1):  # on Redis: two nodes, one room
        b = yield kit.broker()
        hub = Hub(b, stats=b.stats)
        hub.add_format("plain", Plain())
        hubs.append(hub)
    ann, bob = Client(), Client()
    j = yield hubs[0].chat_join("tea", ann.link, "ann", "plain")
    assert j.members == ["ann"]
    j = yield hubs[-1].chat_join("tea", bob.link, "bob", "plain")
    assert sorted(j.members) == ["ann", "bob"]
    yield seen(ann, "p bob join")
    with pytest.raises(NickTaken):
        yield hubs[-1].chat_join("tea", Client().link, "ANN", "plain")
    m = yield hubs[-1].post("tea", "bob", "hi")
    assert m.id == 1
    for c in (ann, bob):
        yield seen(c, "m 1 bob: hi")
    assert hubs[0].chat_leave("tea", ann.link)
    yield seen(bob, "p ann leave")
    assert "p bob join" not in bob.lines()  # no one is told of their own join
    for hub in hubs:
        assert hub.room_counts() == {"chat": int(hub is hubs[-1]), "relay": 0}


@pytest_twisted.inlineCallbacks
def test_a_user_comes_online_and_goes_offline_once_across_every_process(kit):
    """``Hub.user_listeners`` (what webhooks build on): a user with tabs on every node
    is online once and offline once, each said by one node alone, after the debounce;
    ``message_listeners`` hear of a message once, on the node that stored it."""
    from chatd.hub import ONLINE, Hub

    said: list[tuple[str, str, str, bool]] = []
    stored: list[tuple[str, int]] = []
    hubs = []
    for i in range(2 if kit.multi else 1):
        b = yield kit.broker()
        hub = Hub(b, stats=b.stats, presence_debounce=0.2)
        hub.user_listeners.append(lambda u, n, on, i=i: said.append((f"node{i}", u, n, on)))
        hub.message_listeners.append(lambda m, i=i: stored.append((f"node{i}", m.id)))
        hubs.append(hub)
    tabs = [Client() for _ in range(4)]
    for n, tab in enumerate(tabs):
        hubs[n % len(hubs)].track_user(tab.link, "a1", "Alice")
    hubs[0].track_user(Client().link, "", "anonymous")  # not tracked: no user
    yield hubs[-1].post("tea", "Alice", "hi", None, "a1")
    for _ in range(1500):
        if said:
            break
        yield _turn()
    assert [x[1:] for x in said] == [("a1", "Alice", True)]  # once, by one node
    for n, tab in enumerate(tabs):
        hubs[n % len(hubs)].chat_leave(ONLINE, tab.link)
    for _ in range(1500):
        if len(said) == 2:
            break
        yield _turn()
    assert said[1][1:] == ("a1", "Alice", False) and len(said) == 2
    assert stored == [(f"node{len(hubs) - 1}", 1)]
    assert all(h.rooms() == {} for h in hubs)  # (never listed as a room)


# -- presence lists and kicks, across processes -------------------------------------------


@pytest_twisted.inlineCallbacks
def test_members_lists_the_room_as_presence_has_it_in_every_process(kit):
    nodes = []
    for _ in range(2 if kit.multi else 1):
        nodes.append((yield kit.broker()))
    for i, b in enumerate(nodes):
        yield b.join("tea", f"{b.node}.1", f"user{i}", True, None, False, 0, None)
    for b in nodes:
        got = yield b.members("tea")
        assert sorted(got) == [f"user{i}" for i in range(len(nodes))]
    nodes[0].leave("tea", f"{nodes[0].node}.1", True)
    yield nodes[-1].join("tea", f"{nodes[-1].node}.9", "sync", False, None, False, 0, None)
    got = yield nodes[-1].members("tea")
    assert "user0" not in got and "sync" in got
    assert (yield nodes[0].members("nowhere")) == []


@pytest_twisted.inlineCallbacks
def test_a_kick_reaches_every_process_the_kicking_one_too(kit):
    nodes = []
    for _ in range(2 if kit.multi else 1):
        nodes.append((yield kit.broker()))

    def kicked(b: Any) -> set[str]:
        return {e[2] for e in b.recorder.events if e[0] == "k"}

    # (a node subscribes to the control channel as it starts: kick until it is through)
    for _ in range(500):
        nodes[0].kick("alice")
        if all(kicked(b) for b in nodes):
            break
        yield _turn()
    assert [kicked(b) for b in nodes] == [{"alice"}] * len(nodes)
