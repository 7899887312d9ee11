"""Webhooks (chatd/webhooks.py), in process: the queue, the backoff, the drops and
the signature, with time a ``task.Clock`` and the back end treq's in-memory
``StubTreq`` (or a client whose answers the test decides).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.web.resource import Resource
from twisted.web.server import Request

from chatd import webhooks
from chatd.history import Message
from chatd.stats import Stats
from chatd.webhooks import Rooms, Webhooks, sign, verify

SECRET = "a-webhook-secret-for-tests"
URL = "http://backend.test/hook"


# -- in process: a back end in memory, time a Clock --------------------------------


class Backend(Resource):
    """Records each request; answers with the next status of ``statuses`` (then 200)."""

    isLeaf = True

    def __init__(self, *statuses: int, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.headers = headers or {}
        self.got: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        heads = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        assert request.content is not None
        self.got.append((heads, request.content.read()))
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return b"ok"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


def hooks(backend: Backend, **kw: Any) -> tuple[Webhooks, StubTreq, task.Clock, Stats]:
    clock, stats = task.Clock(), Stats()
    clock.advance(1_800_000_000)  # a realistic now: the signature's timestamp
    stub = StubTreq(backend)
    w = Webhooks(URL, SECRET, stats=stats, clock=clock, client=stub, rand=lambda: 1.0, **kw)
    return w, stub, clock, stats


def test_an_event_is_posted_as_json_signed_over_timestamp_and_body() -> None:
    backend = Backend()
    w, stub, _, stats = hooks(backend)
    w.user("alice", "Alice", True)
    stub.flush()
    [(heads, body)] = backend.got
    event = json.loads(body)
    assert event["type"] == "user.online" and event["data"] == {"user": "alice", "name": "Alice"}
    assert event["ts"] == 1_800_000_000_000 and len(event["id"]) == 32
    assert heads["content-type"] == "application/json"
    assert heads["chatd-event-id"] == event["id"] and heads["chatd-event-type"] == "user.online"
    # The check docs/WEBHOOKS.md gives a receiver, written out here as it is there.
    sig = heads["chatd-signature"]
    m = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", sig)
    assert m and int(m.group(1)) == 1_800_000_000
    want = hmac.new(SECRET.encode(), m.group(1).encode() + b"." + body, hashlib.sha256)
    assert hmac.compare_digest(want.hexdigest(), m.group(2))
    assert sig == sign(SECRET, 1_800_000_000, body)
    assert verify(SECRET, sig, body, now=1_800_000_000 + 299)
    assert not verify(SECRET, sig, body, now=1_800_000_000 + 301)  # replayed too late
    assert not verify("another-secret-entirely", sig, body, now=1_800_000_000)
    assert not verify(SECRET, sig, body + b" ", now=1_800_000_000)  # a body changed
    assert stats.webhook_sent == {"user.online": 1} and stats.webhook_queue == 0
    assert SECRET not in json.dumps(heads) and SECRET.encode() not in body


def test_messages_are_sent_for_the_configured_rooms_only() -> None:
    backend = Backend()
    w, stub, _, stats = hooks(backend, rooms="support-*,orders")
    for room in ("support-1", "orders", "orders-2", "lobby", "support"):
        w.message(Message(room, 7, 1_800_000_000_123, "Alice", "hi", None, "alice"))
    w.user("bob", "Bob", False)
    stub.flush()
    events = backend.events()
    assert [e["data"].get("room") for e in events] == ["support-1", "orders", None]
    assert events[0]["data"] == {
        "room": "support-1",
        "id": 7,
        "ts": 1_800_000_000_123,
        "from": "Alice",
        "text": "hi",
        "user": "alice",
    }
    assert events[2]["type"] == "user.offline"
    assert stats.webhook_sent == {"message.created": 2, "user.offline": 1}


def test_room_patterns() -> None:
    r = Rooms.from_text(" support-* , orders,,")
    assert r.match("support-") and r.match("support-9") and r.match("orders")
    assert not r.match("orders-1") and not r.match("lobby")
    assert Rooms.from_text("*").match("anything") and not Rooms.from_text("")
    for bad in ("a b", "sup*port", "!online", "x" * 65):
        with pytest.raises(ValueError, match="is not a room or prefix"):
            Rooms.from_text(bad)


def test_5xx_408_and_429_are_retried_with_growing_jittered_backoff() -> None:
    backend = Backend(500, 503, 408, 429)
    w, stub, clock, stats = hooks(backend)
    w.user("alice", "Alice", True)
    stub.flush()
    waits = []
    for attempt in range(1, 5):
        assert len(backend.got) == attempt
        delay = w.backoff(attempt)
        assert delay == webhooks.FIRST_DELAY * webhooks.FACTOR ** (attempt - 1)  # rand() = 1.0
        clock.advance(delay - 0.01)
        stub.flush()
        assert len(backend.got) == attempt  # not before its time
        clock.advance(0.01)
        stub.flush()
        waits.append(delay)
    assert len(backend.got) == 5 and stats.webhook_sent == {"user.online": 1}
    ids = {h["chatd-event-id"] for h, _ in backend.got}
    assert len(ids) == 1  # one event, retried under its id (a receiver dedupes on it)
    assert waits == [2.0, 6.0, 18.0, 54.0]
    # The jitter: between half the step and the step.
    low = Webhooks(URL, SECRET, clock=clock, client=stub, rand=lambda: 0.0)
    assert [low.backoff(a) for a in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_a_retry_after_is_followed_but_capped() -> None:
    backend = Backend(429, 429, headers={b"Retry-After": b"40"})
    w, stub, clock, _ = hooks(backend)
    w.user("alice", "Alice", True)
    stub.flush()
    clock.advance(39.9)
    stub.flush()
    assert len(backend.got) == 1
    clock.advance(0.1)
    stub.flush()
    assert len(backend.got) == 2
    assert w.backoff(1, retry_after=10_000) == webhooks.MAX_DELAY


def test_other_4xx_are_not_retried_and_counted_failed() -> None:
    backend = Backend(400, 401, 404)
    w, stub, clock, stats = hooks(backend)
    for sub in ("a", "b", "c"):
        w.user(sub, sub, True)
    stub.flush()
    clock.advance(3600)
    stub.flush()
    assert len(backend.got) == 3
    assert stats.webhook_failed == {"user.online": 3} and not stats.webhook_sent


def test_a_dead_back_end_is_given_up_on_after_the_attempts_in_bounded_time() -> None:
    backend = Backend(*[500] * 100)
    w, stub, clock, stats = hooks(backend)
    w.user("alice", "Alice", True)
    stub.flush()
    start = clock.seconds()
    for _ in range(400):  # bounded: a second a turn, past the last retry
        if stats.webhook_failed:
            break
        clock.advance(1.0)
        stub.flush()
    assert len(backend.got) == webhooks.ATTEMPTS
    assert stats.webhook_failed == {"user.online": 1} and stats.webhook_queue == 0
    assert clock.seconds() - start <= 2 + 6 + 18 + 54 + 162 + 1  # ~4 min, no timeouts here
    assert not clock.getDelayedCalls()


class Manual:
    """A client whose answers the test gives: each post's Deferred waits in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, dict[str, Any], defer.Deferred[Any]]] = []

    def post(self, url: str, data: bytes, **kw: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((data, kw, d))
        return d


def manual(**kw: Any) -> tuple[Webhooks, Manual, task.Clock, Stats]:
    clock, stats, client = task.Clock(), Stats(), Manual()
    w = Webhooks(URL, SECRET, stats=stats, clock=clock, client=client, rand=lambda: 1.0, **kw)
    return w, client, clock, stats


def test_connection_errors_and_timeouts_are_retried() -> None:
    w, client, clock, stats = manual(timeout=10.0)
    w.user("alice", "Alice", True)
    client.calls[0][2].errback(error.ConnectionRefusedError())
    clock.advance(2.0)
    assert len(client.calls) == 2
    clock.advance(10.0)  # no answer within the timeout: cancelled, retried later
    assert client.calls[1][2].called
    clock.advance(6.0)
    assert len(client.calls) == 3
    assert not stats.webhook_sent and not stats.webhook_failed and stats.webhook_queue == 1


def test_a_full_queue_drops_new_events_and_counts_them() -> None:
    w, client, _, stats = manual(queue=5)
    for i in range(20):
        w.user(f"u{i}", "x", True)  # a back end that never answers
    assert len(client.calls) == webhooks.CONCURRENCY  # no more in flight, however many wait
    assert len(w.queue) == 5 and stats.webhook_dropped == 20 - 5 - webhooks.CONCURRENCY
    assert stats.webhook_queue == 5 + webhooks.CONCURRENCY
    # The back end answers: the queue drains, four at a time, and takes events again.
    for _ in range(10):  # bounded
        pending = [d for _, _, d in client.calls if not d.called]
        if not pending:
            break
        for d in pending:
            d.callback(FakeResponse(204))
    assert stats.webhook_sent == {"user.online": 9} and stats.webhook_queue == 0
    w.user("late", "x", True)
    assert len(client.calls) == 10


class FakeResponse:
    length = 0

    def __init__(self, code: int) -> None:
        from twisted.web.http_headers import Headers

        self.code, self.headers = code, Headers()

    def deliverBody(self, protocol: Any) -> None:
        raise AssertionError("a body of length 0 is not read")


def test_stop_ends_retries_at_once_and_requests_after_a_grace() -> None:
    w, client, clock, stats = manual()
    w.user("a", "A", True)
    w.user("b", "B", True)
    client.calls[0][2].errback(error.ConnectionRefusedError())  # a: waits for a retry
    for i in range(10):
        w.user(f"q{i}", "x", True)
    stopped = w.stopService()
    assert not stopped.called  # b and the others in flight get the grace
    assert not any(c.active() for c in clock.getDelayedCalls() if c.getTime() < 2.0)
    clock.advance(webhooks.STOP_GRACE)
    assert stopped.called and stats.webhook_queue == 0
    assert not clock.getDelayedCalls()
    w.user("after", "x", True)  # not taken any more
    assert len(client.calls) == webhooks.CONCURRENCY


def test_stop_returns_as_soon_as_nothing_is_in_flight() -> None:
    w, client, clock, _ = manual()
    w.user("a", "A", True)
    stopped = w.stopService()
    client.calls[0][2].callback(FakeResponse(200))
    assert stopped.called and not clock.getDelayedCalls()
