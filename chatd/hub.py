"""Rooms and their members: the seam a multi-node (Redis) hub plugs into.

Protocols never loop over clients themselves: they join, leave, publish and
post through a ``Hub``. ``InMemoryHub`` is the single-process implementation;
``chatd.cluster.RedisHub`` keeps these methods and does id assignment,
storage and publication in Redis. Both keep the links they hold in a
``Local``, which renders each event once per wire format and hands it to
``fanout.broadcast``: the per-message hot path is there and in fanout.

Two kinds of room, in separate namespaces:

- relay rooms (``publish``): opaque bytes, byte-exact to every member;
- chat rooms (``chat_join``/``post``): messages with ids and history, and
  presence. Members of one chat room may speak different wire formats (the
  plain seed chat and chatd.v1 share ``lobby``), so members are grouped by
  format and each message is rendered once per format, then fanned out.

``chat_join`` and ``post`` return Deferreds: in one process they have fired
already, in a cluster they wait for the broker.

A room's ids count within its history's **epoch** (``Joined.epoch``; see
chatd/history.py). A join whose ``epoch`` is not the room's current one gets
a fresh join (``since`` means nothing there) marked ``reset``; when a
cluster's room starts a new epoch under live members (Redis lost its data),
they get a ``Reset`` event before its messages.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from chatd import limits
from chatd.fanout import OUTBOX, Link, Outbox, broadcast
from chatd.history import History, Message, Ref
from chatd.stats import Stats


class Renderer(Protocol):
    """A wire format's view of chat events; None: this format does not show it."""

    def message(self, msg: Message) -> bytes | None: ...

    def presence(self, room: str, nick: str, event: str) -> bytes | None: ...

    def reset(self, event: Reset) -> bytes | None: ...


class NickTaken(Exception):
    """Another member of the room has this nick."""


class Unavailable(Exception):
    """The message could not be stored (or the join recorded), so nothing was done."""


@dataclass(frozen=True, slots=True)
class Joined:
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


@dataclass(frozen=True, slots=True)
class Reset:
    """The room's history starts again as ``epoch``: what follows has ids above ``last_id``."""

    room: str
    epoch: str
    last_id: int


class HistoryCursor(Protocol):
    """Messages after ``after`` up to ``until``, a batch per ``read``."""

    after: int
    until: int

    def read(self) -> list[Message] | Deferred[list[Message]]:
        """The next batch, oldest first (or a Deferred of it); fails if some are gone."""
        ...


@dataclass(slots=True)
class Member:
    nick: str
    fmt: str
    unique: bool


@dataclass(slots=True)
class ChatRoom:
    members: dict[Link, Member] = field(default_factory=dict)
    groups: dict[str, dict[Link, None]] = field(default_factory=dict)  # by format
    nicks: dict[str, Link] = field(default_factory=dict)  # unique ones, by nick_key


class Hub(Protocol):
    # relay rooms
    def join(self, room: str, link: Link) -> None: ...
    def leave(self, room: str, link: Link) -> None: ...
    def publish(self, room: str, payload: bytes, binary: bool) -> int: ...

    # chat rooms
    def add_format(self, name: str, renderer: Renderer) -> None: ...
    def chat_join(
        self,
        room: str,
        link: Link,
        nick: str,
        fmt: str,
        since: int | None = None,
        unique: bool = True,
        snapshot: bool = True,
        epoch: str | None = None,  # the epoch ``since`` belongs to, if the client said
    ) -> Deferred[Joined]: ...  # fires with Joined; fails with NickTaken or Unavailable
    def chat_leave(self, room: str, link: Link) -> bool: ...
    def post(self, room: str, sender: str, text: str, ref: Ref = None) -> Deferred[Message]: ...
    def flush(self) -> None: ...

    def rooms(self) -> dict[str, int]: ...
    def room_counts(self) -> dict[str, int]: ...  # {"chat": n, "relay": n}, in O(1)
    def close(self) -> Deferred[None] | None: ...


class Local:
    """The links this process holds, by room, and the fan-out to them.

    Knows nothing of ids, storage or other nodes; both hubs feed it events.
    """

    def __init__(self, stats: Stats, outbox: Outbox) -> None:
        self.stats = stats
        self.outbox = outbox
        self.relay: dict[str, dict[Link, None]] = {}
        self.chat: dict[str, ChatRoom] = {}
        self.renderers: dict[str, Renderer] = {}

    # -- relay --------------------------------------------------------------
    def relay_add(self, room: str, link: Link) -> bool:
        """Add ``link``; True if the room is new here."""
        members = self.relay.get(room)
        if members is None:
            self.relay[room] = {link: None}
            return True
        members[link] = None
        return False

    def relay_remove(self, room: str, link: Link) -> bool:
        """Remove ``link``; True if the room is now empty here (and forgotten)."""
        members = self.relay.get(room)
        if members is None or link not in members:
            return False
        del members[link]
        if members:
            return False
        del self.relay[room]
        return True

    def relay_send(self, room: str, payload: bytes, binary: bool) -> int:
        members = self.relay.get(room)
        if not members:
            return 0
        n = broadcast(tuple(members), payload, binary, self.outbox)
        self.stats.deliveries["relay"] += n
        self.stats.bytes_out["relay"] += n * len(payload)
        return n

    # -- chat ---------------------------------------------------------------
    def chat_add(self, room: str, link: Link, member: Member) -> bool:
        """Make ``link`` a live member; True if it was not one already."""
        r = self.chat.get(room)
        if r is None:
            r = self.chat[room] = ChatRoom()
        if link in r.members:
            return False
        r.members[link] = member
        r.groups.setdefault(member.fmt, {})[link] = None
        if member.unique:
            r.nicks[limits.nick_key(member.nick)] = link
        return True

    def chat_remove(self, room: str, link: Link) -> Member | None:
        r = self.chat.get(room)
        member = r.members.pop(link, None) if r is not None else None
        if r is None or member is None:
            return None
        group = r.groups[member.fmt]
        del group[link]
        if not group:
            del r.groups[member.fmt]
        if member.unique:
            key = limits.nick_key(member.nick)
            if r.nicks.get(key) is link:
                del r.nicks[key]
        if not r.members:
            del self.chat[room]
        return member

    def deliver(self, msg: Message) -> None:
        r = self.chat.get(msg.room)
        if r is None:
            return
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].message(msg)
            if payload is not None:
                n = broadcast(tuple(links), payload, False, self.outbox)
                self.stats.deliveries["chat"] += n
                self.stats.bytes_out["chat"] += n * len(payload)

    def presence(self, room: str, nick: str, event: str) -> None:
        r = self.chat.get(room)
        if r is None:
            return
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].presence(room, nick, event)
            if payload is not None:
                broadcast(tuple(links), payload, False, self.outbox)

    def reset(self, event: Reset) -> None:
        r = self.chat.get(event.room)
        if r is None:
            return
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].reset(event)
            if payload is not None:
                broadcast(tuple(links), payload, False, self.outbox)

    def send_to(
        self,
        link: Link,
        fmt: str,
        events: Iterable[tuple[Message | Reset | tuple[str, str, str], dict[str, bytes | None]]],
    ) -> None:
        """Events for one link only (a member catching up as it goes live).

        Each event comes with a cache of its renders by format, shared by
        every link that gets it: many joiners catching up at once cost one
        render per event and format, as a broadcast does.
        """
        renderer = self.renderers[fmt]
        for event, renders in events:
            if fmt in renders:
                payload = renders[fmt]
            else:
                if isinstance(event, Message):
                    payload = renderer.message(event)
                elif isinstance(event, Reset):
                    payload = renderer.reset(event)
                else:
                    payload = renderer.presence(*event)
                renders[fmt] = payload
            if payload is not None:
                broadcast((link,), payload, False, self.outbox)

    def room_counts(self) -> dict[str, int]:
        """How many rooms of each kind have members here, without listing them."""
        return {"chat": len(self.chat), "relay": len(self.relay)}

    def counts(self) -> dict[str, int]:
        counts = {f"relay/{name}": len(m) for name, m in self.relay.items()}
        counts.update({f"chat/{name}": len(r.members) for name, r in self.chat.items()})
        return counts


def _later(f: Callable[[], object]) -> None:
    from twisted.internet import reactor

    reactor.callLater(0, f)


class InMemoryHub:
    """All rooms of one process; chat history in SQLite (``History``)."""

    def __init__(
        self,
        history: History | None = None,
        call_soon: Callable[[Callable[[], object]], object] = _later,
        join_history: int = limits.JOIN_HISTORY,
        stats: Stats | None = None,
        outbox: Outbox = OUTBOX,
    ) -> None:
        self.history = history if history is not None else History(":memory:", 0)
        self.stats = stats if stats is not None else Stats()
        self.local = Local(self.stats, outbox)
        self.join_history = join_history
        self._call_soon = call_soon
        self._pending: list[tuple[Message, Deferred[Message]]] = []

    # -- relay rooms ------------------------------------------------------
    def join(self, room: str, link: Link) -> None:
        self.local.relay_add(room, link)

    def leave(self, room: str, link: Link) -> None:
        self.local.relay_remove(room, link)

    def publish(self, room: str, payload: bytes, binary: bool) -> int:
        return self.local.relay_send(room, payload, binary)

    # -- chat rooms -------------------------------------------------------
    def add_format(self, name: str, renderer: Renderer) -> None:
        self.local.renderers[name] = renderer

    def chat_join(
        self,
        room: str,
        link: Link,
        nick: str,
        fmt: str,
        since: int | None = None,
        unique: bool = True,
        snapshot: bool = True,
        epoch: str | None = None,
    ) -> Deferred[Joined]:
        """Join (or re-join) ``room``; the history and the live stream meet exactly.

        Everything accepted before the join is committed and sent first, so
        the history ends at ``last_id`` and every later message arrives live,
        once. ``history`` holds its first batch; ``more`` reads the rest
        from the database a batch at a time, while the client reads. Without
        ``snapshot`` (plain clients show neither) ``members`` and ``history``
        are left empty: a join then costs the same in a room of ten or of ten
        thousand. An ``epoch`` other than the room's makes ``since``
        meaningless: the answer is a fresh join marked ``reset``. The
        Deferred has fired when this returns.
        """
        self.flush()
        try:
            current = self.history.epoch(room)
        except sqlite3.Error as e:
            return fail(Unavailable(str(e)))
        reset = epoch is not None and epoch != current
        if reset:
            since = None
        r = self.local.chat.get(room)
        if unique and r is not None:
            holder = r.nicks.get(limits.nick_key(nick))
            if holder is not None and holder is not link:
                return fail(NickTaken(nick))
        if r is None or link not in r.members:
            self.local.presence(room, nick, "join")
            self.local.chat_add(room, link, Member(nick, fmt, unique))
        last_id = self.history.last_id(room)
        if not snapshot:
            return succeed(Joined(room, [], [], last_id, False, current, reset))
        if since is None:
            after = max(0, last_id - min(self.join_history, self.history.retention))
            history, _, cursor = self.history.page(room, after)
            truncated = False
        else:
            history, truncated, cursor = self.history.page(room, since)
        return succeed(
            Joined(room, self.members(room), history, last_id, truncated, current, reset, cursor)
        )

    def chat_leave(self, room: str, link: Link) -> bool:
        # What was posted before the leave (in this reactor turn) goes out first:
        # the leaver gets its own messages back, the others see them before it goes.
        self.flush()
        member = self.local.chat_remove(room, link)
        if member is None:
            return False
        self.local.presence(room, member.nick, "leave")
        return True

    def members(self, room: str) -> list[str]:
        r = self.local.chat.get(room)
        return [m.nick for m in r.members.values()] if r else []

    def post(self, room: str, sender: str, text: str, ref: Ref = None) -> Deferred[Message]:
        """Store a message and send it to the room's members (there may be none).

        The message is written at once and committed with everything else
        accepted in this reactor turn; only then is it broadcast (and the
        Deferred fired with it). If the commit fails nothing is sent and the
        Deferred fails with Unavailable. Who may post is the caller's check.
        """
        try:
            msg = self.history.append(room, sender, text, ref)
        except sqlite3.Error as e:
            # Nothing of this batch can be trusted now: fail it all, send none.
            self._fail_pending(e)
            return fail(Unavailable(str(e)))
        d: Deferred[Message] = Deferred()
        if not self._pending:
            self._call_soon(self.flush)
        self._pending.append((msg, d))
        return d

    def flush(self) -> None:
        """Commit what was posted, then deliver it, in id order."""
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
        for msg, d in pending:
            self.local.deliver(msg)
            d.callback(msg)

    def _fail_pending(self, error: Exception) -> None:
        """Roll back the uncommitted batch: none of it is sent, every sender is told."""
        self.history.rollback()
        pending, self._pending = self._pending, []
        for _, d in pending:
            d.errback(Unavailable(str(error)))

    # -- both -------------------------------------------------------------
    def rooms(self) -> dict[str, int]:
        return self.local.counts()

    def room_counts(self) -> dict[str, int]:
        return self.local.room_counts()

    def close(self) -> None:
        """Commit and deliver what is pending, then close the database."""
        self.flush()
        self.history.close()
