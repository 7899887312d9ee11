"""A chatd.v1 session without I/O: frames and the time in, frames and verdicts out.

As python-websockets splits its ``Protocol`` (bytes in, events and bytes
out) from the loops that drive it, the chatd.v1 logic lives here, apart from
the WebSocket connection that carries it (``chatd.protocols.v1.V1Chat``, a
thin adapter). A ``ChatSession`` parses and checks each frame, takes the
rate limit's verdict, keeps the frames that arrive behind a join the hub has
not answered, or a hello whose resume another node has not (in order, at
most ``limits.MAX_WAITING_REQUESTS``), turns refusals into ``error`` frames
(the table of docs/PROTOCOL.md) and renders the answers, the join's history
pages included. Rooms, ids, history and
presence are the hub's; the session reaches them only through the ``Hub``
interface (``chat_join``, ``chat_leave``, ``post``).

Driving a session::

    session = ChatSession(hub, link, output, now)   # the connection is open
    session.receive(payload, now)                   # each whole text frame
    session.close()                                 # the connection is closing

``now`` is any monotonic clock in seconds (the adapter passes
``time.monotonic()``, tests a ``twisted.internet.task.Clock``'s ``seconds()``
or plain numbers): the session never reads a clock itself. ``link`` is the
hub's handle for this connection (its ``fanout.Link``, which live messages
and presence are fanned out to): the session hands it to the hub and never
writes to it, so the hot path (``fanout.broadcast``) is untouched.

What the session sends goes to its ``Output`` (the adapter implements it):

- ``send_payload(payload)``: one text frame to the client, in order behind
  whatever the connection holds (history pages still going out);
- ``send_pages(pages)``: the rest of a join's history (``HistoryPages``, an
  iterator of ``history`` payloads): from now on everything else sent to the
  client waits behind it; the output writes a page each time the client has
  read the last one, sets ``pages.wake`` to be called when a page that was
  not ready (``b""``: a cursor reading from Redis) is, and gives up on the
  connection if the pages fail or pass ``--max-backlog``;
- ``fail(code, reason)``: close the connection with a WebSocket close code
  (1008 for a flood or too many frames behind a pending join or hello);
- ``writable``: False once nothing more reaches the client (closing, or
  given up on by the fan-out): answers are then not rendered at all.

After ``close`` the session leaves every room it joined or was joining,
lets go of its output and its link (no reference cycle outlives the
connection) and writes to nothing: hub answers that come later (a join, a
post) are dropped, and so are frames.

Dependencies, and why: ``chatd.limits`` (the limits, the token bucket),
``chatd.jsonin`` (strict JSON), ``chatd.hub`` (its answer and exception
types), ``chatd.history`` (``Message``) and ``chatd.stats`` (plain
counters); Twisted only for ``Deferred`` (what the hub answers with, and
what a Redis history cursor reads with), ``Failure`` and the logger. No
Autobahn, no reactor, no socket: nothing here waits or schedules. (Importing
``chatd.hub`` loads ``chatd.fanout`` and so Autobahn's module through
``chatd.internals``; the session uses none of it.)

History goes out in pages (``HistoryPages``): ``joined`` carries the first,
``history`` frames the rest, each at most ``PAGE_BYTES`` of JSON unless one
message alone is bigger. Only ``joined`` is rendered at once; the output
then holds (``fanout.Link.hold``) and writes the next page each time its
transport drains, reading it from the hub's cursor then: a 16 MiB replay
costs about a page of memory at a time, and whatever else is sent to the
connection meanwhile (live messages, presence, answers to later requests)
waits behind the last page, counted against ``--max-backlog``.
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import jsonin, limits
from chatd.auth import EXPIRY_GRACE, NO_AUTH, AuthError, Identity, Policy
from chatd.history import Message, Ref, Refused
from chatd.hub import (
    ONLINE,
    Duplicate,
    Hub,
    Joined,
    NickTaken,
    Page,
    Reset,
    Unavailable,
    who,
)
from chatd.stats import Stats

if TYPE_CHECKING:
    from chatd.fanout import Link

REF_MAX = 64
PAGE_BYTES = 64 * 1024  # a joined or history frame, unless one message alone is bigger
# Integers a client sends (ids in "since", "ref") are below this: every JSON
# implementation reads them exactly, and SQLite stores them.
INT_LIMIT = 2**53

_log = Logger(namespace="chatd.v1")

CID_MAX = 64  # characters of a send's client message id
EMOJI_MAX = 32  # characters of a reaction
_NOT_IN_EMOJI = frozenset(("Cc", "Zs", "Zl", "Zp", "Cs"))
HISTORY_LIMIT = 50  # messages of a history page when the request gives no limit
HISTORY_LIMIT_MAX = 100  # ... and at most

# What a resume gives: the taken-over session's rooms, None, or a Deferred of them.
Resumed = list[str] | None | Deferred[list[str] | None]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(obj: object) -> bytes:
    return _dumps(obj).encode("utf-8")


def message_obj(msg: Message) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "message",
        "room": msg.room,
        "id": msg.id,
        "ts": msg.ts,
        "from": msg.sender,
        "text": msg.text,
    }
    if msg.user:
        obj["user"] = msg.user
    if msg.ref is not None:
        obj["ref"] = msg.ref
    if msg.kind:  # an event about message "target" (docs/PROTOCOL.md)
        obj["kind"] = msg.kind
        obj["target"] = msg.target
        if msg.kind in ("react", "unreact"):
            obj["emoji"] = obj.pop("text")
        elif msg.kind == "delete":
            del obj["text"]
    if msg.updated:  # a message as it is now: apply only events with a higher id
        obj["updated"] = msg.updated
        if msg.edited:
            obj["edited"] = True
        if msg.deleted:
            obj["deleted"] = True
        if msg.reactions:
            obj["reactions"] = msg.reactions
    return obj


def recovery_problem(j: Joined, since: int) -> str | None:
    """Why a join with ``since`` could not give every message after it, or None."""
    if j.reset:
        return "epoch"  # the client's ids count in another history
    if since > j.last_id:
        return "unknown_id"  # no such id in this history (one that was lost, or made up)
    if j.truncated:
        return "truncated"  # some were dropped by retention
    return None


class Replay:
    """A join's missed messages: the first page in hand, the rest read from the hub's
    cursor (``Joined.more``) only as they are taken.

    A cursor that answers later (a Deferred: Redis) makes ``next_message`` give
    None with ``reading`` set, and calls ``wake`` once the batch is here; a
    failed read is raised by the next ``next_message``. ``HistoryPages`` (chatd.v1)
    and chatd.sse render what it gives.
    """

    __slots__ = ("buf", "cursor", "error", "reading", "wake")

    def __init__(self, j: Joined, history: list[Message] | None = None) -> None:
        self.buf: deque[Message] = deque(j.history if history is None else history)
        self.cursor = j.more
        self.reading = False  # a read is on its way
        self.error: Failure | None = None
        self.wake: Callable[[], object] | None = None

    def more(self) -> bool:
        """Messages are left, in hand or in the cursor."""
        c = self.cursor
        return bool(self.buf) or (c is not None and c.after < c.until)

    def next_message(self) -> Message | None:
        """The next message, reading a batch if none is in hand; None if none is here
        yet (``reading``) or none is left."""
        if self.error is not None:
            self.error.raiseException()
        if not self.buf and not self.reading and self.more():
            cursor = self.cursor
            assert cursor is not None  # more() with nothing in hand
            batch = cursor.read()
            if isinstance(batch, Deferred):
                self.reading = True
                batch.addCallbacks(self._arrived, self._failed)  # (it may fire at once)
            else:
                self.buf.extend(batch)
        return self.buf.popleft() if self.buf else None

    def _arrived(self, batch: list[Message]) -> None:
        self.reading = False
        self.buf.extend(batch)
        if self.wake is not None:
            self.wake()

    def _failed(self, failure: Failure) -> None:
        self.reading = False
        self.error = failure
        if self.wake is not None:
            self.wake()


class HistoryPages(Replay):
    """A join's answer: ``joined`` with the first page, then ``history`` frames.

    ``first`` is the ``joined`` payload; iterating gives each ``history``
    frame's payload, rendered when asked for (``Replay``: a cursor that answers
    later makes the iterator give ``b""``, wait, until the batch is here, then
    calls ``wake``). ``done``: nothing follows.
    """

    __slots__ = ("done", "first", "nxt", "room")

    def __init__(self, j: Joined, tail: dict[str, Any], head: dict[str, Any]) -> None:
        super().__init__(j)
        self.room = j.room
        self.nxt: bytes | None = None  # the next message, rendered
        self.done = False
        self.first = self._frame(encode(head)[:-1] + b',"history":[', tail)

    def _left(self) -> bool:
        return self.nxt is not None or self.more()

    def _peek(self) -> bytes | None:
        """The next message's JSON, reading a batch if one is at hand; None: none yet."""
        if self.nxt is None:
            msg = self.next_message()
            if msg is not None:
                self.nxt = encode(message_obj(msg))
        return self.nxt

    def _frame(self, head: bytes, tail: dict[str, Any]) -> bytes:
        tail["more"] = False
        size = len(head) + len(encode(tail)) + 1
        parts: list[bytes] = []
        while (part := self._peek()) is not None:
            if parts and size + len(part) + 1 > PAGE_BYTES:
                break
            parts.append(part)
            size += len(part) + 1
            self.nxt = None
        tail["more"] = more = self._left()
        self.done = not more
        if not more and "last_id" in tail:  # joined says "more" only when pages follow
            del tail["more"]
        return head + b",".join(parts) + b"]," + encode(tail)[1:]

    def __iter__(self) -> HistoryPages:
        return self

    def __next__(self) -> bytes:
        if self.done:
            raise StopIteration
        if self.error is not None:
            self.error.raiseException()  # (the link gives up on the connection)
        if self._peek() is None:
            if self.reading:
                return b""  # wait: _arrived wakes the link
            raise Unavailable("history messages vanished during the replay")
        return self._frame(b'{"type":"history","room":' + encode(self.room) + b',"messages":[', {})


class V1Renderer:
    """chatd.v1's view of chat events, for the hub (``hub.add_format("v1", ...)``)."""

    def message(self, msg: Message) -> bytes:
        return encode(message_obj(msg))

    def presence(self, room: str, nick: str, event: str, user: str) -> bytes:
        obj = {"type": "presence", "room": room, "nick": nick, "event": event}
        if user:
            obj["user"] = user
        return encode(obj)

    def typing(self, room: str, user: str, name: str) -> bytes:
        obj = {"type": "typing", "room": room, "name": name}
        if user:
            obj["user"] = user
        return encode(obj)

    def read(self, room: str, user: str, name: str, id: int) -> bytes:
        obj: dict[str, Any] = {"type": "read", "room": room, "name": name, "id": id}
        if user:
            obj["user"] = user
        return encode(obj)

    def reset(self, e: Reset) -> bytes:
        return encode({"type": "reset", "room": e.room, "epoch": e.epoch, "last_id": e.last_id})


class ProtocolError(Exception):
    """A request chatd refuses: becomes an ``error`` frame, the connection stays."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows them, UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(
    obj: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True
) -> Any:
    value = obj.get(name)
    if value is None:
        if required:
            raise ProtocolError("bad_field", f"'{name}' is required")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError("bad_field", f"'{name}' has the wrong type")
    if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise ProtocolError("bad_field", f"'{name}' is out of range (integers are below 2**53)")
    return value


def _room(obj: dict[str, Any]) -> str:
    room: str = _field(obj, "room", str)
    if not limits.valid_room_name(room):
        raise ProtocolError("bad_room", limits.ROOM_NAME_RULE)
    return room


def _unknown(kind: object) -> str:
    if kind is None:
        return "'type' is missing"
    if not isinstance(kind, str):
        return "'type' must be a string"
    shown = kind if len(kind) <= 32 else kind[:32] + "..."
    return f"unknown type {shown!r}"


def _type_name(payload: bytes) -> str:
    """The frame's ``type`` for a log line, if it has a plain one."""
    try:
        kind = json.loads(payload).get("type")
    except Exception:
        return "?"
    return kind if isinstance(kind, str) and kind in ChatSession.HANDLERS else "?"


class Output(Protocol):
    """Where a session's frames and verdicts go (``chatd.protocols.v1.V1Chat``)."""

    @property
    def writable(self) -> bool:
        """False once nothing more reaches the client."""
        ...

    def send_payload(self, payload: bytes) -> None:
        """One text frame, behind whatever the connection holds."""

    def send_pages(self, pages: HistoryPages) -> None:
        """A join's remaining history pages, ahead of everything sent later."""

    def fail(self, code: int, reason: str) -> None:
        """Close the connection with ``code``."""


class _Closed:
    """The output of a closed session: writes to nothing."""

    writable = False

    def send_payload(self, payload: bytes) -> None:
        pass

    def send_pages(self, pages: HistoryPages) -> None:
        pass

    def fail(self, code: int, reason: str) -> None:
        pass


_CLOSED = _Closed()


class ChatSession:
    """One chatd.v1 connection's requests and answers (see the module docstring)."""

    __slots__ = (
        "bucket",
        "closed",
        "hub",
        "identity",
        "joined",
        "joining",
        "link",
        "max_text",
        "nick",
        "now",
        "output",
        "policy",
        "resume",
        "resume_secret",
        "session",
        "stats",
        "typed",
        "waiting",
        "welcoming",
    )

    def __init__(
        self,
        hub: Hub,
        link: Link,
        output: Output,
        now: float,
        *,
        rate: float = limits.RATE,
        rate_burst: int = limits.RATE_BURST,
        rate_flood: int = limits.RATE_FLOOD,
        max_text: int = limits.MAX_TEXT,
        stats: Stats | None = None,
        policy: Policy = NO_AUTH,
        identity: Identity | None = None,
        resume: Callable[[str, str | None], Resumed] | None = None,
        node: str = "local",
    ) -> None:
        self.hub = hub
        self.policy = policy
        self.identity = identity  # from the upgrade's token; hello's token otherwise
        self.link: Link | None = link
        self.output: Output = output
        self.bucket = limits.TokenBucket(rate, rate_burst, rate_flood, now)
        self.now = now  # the time of the frame being handled
        self.typed: dict[str, float] = {}  # room -> when its last typing went out
        self.max_text = max_text
        self.stats = stats if stats is not None else Stats()
        self.nick: str | None = None
        self.joined: set[str] = set()
        self.joining: str | None = None  # the room of a join the hub has not answered
        self.waiting: deque[tuple[bytes, int]] = deque()  # frames that came meanwhile
        self.session = secrets.token_urlsafe(12)  # "welcome"'s opaque id
        # The secret a client shows in a later hello to take this session over
        # (a phone on a new network), and how to: ``resume(secret, sub)`` closes
        # the session holding that secret (if it is the same user's) and gives its
        # rooms, or None (or a Deferred of them: the session may be on another
        # node). The secret starts with the node's id, so any node can tell whose.
        self.resume_secret = f"{node}.{secrets.token_urlsafe(24)}"
        self.resume = resume
        self.welcoming = False  # a hello waits for another node to hand its session over
        self.closed = False

    # -- driving ------------------------------------------------------------
    def receive(self, payload: bytes, now: float) -> None:
        """One whole text frame from the client, at ``now``."""
        if self.closed:
            return
        self.now = now
        verdict = self.bucket.take(now)
        if verdict != limits.TokenBucket.OK:
            self.stats.rate_limited["v1"] += 1
        if verdict == limits.TokenBucket.FLOOD:
            self.output.fail(limits.CLOSE_POLICY_VIOLATION, "rate limit: sustained flood")
            return
        if self.joining is not None or self.welcoming:
            # Requests are answered in order: what follows a join (or a hello that
            # resumes) waits for it (over the Redis broker a join is answered only
            # after Redis has).
            if len(self.waiting) >= limits.MAX_WAITING_REQUESTS:
                self.output.fail(
                    limits.CLOSE_POLICY_VIOLATION, "too many requests behind a pending one"
                )
                return
            self.waiting.append((payload, verdict))
            return
        self.handle(payload, verdict)

    def close(self) -> None:
        """The connection is closing: leave every room; write nothing more."""
        if self.closed:
            return
        self.closed = True
        self.output = _CLOSED
        link = self.link
        assert link is not None  # let go of only below, once closed
        for room in self.joined:
            self.hub.chat_leave(room, link)
        if self.joining is not None:
            self.hub.chat_leave(self.joining, link)
        if self.identity is not None:
            self.hub.chat_leave(ONLINE, link)
        self.joined = set()
        self.waiting.clear()
        self.link = None  # (the link's on_drop holds the connection, which holds this)

    # -- answers ------------------------------------------------------------
    def reply(self, obj: dict[str, Any]) -> None:
        self.output.send_payload(encode(obj))

    def error(self, code: str, message: str, ref: Ref = None) -> None:
        obj: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if ref is not None:
            obj["ref"] = ref
        self.reply(obj)

    def handle(self, payload: bytes, verdict: int) -> None:
        ref: Ref = None
        try:
            try:
                obj = jsonin.loads(payload)
            except jsonin.BadJSON as e:
                raise ProtocolError("bad_json", f"not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ProtocolError("bad_message", "a frame is a JSON object")
            ref = obj.get("ref")
            if ref is not None and not (
                (isinstance(ref, str) and len(ref) <= REF_MAX and _encodable(ref))
                or (isinstance(ref, int) and not isinstance(ref, bool) and abs(ref) < INT_LIMIT)
            ):
                ref = None
                raise ProtocolError(
                    "bad_field",
                    f"'ref' is a string of at most {REF_MAX} or an integer below 2**53",
                )
            if verdict == limits.TokenBucket.LIMITED:
                raise ProtocolError("rate_limited", "too many messages; slow down")
            kind = obj.get("type")
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ProtocolError("unknown_type", _unknown(kind))
            handler(self, obj, ref)
        except ProtocolError as e:
            self.error(e.code, str(e), ref)
        except Exception:
            # A bug, not the client's fault: logged with its traceback, and the
            # client still gets its answer instead of a dropped connection.
            _log.failure("chatd.v1: a {kind} frame failed", kind=_type_name(payload))
            self.error("internal_error", "the server failed on this frame", ref)

    # -- requests -----------------------------------------------------------
    def on_hello(self, obj: dict[str, Any], ref: Ref) -> None:
        if self.nick is not None:
            raise ProtocolError("already_hello", f"already hello as {self.nick}")
        token = obj.get("token")
        if token is not None or (self.policy.required and self.identity is None):
            identity = self._verify(token, ref)
            if identity is None:
                return
            self.identity = identity
        out: dict[str, Any] = {"type": "welcome"}
        secret = obj.get("resume")
        if secret is not None and not (isinstance(secret, str) and 0 < len(secret) <= 64):
            raise ProtocolError("bad_field", "'resume' is the secret a 'welcome' gave")
        nick: Any
        if self.identity is not None:
            nick = self.identity.name
            out["user"] = self.identity.sub
            out["exp"] = int(self.identity.exp)
        else:
            nick = obj.get("nick")
            problem = limits.nick_problem(nick)
            if problem:
                raise ProtocolError("bad_nick", problem)
        if secret is not None and self.resume is not None:
            # Before the nick is taken: the old session lets go of it and its rooms.
            sub = self.identity.sub if self.identity is not None else None
            rooms = self.resume(secret, sub)
            if isinstance(rooms, Deferred):  # maybe on another node: what follows waits
                self.welcoming = True
                rooms.addCallback(self._resumed, nick, out, ref)
                return
            self._resumed(rooms, nick, out, ref)
            return
        self._welcome(nick, out, ref)

    def _resumed(self, rooms: list[str] | None, nick: str, out: dict[str, Any], ref: Ref) -> None:
        self.welcoming = False
        if self.closed:
            return
        out["resumed"] = rooms is not None
        if rooms is not None:
            out["rooms"] = rooms
        self._welcome(nick, out, ref)
        self._handle_waiting()

    def _welcome(self, nick: str, out: dict[str, Any], ref: Ref) -> None:
        self.nick = nick
        if self.identity is not None and self.link is not None:
            self.hub.track_user(self.link, self.identity.sub, nick)  # (for user listeners)
        out["nick"] = nick
        out["session"] = self.session
        out["resume"] = self.resume_secret
        if ref is not None:
            out["ref"] = ref
        self.reply(out)

    def _verify(self, token: object, ref: Ref) -> Identity | None:
        """The token's identity; else ``unauthorized`` and close 4001 (None)."""
        try:
            return self.policy.verify(token)
        except AuthError as e:
            self.stats.auth_refused[e.reason] += 1
            self.error("unauthorized", str(e), ref)
            self.output.fail(limits.CLOSE_UNAUTHORIZED, f"unauthorized: {e.reason}")
            return None

    def on_refresh(self, obj: dict[str, Any], ref: Ref) -> None:
        """A new token for the same user before the old one runs out."""
        if self.identity is None:
            raise ProtocolError("bad_message", "refresh is for connections with a token")
        identity = self._verify(obj.get("token"), ref)
        if identity is None:
            return
        if identity.sub != self.identity.sub:
            self.stats.auth_refused["other_user"] += 1
            self.error("unauthorized", "the token is another user's", ref)
            self.output.fail(limits.CLOSE_UNAUTHORIZED, "unauthorized: another user's token")
            return
        self.identity = identity
        out: dict[str, Any] = {"type": "refreshed", "exp": int(identity.exp)}
        if ref is not None:
            out["ref"] = ref
        self.reply(out)

    def deadline(self) -> float | None:
        """When (time.time()) this connection is closed unless its token is refreshed."""
        if self.identity is None:
            return None
        return self.identity.exp + EXPIRY_GRACE

    def check_expiry(self, wall_now: float) -> None:
        """Close with 4001 if the token ran out (plus the grace) without a refresh."""
        deadline = self.deadline()
        if not self.closed and deadline is not None and wall_now >= deadline:
            self.output.fail(limits.CLOSE_UNAUTHORIZED, "unauthorized: the token expired")

    def _right(self, room: str) -> str:
        return self.policy.chat_right(self.identity, room)

    def on_join(self, obj: dict[str, Any], ref: Ref) -> None:
        if self.nick is None:
            raise ProtocolError("hello_first", "say hello with a nick first")
        room = _room(obj)
        if not self._right(room):
            raise ProtocolError("forbidden", f"no right to read {room}")
        since = _field(obj, "since", int, required=False)
        if since is not None and since < 0:
            raise ProtocolError("bad_field", "'since' is an id, 0 <= since < 2**53")
        epoch = _field(obj, "epoch", str, required=False)
        if epoch is not None and not (0 < len(epoch) <= 64 and _encodable(epoch)):
            raise ProtocolError("bad_field", "'epoch' is the string a 'joined' gave")
        if room not in self.joined and len(self.joined) >= limits.MAX_ROOMS_PER_CONNECTION:
            raise ProtocolError(
                "too_many_rooms", f"at most {limits.MAX_ROOMS_PER_CONNECTION} rooms at once"
            )
        assert self.link is not None
        self.joining = room
        # A token's holder is its sub, not its name: two users may share a display
        # name, and one user may join from several tabs (present once, as the user).
        user = self.identity.sub if self.identity is not None else ""
        d = self.hub.chat_join(
            room, self.link, self.nick, "v1", since, unique=not user, epoch=epoch, user=user
        )
        d.addCallbacks(
            self._joined, self._join_failed, callbackArgs=(ref, since), errbackArgs=(room, ref)
        )
        d.addBoth(self._join_done, room)

    def _join_done(self, result: object, room: str) -> object:
        """The join is answered: handle what came in meanwhile, in order."""
        if self.joining != room:
            return result
        self.joining = None
        self._handle_waiting()
        return result

    def _handle_waiting(self) -> None:
        while self.waiting and self.joining is None and not self.welcoming and not self.closed:
            self.handle(*self.waiting.popleft())

    def _join_failed(self, failure: Failure, room: str, ref: Ref) -> None:
        # (Twisted's Failure.check and .trap have no annotations)
        if failure.check(NickTaken):  # type: ignore[no-untyped-call]
            self.error("nick_taken", f"{self.nick} is already in {room}", ref)
        elif failure.check(Unavailable):  # type: ignore[no-untyped-call]
            self.error("unavailable", "the room cannot be joined now; try again", ref)
        else:
            failure.raiseException()

    def _joined(self, j: Joined, ref: Ref, since: int | None) -> None:
        room = j.room
        self.joined.add(room)
        head: dict[str, Any] = {"type": "joined", "room": room, "members": j.members}
        # After "history": "more" (true when history frames follow), then these.
        out: dict[str, Any] = {"last_id": j.last_id, "more": False, "epoch": j.epoch}
        if j.truncated:
            out["truncated"] = True
        if j.reset:
            out["reset"] = True
        out["read"] = j.read  # the reader's marker, and how many came after it
        out["unread"] = j.unread
        if since is not None:  # was every message after it served? Never a partial as whole.
            reason = recovery_problem(j, since)
            out["recovered"] = reason is None
            if reason is not None:
                out["reason"] = reason
        if ref is not None:
            out["ref"] = ref
        pages = HistoryPages(j, out, head)
        first, pages.first = pages.first, b""
        output = self.output
        output.send_payload(first)  # as any answer: at once, or behind what is held
        if pages.done or not output.writable:
            return
        # The rest goes out page by page as the client reads; all else waits behind.
        output.send_pages(pages)

    def on_leave(self, obj: dict[str, Any], ref: Ref) -> None:
        room = _room(obj)
        if room not in self.joined:
            raise ProtocolError("not_joined", f"not in {room}")
        assert self.link is not None
        # (Still in self.joined while the hub delivers what was posted before: that
        # reached this link with the rest, see _posted.)
        self.hub.chat_leave(room, self.link)
        self.joined.discard(room)
        self.typed.pop(room, None)
        out: dict[str, Any] = {"type": "left", "room": room}
        if ref is not None:
            out["ref"] = ref
        self.reply(out)

    def _writer(self, obj: dict[str, Any]) -> str:
        """The room of a request that writes to it (send, edit, delete, react...)."""
        room = _room(obj)
        if room not in self.joined:
            raise ProtocolError("not_joined", f"join {room} first")
        if self._right(room) != "rw":
            raise ProtocolError("forbidden", f"no right to send to {room}")
        return room

    def _text(self, obj: dict[str, Any]) -> str:
        text: str = _field(obj, "text", str)
        if not text.strip():
            raise ProtocolError("bad_field", "'text' is empty")
        if not _encodable(text):
            raise ProtocolError("bad_field", "'text' is not valid Unicode (lone surrogate)")
        max_text = self.max_text
        if len(text.encode("utf-8")) > max_text:
            raise ProtocolError("too_long", f"a message is at most {max_text} bytes of UTF-8")
        return text

    def on_send(self, obj: dict[str, Any], ref: Ref) -> None:
        _field(obj, "text", str)  # (a missing text first: bad_field, as ever)
        room = self._writer(obj)
        text = self._text(obj)
        cid = _field(obj, "cid", str, required=False)
        if cid is not None and not (0 < len(cid) <= CID_MAX and cid.isprintable()):
            raise ProtocolError("bad_field", f"'cid' is 1-{CID_MAX} printable characters")
        assert self.nick is not None
        user = self.identity.sub if self.identity is not None else ""
        key = ""
        if cid is not None:  # idempotent: the same cid of the same sender in the room is one send
            key = f"{who(user, self.nick)}\n{cid}"
        d = self.hub.post(room, self.nick, text, ref, user, key)
        d.addCallbacks(self._posted, self._not_posted, errbackArgs=(ref,))

    def _posted(self, msg: Message) -> None:
        """Stored and sent to the room: the sender's copy is its acknowledgement.

        The hub delivered it to the room's members; if this connection left
        the room meanwhile (a cluster stores in Redis first), the copy goes to
        it alone, so a send is always answered.
        """
        output = self.output
        if msg.room not in self.joined and output.writable:
            payload = encode(message_obj(msg))
            stats = self.stats
            stats.deliveries["chat"] += 1
            stats.bytes_out["chat"] += len(payload)
            output.send_payload(payload)

    def _not_posted(self, failure: Failure, ref: Ref) -> None:
        # (Twisted's Failure.trap has no annotations)
        if failure.check(Duplicate):  # type: ignore[no-untyped-call]
            # A retry: the first send's message is the answer, to this connection only.
            obj = message_obj(failure.value.original)
            obj.pop("ref", None)  # (the first send's, if it is still in the batch)
            if ref is not None:
                obj["ref"] = ref
            self.reply(obj)
            return
        failure.trap(Unavailable)  # type: ignore[no-untyped-call]
        self.error("unavailable", "the message could not be stored and was not sent", ref)

    def _amend(self, room: str, obj: dict[str, Any], ref: Ref, kind: str, text: str) -> None:
        """An edit, delete or reaction about message ``id`` of ``room`` (checked by
        ``_writer``): stored as an event, which comes back to this connection with the
        rest of the room as the answer."""
        target = _field(obj, "id", int)
        if target < 1:
            raise ProtocolError("bad_field", "'id' is a message id")
        assert self.nick is not None
        user = self.identity.sub if self.identity is not None else ""
        author = kind in ("edit", "delete")  # (anyone who may write reacts)
        d = self.hub.post(room, self.nick, text, ref, user, "", kind, target, author)
        d.addCallbacks(self._posted, self._not_amended, errbackArgs=(ref,))

    def _not_amended(self, failure: Failure, ref: Ref) -> None:
        if failure.check(Refused):  # type: ignore[no-untyped-call]
            self.error(failure.value.code, str(failure.value), ref)
            return
        failure.trap(Unavailable)  # type: ignore[no-untyped-call]
        self.error("unavailable", "the change could not be stored and was not sent", ref)

    def on_edit(self, obj: dict[str, Any], ref: Ref) -> None:
        _field(obj, "text", str)  # (a missing text first, as for send)
        room = self._writer(obj)
        self._amend(room, obj, ref, "edit", self._text(obj))

    def on_delete(self, obj: dict[str, Any], ref: Ref) -> None:
        self._amend(self._writer(obj), obj, ref, "delete", "")

    def _emoji(self, obj: dict[str, Any]) -> str:
        """A reaction: 1-``EMOJI_MAX`` characters, no spaces or control characters
        (joiners and variation selectors are fine: they make many emoji)."""
        emoji: str = _field(obj, "emoji", str)
        if not 0 < len(emoji) <= EMOJI_MAX or not _encodable(emoji):
            raise ProtocolError("bad_field", f"'emoji' is 1-{EMOJI_MAX} characters")
        if any(unicodedata.category(c) in _NOT_IN_EMOJI for c in emoji):
            raise ProtocolError("bad_field", "'emoji' has no spaces or control characters")
        return emoji

    def on_react(self, obj: dict[str, Any], ref: Ref) -> None:
        emoji = self._emoji(obj)
        self._amend(self._writer(obj), obj, ref, "react", emoji)

    def on_unreact(self, obj: dict[str, Any], ref: Ref) -> None:
        emoji = self._emoji(obj)
        self._amend(self._writer(obj), obj, ref, "unreact", emoji)

    def on_read(self, obj: dict[str, Any], ref: Ref) -> None:
        """Move this user's read marker up (never back): its connections, and in a
        small room the others, get ``read`` when it moved; nothing else is answered."""
        room = _room(obj)
        if room not in self.joined:
            raise ProtocolError("not_joined", f"join {room} first")
        id = _field(obj, "id", int)
        if id < 0:
            raise ProtocolError("bad_field", "'id' is a message id")
        assert self.nick is not None
        user = self.identity.sub if self.identity is not None else ""
        d = self.hub.mark_read(room, user, self.nick, id)
        d.addCallbacks(lambda marker: None, self._unavailable_read, errbackArgs=(ref,))

    def _unavailable_read(self, failure: Failure, ref: Ref) -> None:
        failure.trap(Unavailable)  # type: ignore[no-untyped-call]
        self.error("unavailable", "the read marker cannot be stored now; try again", ref)

    def on_typing(self, obj: dict[str, Any], ref: Ref) -> None:
        """Not stored, not answered: the room's others get ``typing`` (at most one per
        ``limits.TYPING_INTERVAL`` from a connection and room; repeats are dropped)."""
        room = _room(obj)
        if room not in self.joined:
            raise ProtocolError("not_joined", f"join {room} first")
        if self._right(room) != "rw":
            raise ProtocolError("forbidden", f"no right to send to {room}")
        last = self.typed.get(room)
        if last is not None and self.now - last < limits.TYPING_INTERVAL:
            return
        self.typed[room] = self.now
        assert self.nick is not None
        self.hub.say_typing(room, self.identity.sub if self.identity else "", self.nick)

    def on_history(self, obj: dict[str, Any], ref: Ref) -> None:
        """A page of the kept history by id: ``before`` (older than), ``after`` (newer
        than), both, or neither (the latest); one frame, at most ``PAGE_BYTES``."""
        if self.nick is None:
            raise ProtocolError("hello_first", "say hello with a nick first")
        room = _room(obj)
        if not self._right(room):
            raise ProtocolError("forbidden", f"no right to read {room}")
        before = _field(obj, "before", int, required=False)
        after = _field(obj, "after", int, required=False)
        limit = _field(obj, "limit", int, required=False)
        if limit is None:
            limit = HISTORY_LIMIT
        if not 0 < limit <= HISTORY_LIMIT_MAX:
            raise ProtocolError("bad_field", f"'limit' is 1-{HISTORY_LIMIT_MAX}")
        if (before is not None and before < 1) or (after is not None and after < 0):
            raise ProtocolError("bad_field", "'before' and 'after' are ids (before >= 1)")
        # Scrolling up (before, or neither) wants the newest of the range; after, the oldest.
        newest = after is None
        d = self.hub.read_page(room, after or 0, before, limit, newest)
        d.addCallbacks(
            self._page, self._unavailable_page, callbackArgs=(room, newest, ref), errbackArgs=(ref,)
        )

    def _page(self, page: Page, room: str, newest: bool, ref: Ref) -> None:
        if not self.output.writable:
            return
        objs = [message_obj(m) for m in page.messages]
        more = page.more
        # Under PAGE_BYTES: whole messages only, those nearest the asked-for end kept.
        parts = [encode(o) for o in objs]
        size, keep = 0, 0
        for part in reversed(parts) if newest else parts:
            if keep and size + len(part) + 1 > PAGE_BYTES:
                more = True
                break
            size += len(part) + 1
            keep += 1
        chosen = parts[len(parts) - keep :] if newest else parts[:keep]
        tail: dict[str, Any] = {"more": more, "epoch": page.epoch}
        if ref is not None:
            tail["ref"] = ref
        head = encode({"type": "history", "room": room})[:-1]
        self.output.send_payload(
            head + b',"messages":[' + b",".join(chosen) + b"]," + encode(tail)[1:]
        )

    def _unavailable_page(self, failure: Failure, ref: Ref) -> None:
        failure.trap(Unavailable)  # type: ignore[no-untyped-call]
        self.error("unavailable", "the history cannot be read now; try again", ref)

    HANDLERS: dict[str, Callable[[ChatSession, dict[str, Any], Ref], None]] = {
        "hello": on_hello,
        "refresh": on_refresh,
        "join": on_join,
        "leave": on_leave,
        "send": on_send,
        "edit": on_edit,
        "delete": on_delete,
        "react": on_react,
        "unreact": on_unreact,
        "history": on_history,
        "typing": on_typing,
        "read": on_read,
    }
