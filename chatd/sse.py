"""Server-Sent Events: a chat room's messages pushed over plain HTTP (``GET /sse/<room>``).

Why: some consumers only receive (a notification badge, a back end's
worker, a dashboard), and some networks break WebSockets (proxies that
buffer or drop upgrades). SSE is one long HTTP response that any HTTP
client reads (``curl -N``, a browser's ``EventSource``, which reconnects by
itself and sends ``Last-Event-ID``). docs/SSE.md is the user's guide.

What: each stream is a member of its room like any WebSocket client, in a
wire format of its own (``"sse"``, ``hub.add_format``): the hub renders a
message once for every SSE consumer of the room on this node and
``fanout.broadcast`` hands the same bytes to each one's ``Link``. Here a
link's ``send_message`` is the HTTP response's ``write`` (chunked under
HTTP/1.1, or to the close under HTTP/1.0), so the link is what the fan-out
sees of any connection: it is the transport's push producer, counts what
the client has not read, and past ``--max-backlog`` (or the server's
``--max-total-backlog``) the consumer is dropped (the connection aborted;
memory per consumer stays bounded by the transport's buffer plus the
backlog bound). A resume (``Last-Event-ID``, or ``?since=``) is the hub's
join with ``since``, as chatd.v1's: a ``joined`` event, then the missed
messages read from the hub's cursor a page at a time as the client takes
them (``Link.hold``/``put``/``drain``, so a 1000-message replay is never
all in memory), then the live ones, with no gap and no repeat. Through a
cluster it is a member of its node, fed by the broker as every member is.

The events (docs/SSE.md): ``joined`` (no ``data`` ids: its ``id:`` is the
id after which the stream is exact; ``recovered``/``reason`` say whether a
resume gave everything), the room's messages as unnamed events (so
``EventSource.onmessage`` gets them) whose ``id:`` is the message id and
whose data is chatd.v1's ``message`` frame (edits, deletes and reactions
are messages with a ``kind``), ``reset`` when the room's history starts a
new epoch (its ``id:`` is where the new ids continue), and ``: ping``
comments every ``limits.SSE_HEARTBEAT`` seconds so that proxies and
clients see the connection alive. Presence, typing and read markers are
not sent.

A page of another origin may read a stream (CORS: ``Access-Control-Allow-Origin``)
when the WebSocket origin check (``--allowed-origins``) would let it connect.

Auth is the WebSockets': a token in ``?token=`` (EventSource cannot set
headers) or ``Authorization: Bearer``, checked by the same ``Policy``;
reading the room is required; without a token, ``--anonymous-rooms`` (in
``--auth optional``) or anything (``--auth none``). A stream ends when its
token expires (plus ``auth.EXPIRY_GRACE``): SSE has no way to refresh it.

What it costs: per consumer, a ``Link``, a ``Request`` and its channel (a
few KiB, about a WebSocket connection's), one ``write`` per event and no
rendering (shared per node and message); one timer per site for every
heartbeat, a pass over the open streams every ``SSE_HEARTBEAT`` seconds.

An SSE consumer is a listener, not a member (``Hub.chat_join(silent=True)``):
it gets what the room says, and no one sees it come or go: no presence, in no
member list, nothing recorded by the broker but its join marker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from chatd import limits
from chatd.auth import EXPIRY_GRACE, AuthError, Identity, Policy, bearer
from chatd.config import Settings
from chatd.fanout import UNLIMITED, Budget, Link
from chatd.history import Message
from chatd.hub import Hub, Joined, NickTaken, Reset, Unavailable
from chatd.session import Replay, encode, message_obj, recovery_problem
from chatd.stats import Stats

__all__ = ["FORMAT", "SSE", "SSERenderer", "accepts_event_stream"]

_log = Logger(namespace="chatd.sse")

FORMAT = "sse"  # the hub's name of this wire format
SSE_NICK = "sse"  # an anonymous consumer's name (its read marker's key; never shown)
PAGE_BYTES = 64 * 1024  # bytes of events written at once during a replay (one message may be more)
PING = b": ping\n\n"
SINCE_LIMIT = 2**53  # ids are below this (as chatd.v1's "since")
# A twisted.web ``Request``: its methods have no annotations, so mypy's strict mode
# would refuse every call; this module calls them through ``Any``.
HTTPRequest = Any


class SSERenderer:
    """The SSE view of chat events, for the hub (``hub.add_format("sse", ...)``)."""

    def message(self, msg: Message) -> bytes:
        return message_event(msg)

    def presence(self, room: str, nick: str, event: str, user: str) -> None:
        return None

    def reset(self, e: Reset) -> bytes:
        data = encode({"type": "reset", "room": e.room, "epoch": e.epoch, "last_id": e.last_id})
        return b"event: reset\nid: %d\ndata: %s\n\n" % (e.last_id, data)

    def typing(self, room: str, user: str, name: str) -> None:
        return None

    def read(self, room: str, user: str, name: str, id: int) -> None:
        return None


def message_event(msg: Message) -> bytes:
    """One message as an unnamed SSE event (its JSON has no line break: they are escaped)."""
    return b"id: %d\ndata: %s\n\n" % (msg.id, encode(message_obj(msg)))


def accepts_event_stream(accept: bytes | None) -> bool:
    """Whether an ``Accept`` header lets the answer be ``text/event-stream``.

    No header, ``text/event-stream``, ``text/*`` or ``*/*`` (curl sends it) do,
    unless given ``q=0``.
    """
    if accept is None:
        return True
    for item in accept.split(b","):
        kind, _, params = item.partition(b";")
        kind = kind.strip().lower()
        if kind not in (b"text/event-stream", b"text/*", b"*/*"):
            continue
        q = 1.0
        for param in params.split(b";"):
            name, eq, value = param.partition(b"=")
            if eq and name.strip().lower() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


class _Pages(Replay):
    """The missed messages after ``joined``, as SSE events a page at a time (``Link.put``);
    read from the hub's cursor only as pages are taken (``Replay``)."""

    __slots__ = ()

    def page(self) -> bytes | None:
        """The next page, ``b""`` if it is being read, None when all is out."""
        parts: list[bytes] = []
        size = 0
        while size < PAGE_BYTES:
            msg = self.next_message()
            if msg is None:
                break
            event = message_event(msg)
            parts.append(event)
            size += len(event)
        if parts:
            return b"".join(parts)
        return b"" if self.reading else None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        page = self.page()
        if page is None:
            raise StopIteration
        return page


class _Refusal(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


_STATUS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    406: b"Not Acceptable",
    503: b"Service Unavailable",
}


def _arg(request: HTTPRequest, name: bytes) -> str | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None


def _since(request: HTTPRequest) -> int | None:
    """``Last-Event-ID`` (what EventSource sends when it reconnects), else ``?since=``."""
    raw: str | None = None
    header = request.getHeader(b"last-event-id")
    if header:
        raw = header.decode("latin-1").strip()
    if not raw:
        raw = _arg(request, b"since")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and int(raw) < SINCE_LIMIT):
        raise _Refusal(400, "Last-Event-ID and since are message ids, 0 <= id < 2**53")
    return int(raw)


class Stream:
    """One consumer: its request, its link, its room."""

    def __init__(
        self, sse: SSE, request: HTTPRequest, room: str, identity: Identity | None
    ) -> None:
        self.sse = sse
        self.request = request
        self.room = room
        self.identity = identity
        self.live = False  # answered (headers out), until closed
        self.closed = False
        self.expiry: IDelayedCall | None = None
        transport = cast(ITransport, request.channel.transport)
        self.link = Link(transport, sse.max_backlog, self._dropped, self._send, sse.budget)

    # -- what the link and the hub call --------------------------------------------
    def _send(self, payload: bytes, binary: bool) -> None:
        """The link's ``send_message``: counted by the fan-out already, written as is."""
        if not self.closed:
            self.request.write(payload)

    def write(self, data: bytes) -> None:
        """Bytes of our own (``joined``, a ping): behind what the link holds, and counted."""
        link = self.link
        if self.closed or not link.open:
            return
        if link.held is not None:
            reason = link.put(data)
        elif link.stalled:
            reason = link.charge(len(data))
        else:
            reason = None
        if reason is not None:
            self._dropped(reason)
        elif link.held is None:
            self.request.write(data)

    def _dropped(self, reason: str) -> None:
        """The fan-out gave up on this consumer (it does not read, or a write failed)."""
        if self.closed:
            return
        self.sse.stats.dropped[reason] += 1
        _log.info("dropped sse consumer of {room}: {reason}", room=self.room, reason=reason)
        self.close(abort=True)

    # -- the join ---------------------------------------------------------------------
    def start(self, since: int | None, epoch: str | None) -> None:
        identity = self.identity
        user = identity.sub if identity is not None else ""
        nick = (identity.name or identity.sub) if identity is not None else SSE_NICK
        self.request.registerProducer(self.link, True)
        d = self.sse.hub.chat_join(
            self.room,
            self.link,
            nick,
            FORMAT,
            since,
            unique=False,
            snapshot=since is not None,
            epoch=epoch if since is not None else None,
            user=user,
            silent=True,
        )
        d.addCallbacks(self._joined, self._join_failed, callbackArgs=(since,))

    def _join_failed(self, failure: Failure) -> None:
        if self.closed:
            return
        error = failure.value
        if not isinstance(error, (Unavailable, NickTaken)):
            _log.failure("an sse join failed", failure)
        self.close(status=503, message="the room cannot be joined now; try again")

    def _joined(self, j: Joined, since: int | None) -> None:
        if self.closed:
            self.sse.hub.chat_leave(self.room, self.link)
            return
        request = self.request
        history = j.history if since is not None else []
        obj: dict[str, Any] = {"type": "joined", "room": j.room, "last_id": j.last_id}
        obj["epoch"] = j.epoch
        # The id after which this stream is exact: a reconnect from it loses nothing.
        after = j.last_id
        if since is not None:
            reason = recovery_problem(j, since)
            obj["recovered"] = reason is None
            if reason is not None:
                obj["reason"] = reason
            if j.truncated:
                obj["truncated"] = True
            if j.reset:
                obj["reset"] = True
            if reason is None:
                after = since
            elif history:
                after = history[0].id - 1
        link = self.link
        pages = _Pages(j, history)
        pages.wake = link.drain  # (a read that answers later; nothing while not holding)
        head = b"retry: %d\nevent: joined\nid: %d\ndata: %s\n\n" % (
            self.sse.retry_ms,
            after,
            encode(obj),
        )
        try:
            first = pages.page()  # the first page at once
        except Exception:  # (its read failed: as a join that failed)
            _log.failure("an sse replay could not be read")
            self.close(status=503, message="the room's history cannot be read now; try again")
            return
        self.live = True
        request.setResponseCode(200)
        self.write(head + (first or b""))
        if pages.more() or pages.reading:  # the rest as the client reads
            if not link.open:
                return
            link.hold()
            reason = link.put(pages, None)
            if reason is not None:
                self._dropped(reason)
                return
            link.drain()
        self._watch_expiry()

    def _watch_expiry(self) -> None:
        identity = self.identity
        if identity is None or self.closed:
            return
        delay = max(0.0, identity.exp + EXPIRY_GRACE - time.time())
        self.expiry = self.sse.clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self.expiry = None
        data = encode({"type": "expired", "room": self.room})
        self.write(b"event: expired\ndata: %s\n\n" % data)
        self.close()

    # -- the end ------------------------------------------------------------------------
    def close(self, abort: bool = False, status: int = 0, message: str = "") -> None:
        """Leave the room, and end the response (abort: the connection too)."""
        if self.closed:
            return
        self.closed = True
        self.sse.forget(self)
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None
        self.sse.hub.chat_leave(self.room, self.link)
        self.link.close()
        request = self.request
        if request.producer is not None and request.channel is not None:
            request.unregisterProducer()
        if request.finished or request._disconnected:
            return
        if abort:
            cast(ITCPTransport, request.channel.transport).abortConnection()
            return
        if status and not request.startedWriting:
            request.write(_refuse(request, status, message))
        request.finish()

    def lost(self, reason: object) -> None:
        """The client went away (``notifyFinish`` failed) or the response ended."""
        self.close()


def _refuse(request: HTTPRequest, status: int, message: str, reason: str = "") -> bytes:
    """The body of a refusal, its status and headers set on ``request``."""
    request.setResponseCode(status, _STATUS.get(status))
    if status in (401, 403):
        request.setHeader(b"Content-Type", b"application/json")
        if status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="chatd"')
        word = "unauthorized" if status == 401 else "forbidden"
        body = json.dumps({"error": word, "reason": reason, "message": message}).encode()
    else:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        body = message.encode() + b"\n"
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


class SSE(Resource):
    """``/sse/<room>``: the resource under the main port's root (``chatd.web``)."""

    isLeaf = True

    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        stats: Stats,
        policy: Policy,
        budget: Budget = UNLIMITED,
        clock: IReactorTime | None = None,
        heartbeat: float = limits.SSE_HEARTBEAT,
        origin_ok: Callable[[bytes | None, bytes | None, bool], bool] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # Which pages may read the streams from another origin (CORS): the WebSocket
        # origin check's answer (``--allowed-origins``); None: same origin only.
        self.origin_ok = origin_ok
        hub.add_format(FORMAT, SSERenderer())
        self.hub = hub
        self.stats = stats
        self.policy = policy
        self.budget = budget
        self.max_backlog = settings.max_backlog
        self.heartbeat = heartbeat
        self.retry_ms = int(limits.SSE_RETRY * 1000)
        self._clock = clock
        self.streams: dict[Stream, None] = {}
        self._ticker: IDelayedCall | None = None

    @property
    def clock(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    @clock.setter
    def clock(self, clock: IReactorTime) -> None:
        self._clock = clock

    def render_HEAD(self, request: HTTPRequest) -> bytes:
        return _refuse(request, 400, "GET /sse/<room> is a stream; HEAD has none")

    def render_GET(self, request: HTTPRequest) -> bytes | int:
        origin = request.getHeader(b"origin")
        if origin is not None and self.origin_ok is not None:
            request.setHeader(b"Vary", b"Origin")
            if self.origin_ok(origin, request.getHeader(b"host"), request.isSecure()):
                request.setHeader(b"Access-Control-Allow-Origin", origin)
        try:
            room = self._room(request)
            if not accepts_event_stream(request.getHeader(b"accept")):
                raise _Refusal(406, "this is a text/event-stream endpoint (docs/SSE.md)")
            identity = self._identity(request)
            if not self.policy.chat_right(identity, room):
                if identity is None:
                    raise _Refusal(401, "a token is required to read " + room, "missing")
                self.stats.auth_refused["forbidden"] += 1
                raise _Refusal(403, "no right to read " + room, "forbidden")
            since = _since(request)
            epoch = _arg(request, b"epoch")
            if epoch is not None and not 0 < len(epoch) <= 64:
                raise _Refusal(400, "epoch is the string a joined event gave")
        except _Refusal as r:
            return _refuse(request, r.status, str(r), r.reason)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: pass each event on at once
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        stream = Stream(self, request, room, identity)
        self.streams[stream] = None
        self.stats.connections[FORMAT] += 1
        self.stats.connections_total[FORMAT] += 1
        request.notifyFinish().addBoth(stream.lost)
        if self._ticker is None and self.heartbeat > 0:
            self._ticker = self.clock.callLater(self.heartbeat, self._tick)
        stream.start(since, epoch)
        return NOT_DONE_YET

    def _room(self, request: HTTPRequest) -> str:
        rest: list[bytes] = request.postpath or []
        if len(rest) != 1 or not rest[0]:
            raise _Refusal(404, "SSE streams are at /sse/<room> (docs/SSE.md)")
        name = rest[0].decode("utf-8", "replace")
        if not limits.valid_room_name(name):
            raise _Refusal(400, limits.ROOM_NAME_RULE[0].upper() + limits.ROOM_NAME_RULE[1:] + ".")
        return name

    def _identity(self, request: HTTPRequest) -> Identity | None:
        policy = self.policy
        if not policy.enabled:
            return None
        token = _arg(request, b"token") or bearer(request.getHeader(b"authorization"))
        if token is None:
            if policy.required:
                raise _Refusal(401, "a token is required (docs/AUTH.md)", "missing")
            return None
        try:
            return policy.verify(token)
        except AuthError as e:
            self.stats.auth_refused[e.reason] += 1
            raise _Refusal(401, str(e), e.reason) from None

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream, 0) is None:
            self.stats.connections[FORMAT] -= 1
        if not self.streams and self._ticker is not None:
            if self._ticker.active():
                self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        """A comment to every stream that reads: proxies and clients see it alive."""
        self._ticker = None
        for stream in tuple(self.streams):
            if stream.live and not stream.link.paused:
                stream.write(PING)
        if self.streams and self.heartbeat > 0:
            self._ticker = self.clock.callLater(self.heartbeat, self._tick)

    def close_all(self) -> None:
        """End every stream (the daemon is stopping)."""
        for stream in tuple(self.streams):
            stream.close()
