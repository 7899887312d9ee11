"""Webhooks: chatd tells the back end of users coming and going and of messages, by HTTP POST.

Why: a back end wants to know who is online (to send a mail instead of a chat
message, to show a status) and, for some rooms, what was said (support tickets,
order threads) without holding a WebSocket of its own to every room. The hub
says each change once across the cluster (``Hub.user_listeners``,
``Hub.message_listeners``); this turns each into a signed JSON POST to
``--webhook-url``.

What it costs: a listener call appends to a bounded deque and returns, so chat
never waits on the back end. At most ``CONCURRENCY`` requests are in flight,
each event retried (connection errors, timeouts, 5xx, 408, 429) with
exponential backoff and jitter for at most ``ATTEMPTS`` attempts (about five
minutes), holding its slot meanwhile. A back end that is slow or down therefore
costs at most ``--webhook-queue`` events in memory (each a few hundred bytes
of JSON) and four connections; events past the queue are dropped and counted
(``chatd_webhook_dropped_total``), events given up on are counted too
(``chatd_webhook_failed_total``). Delivery is at least once (a timeout after
the back end got the event brings a retry with the same id) and not ordered
across events; docs/WEBHOOKS.md says how a receiver copes, and how it checks
the signature (``Chatd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import __version__, limits
from chatd.history import Message
from chatd.stats import Stats

_log = Logger()

CONCURRENCY = 4  # requests in flight at most
ATTEMPTS = 6  # tries of one event, the first included
FIRST_DELAY = 2.0  # seconds before the first retry; then x3: 2, 6, 18, 54, 162 (~4 min)
FACTOR = 3.0
MAX_DELAY = 300.0  # a Retry-After is followed up to this
MAX_RESPONSE = 64 * 1024  # response body bytes read (and thrown away); past it: closed
LOG_EVERY = 10.0  # seconds between "given up" lines at most
STOP_GRACE = 3.0  # seconds requests in flight get at stop before they are cancelled
RETRY_STATUS = frozenset({408, 429})  # and every 5xx

# webhook_secret's placeholder in etc/chatd.toml: a copied example must not sign anything.
EXAMPLE_SECRET = "change-me-to-another-random-string"

TYPES = ("user.online", "user.offline", "message.created")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Chatd-Signature`` header: ``t=<timestamp>,v1=<hex HMAC-SHA256>`` of
    ``f"{timestamp}."`` followed by the body, keyed with the secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, window: float = 300.0) -> bool:
    """A receiver's check (docs/WEBHOOKS.md has it standalone): the signature is the
    secret's, and its timestamp within ``window`` seconds of ``now``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > window:
        return False
    want = sign(secret, t, body).split(",v1=", 1)[1]
    return hmac.compare_digest(want, parts.get("v1", ""))


def check_url(url: str) -> None:
    """ValueError unless ``url`` is an http or https URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(f"is not a URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, not {url!r}")
    if parts.username or parts.password:
        raise ValueError("must not carry a user or password (the signature authenticates)")


@dataclass(frozen=True, slots=True)
class Rooms:
    """Which rooms' messages are sent (message.created): names, and prefixes (``name*``)."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_text(cls, text: str) -> Rooms:
        """``support-*,orders``: comma-separated room names, a trailing ``*`` makes a
        prefix, ``*`` alone is every room; ValueError names a bad one."""
        names: set[str] = set()
        prefixes: list[str] = []
        for item in (p.strip() for p in text.split(",")):
            if not item:
                continue
            if item == "*":
                prefixes.append("")
                continue
            stem = item.removesuffix("*")
            if not limits.valid_room_name(stem):
                raise ValueError(f"{item!r} is not a room or prefix* ({limits.ROOM_NAME_RULE})")
            if item.endswith("*"):
                prefixes.append(stem)
            else:
                names.add(item)
        return cls(frozenset(names), tuple(prefixes))

    def __bool__(self) -> bool:
        return bool(self.names or self.prefixes)

    def match(self, room: str) -> bool:
        return room in self.names or any(room.startswith(p) for p in self.prefixes)


class _Response(Protocol):
    code: int

    @property
    def headers(self) -> Any: ...

    @property
    def length(self) -> Any: ...

    def deliverBody(self, protocol: Any) -> None: ...


class Client(Protocol):
    """What is used of ``treq.client.HTTPClient`` (tests give ``treq.testing.StubTreq``)."""

    def post(self, url: str, data: bytes, **kw: Any) -> defer.Deferred[Any]: ...


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    body: bytes


class _TooLong(Exception):
    """A response body past MAX_RESPONSE: the connection is closed."""


def _client(clock: IReactorTime, timeout: float) -> tuple[Client, Callable[[], object]]:
    """A treq client on a pool of persistent connections; and how to close them."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(clock, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = CONCURRENCY
    pool.retryAutomatically = False  # a retry is ours to decide (and count)
    agent = Agent(clock, connectTimeout=timeout, pool=pool)  # type: ignore[no-untyped-call]
    return cast(Client, HTTPClient(agent)), pool.closeCachedConnections


class Webhooks(service.Service):
    """POSTs events to ``url``, signed with ``secret``: a bounded queue, a few in flight."""

    def __init__(
        self,
        url: str,
        secret: str,
        rooms: Rooms | str = "",
        queue: int = 10_000,
        timeout: float = 10.0,
        stats: Stats | None = None,
        clock: IReactorTime | None = None,
        client: Client | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        assert clock is not None
        self.url, self._secret = url, secret
        # As logged: without a query, which may carry a credential of the back end's.
        self.shown_url = urlsplit(url)._replace(query="", fragment="").geturl()
        self.rooms = Rooms.from_text(rooms) if isinstance(rooms, str) else rooms
        self.max_queue, self.timeout = queue, timeout
        self.stats = stats if stats is not None else Stats()
        self.stats.webhook_queue = 0  # shown in /metrics from now on
        self.clock = clock
        self._close_pool: Callable[[], object] = lambda: None
        if client is None:
            client, self._close_pool = _client(clock, timeout)
        self.client = client
        self.rand = rand
        self.queue: deque[Event] = deque()
        self.sending: set[defer.Deferred[None]] = set()
        self._dropping = 0  # dropped since the queue last had room (for the log)
        self._quiet_until = 0.0  # no "given up" line before then
        self._unlogged = 0  # "given up" lines left out since the last one
        self._waits: set[defer.Deferred[None]] = set()  # backoffs under way
        self.accepting = True  # events are taken until stopped (listeners may come first)

    # -- the listeners (Hub.user_listeners, Hub.message_listeners): enqueue and return --
    def user(self, sub: str, name: str, online: bool) -> None:
        self.emit("user.online" if online else "user.offline", {"user": sub, "name": name})

    def message(self, msg: Message) -> None:
        if msg.kind in ("react", "unreact") or not self.rooms.match(msg.room):
            return
        data: dict[str, Any] = {"room": msg.room, "id": msg.id, "ts": msg.ts, "from": msg.sender}
        if msg.kind != "delete":
            data["text"] = msg.text
        if msg.user:
            data["user"] = msg.user
        if msg.kind:  # an edit or a delete: "target" is the message it changed
            data["target"] = msg.target
            self.emit("message.edited" if msg.kind == "edit" else "message.deleted", data)
        else:
            self.emit("message.created", data)

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """Queue an event (dropped, and counted, if the queue is full) and send what can be."""
        if not self.accepting:
            return
        if len(self.queue) >= self.max_queue:
            self.stats.webhook_dropped += 1
            if not self._dropping:
                _log.warn(
                    "webhook queue full ({n} events): dropping new events until the back "
                    "end {url} catches up",
                    n=len(self.queue),
                    url=self.shown_url,
                )
            self._dropping += 1
            return
        if self._dropping:
            _log.info("webhook queue has room again; {n} events dropped", n=self._dropping)
            self._dropping = 0
        event_id = uuid.uuid4().hex
        body = json.dumps(
            {"id": event_id, "type": type_, "ts": int(self.clock.seconds() * 1000), "data": data},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        self.queue.append(Event(event_id, type_, body))
        self._pump()

    def _count(self) -> None:
        self.stats.webhook_queue = len(self.queue) + len(self.sending)

    def _pump(self) -> None:
        while self.accepting and self.queue and len(self.sending) < CONCURRENCY:
            event = self.queue.popleft()
            d = defer.ensureDeferred(self._deliver(event))
            self.sending.add(d)
            d.addErrback(self._crashed, event)
            d.addBoth(self._done, d)
        self._count()

    def _done(self, _: object, d: defer.Deferred[None]) -> None:
        self.sending.discard(d)
        self._pump()

    def _crashed(self, failure: Failure, event: Event) -> None:
        if not isinstance(failure.value, defer.CancelledError):
            _log.failure("webhook {id}: delivery crashed", failure, id=event.id)

    # -- one event: attempts with backoff --
    async def _deliver(self, event: Event) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            why, retry_after = await self._attempt(event)
            if why is None:
                self.stats.webhook_sent[event.type] += 1
                return
            if not self.accepting:
                return
            last = attempt == ATTEMPTS or retry_after < 0
            if last:
                self.stats.webhook_failed[event.type] += 1
                self._given_up(event, attempt, why)
                return
            wait = task.deferLater(self.clock, self.backoff(attempt, retry_after), lambda: None)
            self._waits.add(wait)
            try:
                await wait
            finally:
                self._waits.discard(wait)

    def _given_up(self, event: Event, attempts: int, why: str) -> None:
        """Log a failure, at most one line per LOG_EVERY seconds (a back end refusing
        every event must not flood the log); the next line counts the ones left out."""
        now = self.clock.seconds()
        if now < self._quiet_until:
            self._unlogged += 1
            return
        self._quiet_until = now + LOG_EVERY
        more, self._unlogged = self._unlogged, 0
        _log.warn(
            "webhook {type} {id} to {url} given up after {n} attempts: {why}{more}",
            type=event.type,
            id=event.id,
            url=self.shown_url,
            n=attempts,
            why=why,
            more=f" (and {more} more since the last such line)" if more else "",
        )

    def backoff(self, attempt: int, retry_after: float = 0.0) -> float:
        """Seconds before attempt ``attempt + 1``: FIRST_DELAY x FACTOR^(attempt-1), half of it
        random (so nodes that failed together do not retry together), or a Retry-After."""
        base = FIRST_DELAY * FACTOR ** (attempt - 1)
        delay = base / 2 + self.rand() * base / 2
        return min(MAX_DELAY, max(delay, retry_after))

    async def _attempt(self, event: Event) -> tuple[str | None, float]:
        """One POST: (None, 0) if taken; else why not, and a Retry-After in seconds
        (0 if none), or -1 when retrying cannot help (a 4xx other than 408 and 429)."""
        t = int(self.clock.seconds())
        headers = {
            "Content-Type": ["application/json"],
            "User-Agent": [f"chatd/{__version__}"],
            "Chatd-Event-Id": [event.id],
            "Chatd-Event-Type": [event.type],
            "Chatd-Signature": [sign(self._secret, t, event.body)],
        }
        d = self.client.post(
            self.url, data=event.body, headers=headers, allow_redirects=False, unbuffered=True
        )
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self.clock)
        try:
            code, retry_after = await d
        except defer.TimeoutError:
            return f"no answer within {self.timeout:g} s", 0.0
        except defer.CancelledError:
            raise
        except Exception as e:  # refused, reset, DNS, TLS: the back end is away
            return _describe(e), 0.0
        if 200 <= code < 300:
            return None, 0.0
        if code >= 500 or code in RETRY_STATUS:
            return f"HTTP {code}", retry_after
        return f"HTTP {code} (not retried)", -1.0

    def _read(self, response: _Response) -> defer.Deferred[tuple[int, float]]:
        """Read the answer's body (at most MAX_RESPONSE, thrown away), so the connection
        can serve the next request; its status and Retry-After."""
        code = response.code
        retry_after = 0.0
        values = response.headers.getRawHeaders(b"retry-after") or []
        if values and values[0].strip().isdigit():
            retry_after = float(values[0].strip())
        from treq.content import collect

        seen = [0]

        def discard(data: bytes) -> None:
            seen[0] += len(data)
            if seen[0] > MAX_RESPONSE:
                raise _TooLong()

        d = collect(response, discard)  # type: ignore[arg-type]

        def too_long(f: Failure) -> None:
            if not isinstance(f.value, _TooLong):  # the status is what counts
                f.raiseException()

        d.addErrback(too_long)
        return d.addCallback(lambda _: (code, retry_after))

    # -- the service --
    def stopService(self) -> defer.Deferred[None]:
        """Take no more events and stop retrying; requests in flight get STOP_GRACE
        seconds, then are cancelled. What is still queued is lost (logged)."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.accepting = False
        left = len(self.queue)
        self.queue.clear()
        if left:
            _log.warn("webhooks stopping: {n} queued events not sent", n=left)
        for wait in list(self._waits):  # no more retries
            wait.cancel()
        sending = list(self.sending)
        done: defer.Deferred[None] = defer.DeferredList(sending, consumeErrors=True).addCallback(
            lambda _: None
        )

        def cancel() -> None:
            for d in sending:
                d.cancel()

        timer = self.clock.callLater(STOP_GRACE, cancel)

        def finish(result: object) -> object:
            if timer.active():
                timer.cancel()
            self._close_pool()
            self._count()
            return result

        return done.addBoth(finish)


def _describe(e: Exception) -> str:
    """A connection error in a few words (never the request, so never the signature)."""
    inner = getattr(e, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed
    if inner:
        e = inner[0].value
    return f"{type(e).__name__}: {e}"[:200]


__all__ = ["Rooms", "Webhooks", "check_url", "sign", "verify"]
