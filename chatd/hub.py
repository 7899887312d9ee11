"""Rooms and their members, written once: the hub above the broker seam.

Protocols never loop over clients themselves: they join, leave, publish and
post through the ``Hub``. It holds what is the same on one node and in a
cluster: this process's links by room (``Local``, which renders each event
once per wire format and hands it to ``fanout.broadcast``: the per-message
hot path is there and in fanout), member ids, the join that meets the live
stream exactly, epochs and resets, and gap filling. What differs between one
process and a cluster (ids, storage, presence, publication) is a
``chatd.broker.Broker``: ``MemoryBroker`` (SQLite) or
``chatd.cluster.RedisBroker``; chatd/broker.py states their contract.

Two kinds of room, in separate namespaces:

- relay rooms (``publish``): opaque bytes, byte-exact to every member;
- chat rooms (``chat_join``/``post``): messages with ids and history, and
  presence. Members of one chat room may speak different wire formats (the
  plain seed chat and chatd.v1 share ``lobby``), so members are grouped by
  format and each message is rendered once per format, then fanned out.

How a join stays exact, on either broker: the hub subscribes to the room
first; once the broker confirms it, the broker's ``join`` records the
member, reads the snapshot and publishes the member's marker, as one step.
Events before the marker are in the snapshot; the ones after it are held
for the joiner until the snapshot is here, then sent after ``joined``. No
ids are compared; presence is covered too. (``MemoryBroker`` does all of it
within the call: the Deferred has fired when ``chat_join`` returns.)

A room's ids count within its history's **epoch** (``Joined.epoch``; see
chatd/history.py). A join whose ``epoch`` is not the room's current one gets
a fresh join (``since`` means nothing there) marked ``reset``. When a
message of another epoch than the one the hub knows arrives (the broker lost
the room's data: Redis restarted empty), the hub reads the new epoch's
messages from its start, tells its live members (a ``Reset`` event), then
delivers: nothing is dropped as "already seen". When the broker's channels
come back after a loss, each room's messages after the last id delivered
here are read (``read_after``) before the live ones, held meanwhile.

Presence is per user for members with a token (``user``): the broker counts
a user's member ids, the hub holds a user's leave back for
``presence_debounce`` seconds (its member id stays recorded meanwhile, and
``live_members`` still names it), so a reconnect within it, on any node,
shows no leave and no join. An anonymous member's leave is said at once. A
``silent`` link (an SSE stream) is a listener: it gets what the room says and
is in no member list, with no presence.

Edits, deletes and reactions are posts too (``post`` with a ``kind`` and a
``target``): messages with their own ids, delivered and replayed as any; the
broker applies them to their target in the same step (``Refused`` if it
cannot be), so the hub has nothing more to keep for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import limits
from chatd.broker import (
    Broker,
    Duplicate,
    HistoryCursor,
    Joined,
    MemoryBroker,
    NickTaken,
    Page,
    Reset,
    Unavailable,
    once_per_user,
)
from chatd.fanout import OUTBOX, Link, Outbox, broadcast
from chatd.history import History, Message, Ref
from chatd.stats import Stats

__all__ = [
    "Duplicate",
    "HistoryCursor",
    "Hub",
    "InMemoryHub",
    "Joined",
    "Local",
    "Member",
    "NickTaken",
    "Page",
    "Renderer",
    "Reset",
    "Unavailable",
]

_log = Logger()

# Where a node's token users are present while anyone listens for users coming and
# going (``Hub.user_listeners``): a chat room no client can name (limits' room
# rule has no "!"), with the presence machinery of any room, so a user is online
# once however many connections it has, on any node, and offline after the debounce.
ONLINE = "!online"


class _Silent:
    """The render of ``ONLINE``'s members: nothing (its presence is for listeners)."""

    def message(self, msg: Message) -> None:
        return None

    def presence(self, room: str, nick: str, event: str, user: str) -> None:
        return None

    def reset(self, event: Reset) -> None:
        return None

    def typing(self, room: str, user: str, name: str) -> None:
        return None

    def read(self, room: str, user: str, name: str, id: int) -> None:
        return None


class Renderer(Protocol):
    """A wire format's view of chat events; None: this format does not show it."""

    def message(self, msg: Message) -> bytes | None: ...

    def presence(self, room: str, nick: str, event: str, user: str) -> bytes | None: ...

    def reset(self, event: Reset) -> bytes | None: ...

    def typing(self, room: str, user: str, name: str) -> bytes | None: ...

    def read(self, room: str, user: str, name: str, id: int) -> bytes | None: ...


@dataclass(slots=True)
class Member:
    nick: str
    fmt: str
    unique: bool
    user: str = ""  # the token's sub ("" for an anonymous member)
    silent: bool = False  # a listener (an SSE stream): in no member list, no presence


@dataclass(slots=True)
class ChatRoom:
    members: dict[Link, Member] = field(default_factory=dict)
    groups: dict[str, dict[Link, None]] = field(default_factory=dict)  # by format


def _same(member: Member, user: str, name: str) -> bool:
    """Whether ``member`` is ``user`` (or, without one, the anonymous ``name``)."""
    return member.user == user if user else not member.user and member.nick == name


def who(user: str, nick: str) -> str:
    """A sender's or reader's key: its token's sub, or without one its nick (folded)."""
    return f"@{user}" if user else f"~{limits.nick_key(nick)}"


class Local:
    """The links this process holds, by room, and the fan-out to them.

    Knows nothing of ids, storage or other nodes; the hub feeds it events.
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

    def presence(self, room: str, nick: str, event: str, user: str) -> None:
        r = self.chat.get(room)
        if r is None:
            return
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].presence(room, nick, event, user)
            if payload is not None:
                broadcast(tuple(links), payload, False, self.outbox)

    def typing(self, room: str, user: str, name: str) -> None:
        """To the room's members here but the typer (all of its connections)."""
        r = self.chat.get(room)
        if r is None:
            return
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].typing(room, user, name)
            if payload is not None:
                others = tuple(x for x in links if not _same(r.members[x], user, name))
                broadcast(others, payload, False, self.outbox)

    def read(self, room: str, user: str, name: str, id: int) -> None:
        """To the room's members here (in a room of more than
        ``limits.READ_RECEIPTS_MAX_MEMBERS`` here, to the reader's own connections only)."""
        r = self.chat.get(room)
        if r is None:
            return
        everyone = len(r.members) <= limits.READ_RECEIPTS_MAX_MEMBERS
        for fmt, links in tuple(r.groups.items()):
            payload = self.renderers[fmt].read(room, user, name, id)
            if payload is not None:
                to = links if everyone else [x for x in links if _same(r.members[x], user, name)]
                broadcast(tuple(to), payload, False, self.outbox)

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
        events: Iterable[
            tuple[Message | Reset | tuple[str, str, str, str], dict[str, bytes | None]]
        ],
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
        return {"chat": len(self.chat) - (ONLINE in self.chat), "relay": len(self.relay)}

    def counts(self) -> dict[str, int]:
        counts = {f"relay/{name}": len(m) for name, m in self.relay.items()}
        counts.update(
            {f"chat/{name}": len(r.members) for name, r in self.chat.items() if name != ONLINE}
        )
        return counts


# An event for a joiner, held until it goes live, with its renders by format
# (shared by every joiner that gets it: one render per event and format).
_Held = tuple[Message | Reset | tuple[str, str, str, str], dict[str, bytes | None]]
# A room's event held while a gap is read: ("m", Message, epoch) or ("p", mid, nick, kind, user).
_Event = tuple[str, Message, str | None] | tuple[str, str, str, str, str]


@dataclass(eq=False, slots=True)
class _Joining:
    """A member between its join request and going live."""

    link: Link
    mid: str
    member: Member
    since: int | None
    snapshot: bool = True  # False: no member list and no history wanted
    epoch: str | None = None  # the epoch ``since`` counts in, if the client said
    d: defer.Deferred[Joined] = field(default_factory=defer.Deferred)
    reply: Joined | None = None  # the broker's snapshot
    marked: bool = False  # its marker came through the room's stream
    held: list[_Held] = field(default_factory=list)  # what came after the marker
    cancelled: bool = False


@dataclass(eq=False, slots=True)
class _Room:
    """This process's view of one chat room (its live members are in ``Local``)."""

    name: str
    mids: dict[Link, str] = field(default_factory=dict)  # live members here
    live: dict[str, Link] = field(default_factory=dict)  # the same, by member id
    joining: dict[Link, _Joining] = field(default_factory=dict)
    by_mid: dict[str, _Joining] = field(default_factory=dict)  # the same, by member id
    marked: dict[_Joining, None] = field(default_factory=dict)  # marker seen, reply not yet
    before_sub: list[_Joining] = field(default_factory=list)  # wait for the subscription
    subscribed: bool = False
    last_id: int = 0  # every message up to here went to the live members
    epoch: str | None = None  # the history epoch last_id counts in (None: not known yet)
    filling: list[_Event] | None = None  # events held while a gap is read
    gap: bool = False  # the stream was lost: read it when it is back

    def empty(self) -> bool:
        return not self.mids and not self.joining


@dataclass(eq=False, slots=True)
class _Parting:
    """A user's member that left here, its leave held back for the presence debounce."""

    room: str
    member: Member
    call: IDelayedCall


class Hub:
    """Every room of this process, over a broker (see the module docstring)."""

    def __init__(
        self,
        broker: Broker,
        join_history: int = limits.JOIN_HISTORY,
        stats: Stats | None = None,
        outbox: Outbox = OUTBOX,
        presence_debounce: float = limits.PRESENCE_DEBOUNCE,
        clock: IReactorTime | None = None,
    ) -> None:
        self.broker = broker
        self.presence_debounce = presence_debounce
        self._clock = clock
        self.stats = stats if stats is not None else Stats()
        self.local = Local(self.stats, outbox)
        self.join_history = join_history
        self.node = broker.node
        self._serial = 0
        self._rooms: dict[str, _Room] = {}
        self._parting: dict[str, _Parting] = {}  # by member id
        self._parting_rooms: dict[str, int] = {}  # how many of them, by room
        # Told when a user is to be closed everywhere (the front ends close theirs).
        self.kick_listeners: list[Callable[[str], object]] = []
        # Asked to hand a session over (``resume``): its rooms, or None if not theirs.
        self.resume_listeners: list[Callable[[str, str], list[str] | None]] = []
        # Told (sub, name, online) once per change of a user's being connected, across
        # every node, on the node holding the connection that changed it (track_user).
        self.user_listeners: list[Callable[[str, str, bool], object]] = []
        # Told of every message stored through this node (``post``), once it is stored.
        self.message_listeners: list[Callable[[Message], object]] = []
        self.local.renderers["!silent"] = _Silent()
        broker.attach(self)

    def start(self) -> None:
        self.broker.start()

    # -- relay rooms --------------------------------------------------------
    def join(self, room: str, link: Link) -> None:
        if self.local.relay_add(room, link):
            self.broker.relay_subscribe(room)

    def leave(self, room: str, link: Link) -> None:
        if self.local.relay_remove(room, link):
            self.broker.relay_unsubscribe(room)

    def publish(self, room: str, payload: bytes, binary: bool) -> int:
        """Deliver here at once; the broker tells the other processes (best effort)."""
        n = self.local.relay_send(room, payload, binary)
        self.broker.relay_publish(room, payload, binary)
        return n

    # -- chat rooms ---------------------------------------------------------
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
        user: str = "",
        silent: bool = False,
    ) -> defer.Deferred[Joined]:
        """Join (or re-join) ``room``; the history and the live stream meet exactly.

        Fires with ``Joined`` once the member is live: ``history`` holds the
        first page and ``more`` reads the rest as the client takes it;
        everything published after the snapshot reaches the link after it,
        once. Without ``snapshot`` (plain clients show neither) ``members``
        and ``history`` are left empty: a join then costs the same in a room
        of ten or of ten thousand. An ``epoch`` other than the room's makes
        ``since`` meaningless: the answer is a fresh join marked ``reset``.
        Fails with ``NickTaken`` (a ``unique`` nick another member has) or
        ``Unavailable``. A link already a member gets the snapshot again and
        nothing else changes. With a ``user`` (a token's sub), presence counts
        the user once, however many links it joins with; its leave is said
        ``presence_debounce`` seconds after its last link here left, and only
        if it has no other link in the room by then, on any node. A ``silent``
        link (an SSE stream) gets what the room says and is in no member list:
        no presence, no nick, nothing recorded by the broker.
        """
        if not self.broker.up:
            return defer.fail(Unavailable("the message store is unreachable"))
        r = self._room(room)
        mid = r.mids.get(link)
        if mid is not None:  # joined already: history again, nothing else changes
            member = Member(nick, fmt, unique, user, silent)
            return self._broker_join(r, mid, member, since, snapshot, epoch)
        if link in r.joining:
            return defer.fail(Unavailable("a join of this room is in progress"))
        self._serial += 1
        mid = f"{self.node}.{self._serial}"
        j = _Joining(link, mid, Member(nick, fmt, unique, user, silent), since, snapshot, epoch)
        r.joining[link] = j
        r.by_mid[j.mid] = j
        if r.subscribed:
            self._start_join(r, j)
        else:
            r.before_sub.append(j)
        return j.d

    def _room(self, name: str) -> _Room:
        r = self._rooms.get(name)
        if r is None:
            r = self._rooms[name] = _Room(name)
            self.broker.subscribe(name)  # (a MemoryBroker confirms within the call)
        return r

    def _forget_if_empty(self, r: _Room) -> None:
        # (ONLINE stays: a user's offline, said after the debounce, must still reach here)
        if r.empty() and self._rooms.get(r.name) is r and r.name != ONLINE:
            del self._rooms[r.name]
            self.broker.unsubscribe(r.name)

    def _broker_join(
        self,
        r: _Room,
        mid: str,
        m: Member,
        since: int | None,
        snapshot: bool,
        epoch: str | None,
    ) -> defer.Deferred[Joined]:
        reader = who(m.user, m.nick) if snapshot else ""
        return self.broker.join(
            r.name,
            mid,
            m.nick,
            m.unique,
            since,
            snapshot,
            self.join_history,
            epoch,
            m.user,
            reader,
            m.silent,
        )

    def _start_join(self, r: _Room, j: _Joining) -> None:
        def answered(reply: Joined) -> None:
            if j.cancelled:
                self._leave(r.name, j.mid)
                return
            j.reply = reply
            self._maybe_live(r, j)

        def failed(f: Failure) -> None:
            if not j.cancelled:
                error = f.value
                if not isinstance(error, (NickTaken, Unavailable)):
                    error = Unavailable(str(error))
                self._drop_join(r, j, error)

        self._broker_join(r, j.mid, j.member, j.since, j.snapshot, j.epoch).addCallbacks(
            answered, failed
        )

    def _unjoin(self, r: _Room, j: _Joining) -> None:
        if r.joining.get(j.link) is j:
            del r.joining[j.link]
        r.by_mid.pop(j.mid, None)
        r.marked.pop(j, None)

    def _drop_join(self, r: _Room, j: _Joining, error: Exception) -> None:
        self._unjoin(r, j)
        self._forget_if_empty(r)
        j.d.errback(error)

    def _maybe_live(self, r: _Room, j: _Joining) -> None:
        """Both the snapshot and the marker are here: send ``joined``, then what came after."""
        if j.reply is None or not j.marked or r.joining.get(j.link) is not j:
            return
        self._unjoin(r, j)
        joined = j.reply
        self.local.chat_add(r.name, j.link, j.member)
        r.mids[j.link] = j.mid
        r.live[j.mid] = j.link
        # (held messages went through _message, which already counted them in
        # last_id; a snapshot of another epoch is older than what the stream said since)
        if r.epoch is None:
            r.epoch = joined.epoch
        if joined.epoch == r.epoch:
            r.last_id = max(r.last_id, joined.last_id)
        j.d.callback(joined)  # the protocol answers, and may handle frames that waited
        if j.held and r.mids.get(j.link) == j.mid:  # (one of which may have left again)
            self.local.send_to(j.link, j.member.fmt, j.held)

    def chat_leave(self, room: str, link: Link) -> bool:
        # What was posted before the leave goes out first: the leaver gets its
        # own messages back, the others see them before it goes.
        self.broker.flush()
        r = self._rooms.get(room)
        if r is None:
            return False
        j = r.joining.get(link)
        if j is not None:
            self._unjoin(r, j)
            j.cancelled = True
            if j in r.before_sub:
                r.before_sub.remove(j)
            elif j.reply is not None:
                self._leave(r.name, j.mid)
            self._drop_join(r, j, Unavailable("left before the join completed"))
            return False
        mid = r.mids.pop(link, None)
        if mid is None:
            return False
        del r.live[mid]
        member = self.local.chat_remove(room, link)
        if member is not None and member.silent:
            self._leave(room, mid)  # (a listener: nothing to say, nothing to debounce)
        elif member is not None and member.user and self.presence_debounce > 0:
            self._part_later(room, mid, member)
        else:
            if member is not None and not member.user:  # (a user's leave comes from the broker)
                self.local.presence(room, member.nick, "leave", "")
            self._leave(room, mid)
        self._forget_if_empty(r)
        return True

    def _leave(self, room: str, mid: str) -> None:
        now = self._rooms.get(room)  # the room may have been forgotten and made anew
        last = (now is None or now.empty()) and room not in self._parting_rooms
        self.broker.leave(room, mid, last)

    def _part_later(self, room: str, mid: str, member: Member) -> None:
        """A user's member left: tell the broker after the debounce (a reconnect
        meanwhile, here or on another node, keeps the user present: no leave, no join)."""
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor

            clock = self._clock = cast(IReactorTime, reactor)
        call = clock.callLater(self.presence_debounce, self._parted, mid)
        self._parting[mid] = _Parting(room, member, call)
        self._parting_rooms[room] = self._parting_rooms.get(room, 0) + 1

    def _parted(self, mid: str) -> None:
        p = self._parting.pop(mid, None)
        if p is None:
            return
        n = self._parting_rooms[p.room] - 1
        if n:
            self._parting_rooms[p.room] = n
        else:
            del self._parting_rooms[p.room]
        self._leave(p.room, mid)

    def kick(self, user: str) -> None:
        """Close every connection of ``user`` on every node (best effort)."""
        self.broker.kick(user)

    def take_over(self, secret: str, user: str) -> defer.Deferred[list[str] | None]:
        """Close the session holding resume ``secret`` (``f"{node}.{...}"``), on whichever
        node holds it, if it is ``user``'s; fires with its rooms, or None. Its members
        and nick are let go of before this fires."""
        node = secret.rpartition(".")[0]
        if node == self.node:
            return defer.succeed(self.resume(secret, user))
        if not node:
            return defer.succeed(None)
        return self.broker.resume(node, secret, user)

    def everyone(self, room: str) -> defer.Deferred[list[str]]:
        """The nicks of ``room``'s members on every node."""
        return self.broker.members(room)

    def members(self, room: str) -> list[str]:
        """The nicks of this process's live members of ``room`` (a user once)."""
        r = self.local.chat.get(room)
        if r is None:
            return []
        return once_per_user((m.nick, m.user) for m in r.members.values() if not m.silent)

    def post(
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
    ) -> defer.Deferred[Message]:
        """Store a message and send it to the room's members, everywhere (there may be none).

        Fires with the stored ``Message`` once the broker has it (every
        member, here or on another node, gets it from the broker's stream);
        fails with ``Unavailable`` if it could not be stored, and then no one
        gets it; fails with ``Duplicate`` if an idempotency ``key`` made a message
        of the room already (see ``Broker.publish``). With a ``kind``, an edit,
        delete or reaction about message ``target`` (only the author's own with
        ``author``), or ``Refused``. Who may post is the caller's check.
        """
        if not self.broker.up:
            return defer.fail(Unavailable("the message store is unreachable"))
        d = self.broker.publish(room, sender, text, ref, user, key, kind, target, author)
        if self.message_listeners:
            d.addCallback(self._stored)
        return d

    def _stored(self, msg: Message) -> Message:
        for listener in self.message_listeners:
            try:
                listener(msg)
            except Exception:
                _log.failure("a message listener failed")
        return msg

    def track_user(self, link: Link, user: str, name: str) -> None:
        """``link`` is a connection of ``user``: counted toward its being online, when
        someone listens (``user_listeners``); ``chat_leave(ONLINE, link)`` uncounts it."""
        if self.user_listeners and user:
            d = self.chat_join(
                ONLINE, link, name, "!silent", unique=False, snapshot=False, user=user
            )
            d.addErrback(lambda f: None)  # (a store that is away: not counted, as for a join)

    def read_page(
        self, room: str, after: int, before: int | None, limit: int, newest: bool
    ) -> defer.Deferred[Page]:
        """A page of ``room``'s kept history by id (``Broker.read_page``); who may read
        it is the caller's check."""
        if not self.broker.up:
            return defer.fail(Unavailable("the message store is unreachable"))
        return self.broker.read_page(room, after, before, limit, newest)

    def flush(self) -> None:
        """Complete what was posted so far (a batch), now."""
        self.broker.flush()

    def rooms(self) -> dict[str, int]:
        return self.local.counts()

    def room_counts(self) -> dict[str, int]:
        return self.local.room_counts()

    def close(self) -> defer.Deferred[None] | None:
        """Complete what is pending, take this process's members out, let the broker go."""
        for mid, p in tuple(self._parting.items()):  # no debounce past the process's end
            if p.call.active():
                p.call.cancel()
            self._parted(mid)
        return self.broker.close()

    # -- BrokerEvents: from the broker, in each room's order -----------------
    def message(self, room: str, msg: Message, epoch: str | None) -> None:
        r = self._rooms.get(room)
        if r is None:
            return
        if r.filling is not None:
            r.filling.append(("m", msg, epoch))
            return
        self._message(r, msg, epoch)

    def _message(self, r: _Room, msg: Message, epoch: str | None) -> None:
        if epoch != r.epoch and epoch is not None:
            if r.epoch is not None:  # the broker lost the room: read the new epoch first
                self._fill(r, [("m", msg, epoch)])
                return
            r.epoch = epoch
        if msg.id <= r.last_id:
            return  # read already while filling a gap
        self._deliver(r, msg)

    def presence(self, room: str, mid: str, nick: str, kind: str, user: str) -> None:
        r = self._rooms.get(room)
        if r is None:
            return
        if r.filling is not None:
            r.filling.append(("p", mid, nick, kind, user))
            return
        self._presence(r, mid, nick, kind, user)

    def _presence(self, r: _Room, mid: str, nick: str, kind: str, user: str) -> None:
        # An anonymous member's leave from here was told here at once; a user's
        # leave (after its debounce, and only after its last member id) comes
        # from the broker alone, here too.
        told = kind == "leave" and mid.startswith(self.node) and not user
        if r.marked and kind != "mark" and not told:
            item: _Held = ((r.name, nick, kind, user), {})
            for j in r.marked:
                j.held.append(item)
        # The members here are told before a joiner of this process goes live,
        # whether the snapshot came before its marker or not: the joiner never
        # gets its own join. (A member live here already, written back after a
        # reconnect, is news to no one here.)
        if r.name == ONLINE:
            if kind != "mark" and user and mid.startswith(self.node + "."):
                self._tell_users(user, nick, kind == "join")
        elif kind == "join" and mid not in r.live:
            self.local.presence(r.name, nick, "join", user)
        elif kind == "leave" and not told:
            self.local.presence(r.name, nick, "leave", user)
        joiner = r.by_mid.get(mid)
        if joiner is not None and not joiner.marked:
            joiner.marked = True
            r.marked[joiner] = None
            self._maybe_live(r, joiner)

    def expired(self, room: str, mid: str, nick: str, user: str) -> None:
        # A user whose connections were all on a node that died (its presence expired
        # through this node): this node tells the user listeners, once for the cluster.
        if room == ONLINE and user:
            self._tell_users(user, nick, False)

    def _tell_users(self, user: str, nick: str, online: bool) -> None:
        for listener in self.user_listeners:
            try:
                listener(user, nick, online)
            except Exception:
                _log.failure("a user listener failed")

    def relay(self, room: str, payload: bytes, binary: bool) -> None:
        self.local.relay_send(room, payload, binary)

    def typing(self, room: str, user: str, name: str) -> None:
        """``BrokerEvents.typing``, and how a member says it (``Broker.typing``): the
        members of this process are told when the broker's event comes back."""
        if room in self._rooms:
            self.local.typing(room, user, name)

    def read(self, room: str, user: str, name: str, id: int) -> None:
        """``BrokerEvents.read``: a read marker moved."""
        if room in self._rooms:
            self.local.read(room, user, name, id)

    def mark_read(self, room: str, user: str, name: str, id: int) -> defer.Deferred[int]:
        """Move the read marker of ``user`` (or the anonymous ``name``) in ``room`` up to
        ``id``; fires with where it is now. Who may is the caller's check."""
        if not self.broker.up:
            return defer.fail(Unavailable("the message store is unreachable"))
        return self.broker.mark_read(room, who(user, name), id, user, name)

    def say_typing(self, room: str, user: str, name: str) -> None:
        """A member is typing in ``room``: every node's other members are told
        (not stored; best effort). Who may, and how often, is the caller's check."""
        self.broker.typing(room, user, name)

    def kicked(self, user: str) -> None:
        for listener in self.kick_listeners:
            listener(user)

    def resume(self, secret: str, user: str) -> list[str] | None:
        for listener in self.resume_listeners:
            rooms = listener(secret, user)
            if rooms is not None:
                return rooms
        return None

    def subscribed(self, room: str) -> None:
        r = self._rooms.get(room)
        if r is None:
            return
        r.subscribed = True
        waiting, r.before_sub = r.before_sub, []
        for j in waiting:
            self._start_join(r, j)
        if r.gap and r.mids:
            self._fill(r)
        elif r.gap:  # no one here needs what was missed; the next join tells anew
            r.gap, r.epoch, r.last_id = False, None, 0

    def channels_lost(self) -> None:
        """What is published now must be read back later."""
        for r in self._rooms.values():
            r.subscribed = False
            r.gap = r.gap or bool(r.mids)

    def state(self, up: bool) -> None:
        if up:
            for r in tuple(self._rooms.values()):  # a read that failed while it was away
                if r.gap and r.subscribed and r.mids:
                    self._fill(r)
        else:
            for r in tuple(self._rooms.values()):
                for j in tuple(r.joining.values()):  # their markers or replies may be lost
                    j.cancelled = True
                    self._drop_join(r, j, Unavailable("the message store connection was lost"))
                r.before_sub = []

    def live_members(self) -> Iterator[tuple[str, str, str, bool, str]]:
        for r in self._rooms.values():
            members = self.local.chat[r.name].members if r.mids else {}
            for link, mid in r.mids.items():
                member = members[link]
                if not member.silent:  # (a listener has no record to write back)
                    yield r.name, mid, member.nick, member.unique, member.user
        for mid, p in self._parting.items():  # present until their debounce ends
            yield p.room, mid, p.member.nick, p.member.unique, p.member.user

    # -- gaps and epochs ---------------------------------------------------------
    def _deliver(self, r: _Room, msg: Message) -> None:
        r.last_id = msg.id
        if r.marked:
            item: _Held = (msg, {})  # rendered at most once per format for all joiners
            for j in r.marked:
                j.held.append(item)
        self.local.deliver(msg)

    def _replay(self, r: _Room, ev: _Event) -> None:
        if ev[0] == "m":
            self._message(r, ev[1], ev[2])  # type: ignore[arg-type]
        else:
            self._presence(r, ev[1], ev[2], ev[3], ev[4])  # type: ignore[arg-type, misc]

    def _fill(self, r: _Room, held: list[_Event] | None = None) -> None:
        """Deliver what was published while the stream was down, then the rest, in order.

        Also how a new epoch is met (``held`` is its first message seen live):
        ids start again, so the new epoch is read from its start, after a
        ``Reset`` for the members.
        """
        if r.filling is not None:  # one is under way: read again once it is done
            r.filling.extend(held or ())
            r.gap = True
            return
        r.gap = False
        r.filling = held or []
        d = self.broker.read_after(r.name, r.epoch, r.last_id)

        def read(reply: tuple[str | None, list[Message]]) -> None:
            epoch, entries = reply
            held = r.filling or []
            live = [(ev, ev[1].id, ev[2]) for ev in held if ev[0] == "m"]  # type: ignore[union-attr]
            if epoch is None:  # the broker has none (lost again since?): the stream's says
                epoch = next((e for _, _, e in live if e is not None), None)
            if any(e not in (epoch, None) for _, _, e in live):
                # Of an epoch the broker no longer has (or, if newer, met again
                # when its next message comes): never shown as this epoch's.
                stale = {id(ev) for ev, _, e in live if e not in (epoch, None)}
                held[:] = [ev for ev in held if id(ev) not in stale]
                live = [x for x in live if id(x[0]) not in stale]
            # The stream's copies come next, and with their refs (a stored
            # message has none): read only what precedes the first of them.
            first: int | None = live[0][1] if live else None
            if first is not None:
                entries = [m for m in entries if m.id < first]
            if entries:
                first = entries[0].id
            if epoch is not None and epoch != r.epoch:
                if r.epoch is not None:
                    r.last_id = (first or 1) - 1
                    self._reset(r, Reset(r.name, epoch, r.last_id))
                r.epoch = epoch
            for msg in entries:
                if msg.id > r.last_id:
                    self._deliver(r, msg)
                    self.stats.cluster_events["gap"] += 1

        def done(result: object) -> None:
            held, r.filling = r.filling or [], None
            failed = isinstance(result, Failure)
            if failed:  # read again when the broker is back; its messages are stored
                r.gap = True
                held = [ev for ev in held if ev[0] != "m"]
            for i, ev in enumerate(held):
                if r.filling is not None:  # another epoch began meanwhile
                    r.filling.extend(held[i:])
                    return
                self._replay(r, ev)
            if r.gap and not failed and r.subscribed:
                self._fill(r)

        d.addCallback(read).addBoth(done)

    def _reset(self, r: _Room, event: Reset) -> None:
        """The room's history starts again (the broker lost it): members forget the old ids."""
        _log.warn("room {room} has a new history epoch (its stored data was lost)", room=r.name)
        self.stats.cluster_events["reset"] += 1
        if r.marked:
            item: _Held = (event, {})
            for j in r.marked:
                j.held.append(item)
        self.local.reset(event)


def InMemoryHub(  # (a factory for what used to be a class)
    history: History | None = None,
    call_soon: Callable[[Callable[[], object]], object] | None = None,
    join_history: int = limits.JOIN_HISTORY,
    stats: Stats | None = None,
    outbox: Outbox = OUTBOX,
    presence_debounce: float = limits.PRESENCE_DEBOUNCE,
    clock: IReactorTime | None = None,
) -> Hub:
    """A hub of one process: a ``MemoryBroker`` (SQLite ``history``; in memory if None)."""
    stats = stats if stats is not None else Stats()
    if call_soon is None:
        broker = MemoryBroker(history, stats=stats)
    else:
        broker = MemoryBroker(history, call_soon, stats)
    return Hub(broker, join_history, stats, outbox, presence_debounce, clock)
