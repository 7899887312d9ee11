"""The broker seam: what differs between one process and a cluster, and nothing else.

``chatd.hub.Hub`` holds everything about chat once: rooms, the links of this
process and their members, the join that meets the live stream exactly,
epochs and resets, gap filling, rendering per wire format and the fan-out.
Below it, a ``Broker`` stores and orders: it gives a message its id and
appends it to the room's history in the same atomic step as it publishes
it, it keeps presence, and it tells the hub (through ``BrokerEvents``)
what was published, in order. Two brokers implement the contract:

- ``MemoryBroker`` (here): one process; history in SQLite
  (``chatd.history.History``), presence in dicts, publications delivered
  synchronously once their batch is committed. The default.
- ``chatd.cluster.RedisBroker``: several nodes; ids, history (a stream),
  presence (a hash per room, expiry by node heartbeat) and publication
  (pub/sub) in Redis, each step one Lua script.

tests/test_broker.py runs one body of contract tests against both (the Redis
one against a real redis-server), so a feature written in the hub (per-user
presence, edits, read markers) is written once and holds on both.

The contract
------------

**Atomic.** ``publish`` assigns the room's next id, appends the message to
the history and publishes it as one step: a message either has an id, is in
the history and reaches every subscriber, or none of these (the Deferred
fails with ``Unavailable``). ``join`` records the member (claiming its nick
key if ``unique``), reads the snapshot (member list, last id, the first page
of history) and publishes the member's marker (``presence`` ``join``, or
``mark`` for a member that was there already, or whose user was) as one
step: so the marker splits the room's stream exactly, events before it are
in the snapshot, events after it are not.

**Users.** A member joined with a ``user`` (a token's ``sub``) counts
toward that user: the broker says ``join`` for the user's first member id
in the room and ``leave`` after its last, and lists the user once in
``members`` and snapshots, whichever process holds the ids (also when a
silent process's members expire). The debounce of a user's leave is the
hub's: it calls ``leave`` late.

**Idempotent.** ``publish`` with a ``key`` first looks for a message the
key made in the room within the dedupe window, in the same atomic step: a
retry, even one racing the first send from another process, stores nothing
and fails with ``Duplicate`` (the first message).

**Edits, deletes and reactions** are messages too (``kind`` and ``target``):
``publish`` checks, in the same atomic step as the id, that the target is a
kept, undeleted message (and, with ``author``, the sender's own), applies the
event to it and stores the event; or does nothing and fails with
``Refused``. Reads give a message as it is now: its current text and
``edited``, ``deleted`` with the text gone from storage, its ``reactions``.

**Ordered.** A room's events (messages, presence, markers) reach
``BrokerEvents`` in the one order the broker applied them, messages in id
order, from the moment ``subscribed(room)`` was called for the room until
``unsubscribe`` or ``channels_lost``. Different rooms are not ordered
relative to each other.

**Ids and epochs.** Ids count 1, 2, 3... within a room's epoch (a random
string created with the room's first id; ``chatd.history``). If the broker
loses a room's data, the room starts again at id 1 under a new epoch: every
message event carries its epoch so the hub can tell.

**What may fail, and how.** Every Deferred fails with ``Unavailable`` when
the broker cannot do the step (storage error, Redis down); nothing was done
then, except that a ``join`` whose reply was lost may have recorded the
member (the hub calls ``leave`` for it). ``join`` fails with ``NickTaken``
when another member id holds the nick key. While ``up`` is False the hub
refuses joins and posts itself. ``leave`` and the relay methods never fail:
they are best effort (a cluster's presence expires with its node;
relay rooms are at-most-once, as a relay is).

**Presence expiry.** Presence belongs to the process that added it. A
broker whose presence outlives a process (Redis) expires a node's members
when the node is silent for its TTL, publishing their ``leave``; after a
reconnect it asks ``BrokerEvents.live_members`` and makes its record match.
``MemoryBroker``'s presence lives and dies with the process.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from chatd import limits
from chatd.history import History, Message, Ref, Refused
from chatd.stats import Stats

__all__ = [
    "Broker",
    "BrokerEvents",
    "Duplicate",
    "HistoryCursor",
    "Joined",
    "MemoryBroker",
    "NickTaken",
    "Page",
    "Refused",
    "Reset",
    "Unavailable",
]


class NickTaken(Exception):
    """Another member of the room has this nick."""


class Unavailable(Exception):
    """The message could not be stored (or the join recorded), so nothing was done."""


class Duplicate(Exception):
    """A send with this idempotency key made ``original`` already: nothing was stored."""

    def __init__(self, original: Message) -> None:
        super().__init__(f"message {original.id} of {original.room} was sent with this key")
        self.original = original


class HistoryCursor(Protocol):
    """Messages after ``after`` up to ``until``, a batch per ``read``."""

    after: int
    until: int

    def read(self) -> list[Message] | Deferred[list[Message]]:
        """The next batch, oldest first (or a Deferred of it); fails if some are gone."""
        ...


@dataclass(frozen=True, slots=True)
class Joined:
    """A join's snapshot: the room as it was at the member's marker."""

    room: str
    members: list[str]
    history: list[Message]
    last_id: int
    truncated: bool  # messages after ``since`` were lost to retention
    epoch: str | None = None  # the room's history epoch; None while it has no message
    reset: bool = False  # the join named another epoch: ``since`` was not used
    # The rest of the history after ``history``, read as the client takes it
    # (None: ``history`` is all of it).
    more: HistoryCursor | None = None
    read: int = 0  # the joiner's read marker (``Broker.mark_read``; 0: none)
    unread: int = 0  # kept messages after it (not edits, deletes or reactions; not deleted ones)


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a room's history, asked for by id (``Broker.history``)."""

    messages: list[Message]
    more: bool  # more are kept beyond them, on the side asked for (``Broker.read_page``)
    epoch: str | None  # the epoch the ids count in


@dataclass(frozen=True, slots=True)
class Reset:
    """The room's history starts again as ``epoch``: what follows has ids above ``last_id``."""

    room: str
    epoch: str
    last_id: int


class BrokerEvents(Protocol):
    """What a broker tells its hub, on the reactor thread, in each room's order."""

    def message(self, room: str, msg: Message, epoch: str | None) -> None:
        """A message was published (``epoch`` None: a publisher older than epochs)."""

    def presence(self, room: str, mid: str, nick: str, kind: str, user: str) -> None:
        """Member ``mid`` joined (``join``), left (``leave``) or joined again (``mark``,
        with ``nick`` empty: nothing changed but the marker). ``user``: the member's
        token ``sub`` ("" for an anonymous member); a user's presence is counted
        once: its first member id's join is a ``join``, a further one's a
        ``mark``, and only its last member id's leave is a ``leave``."""

    def expired(self, room: str, mid: str, nick: str, user: str) -> None:
        """This process removed a silent process's member ``mid`` of ``room``, the last
        member id of ``user`` there (its ``leave`` went to every process as ever):
        said by the one process that removed it, so exactly once for the cluster."""

    def relay(self, room: str, payload: bytes, binary: bool) -> None:
        """Another process published to a relay room this process subscribed to."""

    def typing(self, room: str, user: str, name: str) -> None:
        """A member of ``room`` (``user``, or "" for an anonymous one named ``name``)
        is typing (``Broker.typing``, from any process; this one too)."""

    def read(self, room: str, user: str, name: str, id: int) -> None:
        """A member's read marker in ``room`` moved up to ``id`` (``Broker.mark_read``)."""

    def kicked(self, user: str) -> None:
        """Close every connection of ``user`` here (``Broker.kick``, from any process)."""

    def resume(self, secret: str, user: str) -> list[str] | None:
        """Another process asks (``Broker.resume``): close the session of this process
        holding ``secret``, if it is ``user``'s ("" for anonymous), and give its rooms;
        None if there is none."""

    def subscribed(self, room: str) -> None:
        """The room's events reach this process from now on (again, after a loss)."""

    def channels_lost(self) -> None:
        """Every subscription is lost until ``subscribed`` says otherwise (events missed)."""

    def state(self, up: bool) -> None:
        """The broker can (True) or cannot (False) store and publish now."""

    def live_members(self) -> Iterable[tuple[str, str, str, bool, str]]:
        """(room, member id, nick, unique, user) of every member this process holds
        (a leave it has not said yet included)."""


class Broker(Protocol):
    """Ids, history, presence and publication for a hub (see the module docstring)."""

    node: str  # this process's id: member ids are ``f"{node}.{n}"``
    retention: int  # messages kept per room

    @property
    def up(self) -> bool: ...

    def attach(self, events: BrokerEvents) -> None:
        """The hub that gets the events; called once, before ``start``."""

    def start(self) -> None: ...

    def close(self) -> Deferred[None] | None:
        """Commit what is pending, take this process's members out, let go."""

    # -- the streams of chat rooms ------------------------------------------------
    def subscribe(self, room: str) -> None:
        """Deliver ``room``'s events from when ``BrokerEvents.subscribed(room)`` is called."""

    def unsubscribe(self, room: str) -> None: ...

    def publish(
        self,
        room: str,
        sender: str,
        text: str,
        ref: Ref = None,
        user: str = "",
        key: str = "",
        kind: str = "",
        target: int = 0,
        author: bool = False,
    ) -> Deferred[Message]:
        """Id, append and publish, atomically; fires with the stored Message
        (``user``: the sender's token ``sub``, stored with it). With an idempotency
        ``key``: if a message of the room was made with it within the dedupe window,
        nothing is done and the Deferred fails with ``Duplicate`` (that message);
        the check and the store are one atomic step. With a ``kind``
        (``history.KINDS``), an event about message ``target``, applied to it in the
        same step, or ``Refused`` (see the module docstring)."""

    def flush(self) -> None:
        """Complete what ``publish`` has accepted so far (a batch), now."""

    def read_after(
        self, room: str, epoch: str | None, after: int
    ) -> Deferred[tuple[str | None, list[Message]]]:
        """The room's epoch and its messages after ``after`` (all of them if the
        epoch is not ``epoch``): how a gap in the stream is filled."""

    def read_page(
        self, room: str, after: int, before: int | None, limit: int, newest: bool
    ) -> Deferred[Page]:
        """A page of the kept history: up to ``limit`` messages with ``after`` < id <
        ``before`` (None: no bound), oldest first, the ``newest`` of them or the
        oldest; ``more``: whether more are kept on that side."""

    # -- presence ---------------------------------------------------------------
    def join(
        self,
        room: str,
        mid: str,
        nick: str,
        unique: bool,
        since: int | None,
        snapshot: bool,
        count: int,
        epoch: str | None,
        user: str = "",
        reader: str = "",
        silent: bool = False,
    ) -> Deferred[Joined]:
        """Record member ``mid``, publish its marker, read the snapshot, atomically.

        ``since``: history after this id (None: the last ``count`` messages);
        ``snapshot`` False: no member list and no history; ``epoch``: the epoch
        ``since`` counts in (another epoch: as if ``since`` were None, ``reset``);
        ``user``: the member's token ``sub`` (its presence counts per user);
        ``reader``: whose read marker the snapshot carries (``Joined.read``);
        ``silent``: a listener (an SSE stream), not a member: nothing is recorded,
        no nick claimed, only the marker (``mark``) is published, and its
        ``leave`` says nothing.
        """

    def leave(self, room: str, mid: str, last: bool) -> None:
        """Remove member ``mid`` and publish its ``leave``; ``last``: no member of
        the room is left in this process."""

    def members(self, room: str) -> Deferred[list[str]]:
        """The nicks of the room's members in every process, as presence has them now
        (a user with several member ids once)."""

    def kick(self, user: str) -> None:
        """Tell every process (this one too) to close ``user``'s connections (best effort)."""

    def resume(self, node: str, secret: str, user: str) -> Deferred[list[str] | None]:
        """Ask process ``node`` to hand over its session holding ``secret``
        (``BrokerEvents.resume`` there); fires with the session's rooms, or None if
        there is none, or no answer came within ``limits.RESUME_ASK_TIMEOUT``.
        Everything the session held (its members, its nick) was let go of before
        the answer fires. Never fails."""

    def typing(self, room: str, user: str, name: str) -> None:
        """Tell every process holding members of ``room`` (this one too) that ``user``
        (``name``) is typing: not stored, best effort, in the room's order."""

    def mark_read(self, room: str, reader: str, id: int, user: str, name: str) -> Deferred[int]:
        """Move ``reader``'s marker in ``room`` up to ``id`` (never back, never past the
        room's last id), durably; fires with the marker as it is now. When it moved,
        every process holding the room's members is told (``BrokerEvents.read``)."""

    # -- relay rooms (best effort) -----------------------------------------------
    def relay_subscribe(self, room: str) -> None: ...

    def relay_unsubscribe(self, room: str) -> None: ...

    def relay_publish(self, room: str, payload: bytes, binary: bool) -> None:
        """For the other processes' members (this process has delivered already)."""


_log = Logger()

SWEEP_EVERY = 60.0  # seconds between sweeps of expired messages (``History.sweep``)


def _later(f: Callable[[], object]) -> None:
    from twisted.internet import reactor

    reactor.callLater(0, f)


@dataclass(slots=True)
class _Presence:
    members: dict[str, tuple[str, str, str]] = field(
        default_factory=dict
    )  # mid -> (key, nick, user)
    nicks: dict[str, str] = field(default_factory=dict)  # nick key -> mid
    users: dict[str, int] = field(default_factory=dict)  # user -> its member ids here


def once_per_user(members: Iterable[tuple[str, str]]) -> list[str]:
    """The nicks of (nick, user) pairs, a user's first only (anonymous ones all)."""
    seen: set[str] = set()
    nicks = []
    for nick, user in members:
        if user:
            if user in seen:
                continue
            seen.add(user)
        nicks.append(nick)
    return nicks


class MemoryBroker:
    """One process: history in SQLite, presence in memory.

    ``publish`` writes at once and commits everything accepted in one reactor
    turn together (``flush``, which ``call_soon`` schedules): only then are
    the messages published (``BrokerEvents.message``, in id order) and their
    Deferreds fired. If the commit fails none of the batch is published and
    every Deferred of it fails with ``Unavailable``. ``join`` and ``leave``
    flush first, so a joiner's snapshot holds everything accepted before it,
    and a leaver's own messages reach it before it goes. Everything else
    happens in the call: ``subscribed`` is called from ``subscribe``, a
    marker or a leave is published from ``join`` or ``leave``.
    """

    up = True

    def __init__(
        self,
        history: History | None = None,
        call_soon: Callable[[Callable[[], object]], object] = _later,
        stats: Stats | None = None,
    ) -> None:
        self.history = history if history is not None else History(":memory:", 0)
        self.retention = self.history.retention
        self.stats = stats if stats is not None else Stats()
        self.node = "local"
        self._call_soon = call_soon
        self._pending: list[tuple[Message, Deferred[Message]]] = []
        self._repeats: list[tuple[Message, Deferred[Message]]] = []  # of a pending message
        self._sweeper: Any = None  # a LoopingCall deleting expired messages (--history-ttl)
        self._presence: dict[str, _Presence] = {}
        self.events: BrokerEvents | None = None

    def attach(self, events: BrokerEvents) -> None:
        self.events = events

    def start(self) -> None:
        if self.history.ttl_ms:  # expired messages of quiet rooms go too, a few rooms a time
            from twisted.internet import task

            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.start(SWEEP_EVERY, now=False)

    def _sweep(self) -> None:
        self.flush()
        try:
            self.history.sweep()
        except sqlite3.Error as e:  # tried again next time; what is expired is never read
            _log.warn("history: expired messages not deleted now: {error}", error=str(e))

    def close(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self.flush()
        self.history.close()

    # -- streams ----------------------------------------------------------------
    def subscribe(self, room: str) -> None:
        assert self.events is not None
        self.events.subscribed(room)

    def unsubscribe(self, room: str) -> None:
        pass

    def publish(
        self,
        room: str,
        sender: str,
        text: str,
        ref: Ref = None,
        user: str = "",
        key: str = "",
        kind: str = "",
        target: int = 0,
        author: bool = False,
    ) -> Deferred[Message]:
        try:
            if key:
                made = self.history.sent(room, key)
                if made is not None:
                    return self._duplicate(made)
            msg = self.history.append(room, sender, text, ref, user, key, kind, target, author)
        except Refused as e:
            return fail(e)
        except sqlite3.Error as e:
            # Nothing of this batch can be trusted now: fail it all, publish none.
            self._fail_pending(e)
            return fail(Unavailable(str(e)))
        d: Deferred[Message] = Deferred()
        if not self._pending:
            self._call_soon(self.flush)
        self._pending.append((msg, d))
        return d

    def flush(self) -> None:
        """Commit what was published, then deliver it, in id order."""
        if not self._pending:
            return
        started = time.perf_counter()
        try:
            self.history.commit()
        except sqlite3.Error as e:
            self._fail_pending(e)
            return
        self.stats.history_commit.observe(time.perf_counter() - started)
        pending, self._pending = self._pending, []
        events, epoch = self.events, self.history.epoch
        assert events is not None
        for msg, d in pending:
            events.message(msg.room, msg, epoch(msg.room))
            d.callback(msg)
        repeats, self._repeats = self._repeats, []
        for msg, d in repeats:
            d.errback(Duplicate(msg))

    def _duplicate(self, made: Message) -> Deferred[Message]:
        """Fail with ``Duplicate``; if ``made`` is still in the batch, once it is committed."""
        for msg, _ in self._pending:
            if msg.id == made.id and msg.room == made.room:
                waiting: Deferred[Message] = Deferred()
                self._repeats.append((msg, waiting))
                return waiting
        return fail(Duplicate(made))

    def _fail_pending(self, error: Exception) -> None:
        """Roll back the uncommitted batch: none of it is sent, every sender is told."""
        self.history.rollback()
        pending, self._pending = self._pending, []
        repeats, self._repeats = self._repeats, []
        for _, d in pending + repeats:
            d.errback(Unavailable(str(error)))

    def read_after(
        self, room: str, epoch: str | None, after: int
    ) -> Deferred[tuple[str | None, list[Message]]]:
        self.flush()
        try:
            current = self.history.epoch(room)
            if epoch is not None and current != epoch:
                after = 0
            msgs, _, _ = self.history.page(room, after, None)
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        return succeed((current, msgs))

    def read_page(
        self, room: str, after: int, before: int | None, limit: int, newest: bool
    ) -> Deferred[Page]:
        self.flush()
        try:
            msgs, more = self.history.range(room, after, before, limit, newest)
            epoch = self.history.epoch(room)
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        return succeed(Page(msgs, more, epoch))

    # -- presence ---------------------------------------------------------------
    def join(
        self,
        room: str,
        mid: str,
        nick: str,
        unique: bool,
        since: int | None,
        snapshot: bool,
        count: int,
        epoch: str | None,
        user: str = "",
        reader: str = "",
        silent: bool = False,
    ) -> Deferred[Joined]:
        self.flush()
        history = self.history
        try:
            current = history.epoch(room)
            last_id = history.last_id(room)
            read = history.read_marker(room, reader) if reader else 0
            unread = history.unread(room, read) if reader else 0
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        key = limits.nick_key(nick) if unique and not silent else ""
        p = self._presence.get(room)
        if p is None:
            p = _Presence()
            if not silent:  # (a listener alone keeps no record)
                self._presence[room] = p
        elif key:
            holder = p.nicks.get(key)
            if holder is not None and holder != mid:
                return fail(NickTaken(nick))
        if key:
            p.nicks[key] = mid
        new = mid not in p.members and not silent
        if not silent:
            p.members[mid] = (key, nick, user)
        if new and user:  # news only as the user's first member id
            n = p.users[user] = p.users.get(user, 0) + 1
            new = n == 1
        assert self.events is not None
        if new:
            self.events.presence(room, mid, nick, "join", user)
        else:
            self.events.presence(room, mid, "", "mark", "")
        reset = epoch is not None and epoch != current
        if reset:
            since = None
        if not snapshot:
            return succeed(Joined(room, [], [], last_id, False, current, reset, None, read, unread))
        try:
            if since is None:
                after = max(0, last_id - min(count, history.retention))
                msgs, _, cursor = history.page(room, after)
                truncated = False
            else:
                msgs, truncated, cursor = history.page(room, since)
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        members = once_per_user((n, u) for _, n, u in p.members.values())
        return succeed(
            Joined(room, members, msgs, last_id, truncated, current, reset, cursor, read, unread)
        )

    def leave(self, room: str, mid: str, last: bool) -> None:
        self.flush()
        p = self._presence.get(room)
        value = p.members.pop(mid, None) if p is not None else None
        if p is None or value is None:
            return
        key, nick, user = value
        if key and p.nicks.get(key) == mid:
            del p.nicks[key]
        if user:
            n = p.users[user] - 1
            if n:
                p.users[user] = n
                return  # the user is still here
            del p.users[user]
        if not p.members:
            del self._presence[room]
        assert self.events is not None
        self.events.presence(room, mid, nick, "leave", user)

    def members(self, room: str) -> Deferred[list[str]]:
        p = self._presence.get(room)
        if p is None:
            return succeed([])
        return succeed(once_per_user((n, u) for _, n, u in p.members.values()))

    def kick(self, user: str) -> None:
        assert self.events is not None
        self.events.kicked(user)

    def resume(self, node: str, secret: str, user: str) -> Deferred[list[str] | None]:
        """One process: another node's session is nowhere (the hub asks its own itself)."""
        return succeed(None)

    def typing(self, room: str, user: str, name: str) -> None:
        assert self.events is not None
        self.events.typing(room, user, name)

    def mark_read(self, room: str, reader: str, id: int, user: str, name: str) -> Deferred[int]:
        self.flush()
        try:
            before = self.history.read_marker(room, reader)
            now = self.history.mark_read(room, reader, id)
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        if now > before:
            assert self.events is not None
            self.events.read(room, user, name, now)
        return succeed(now)

    # -- relay rooms: one process has no one else to tell -------------------------
    def relay_subscribe(self, room: str) -> None:
        pass

    def relay_unsubscribe(self, room: str) -> None:
        pass

    def relay_publish(self, room: str, payload: bytes, binary: bool) -> None:
        pass
