"""Webhooks (chatd/webhooks.py, docs/WEBHOOKS.md): in process for the queue, the
backoff, the drops and the signature, with time a ``task.Clock`` and the back end
treq's in-memory ``StubTreq`` (or a client whose answers the test decides);
against the real daemon, with a receiver HTTP server on 127.0.0.1, for what the
back end gets: one ``user.online`` for two tabs, one ``user.offline`` after the
debounce, ``message.created`` for the configured rooms only, a signature that
the documented check accepts, and chat that does not wait for a dead or hanging
back end (the drops and failures counted in /metrics); and on two cluster nodes,
one online/offline pair for a user with tabs on both.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.web.resource import Resource
from twisted.web.server import Request
from v1client import V1

from chatd import webhooks
from chatd.history import Message
from chatd.stats import Stats
from chatd.tap import Options
from chatd.webhooks import Rooms, Webhooks, sign, verify
from tools.daemon import Daemon
from tools.redis import RedisServer

SECRET = "a-webhook-secret-for-tests"
URL = "http://backend.test/hook"
JWT_KEY = "s3cret-" * 6  # HS256: at least 32 bytes


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


def test_failures_are_logged_without_flooding_the_log() -> None:
    from twisted.logger import globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "chatd.webhooks":
            from twisted.logger import formatEvent

            lines.append(formatEvent(event))

    backend = Backend(*[400] * 30)
    w, stub, clock, stats = hooks(backend)
    globalLogPublisher.addObserver(observe)
    try:
        for i in range(20):
            w.user(f"u{i}", "x", True)
            stub.flush()
        clock.advance(webhooks.LOG_EVERY)
        w.user("late", "x", True)
        stub.flush()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert stats.webhook_failed == {"user.online": 21}
    assert len(lines) == 2, lines
    assert "given up after 1 attempts: HTTP 400 (not retried)" in lines[0]
    assert lines[1].endswith("(and 19 more since the last such line)")
    assert SECRET not in " ".join(lines)


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
    assert len(w.queue) == 0 and len(w.sending) == webhooks.CONCURRENCY - 1  # a's retry: gone
    clock.advance(webhooks.STOP_GRACE)
    assert stopped.called and stats.webhook_queue == 0
    assert not clock.getDelayedCalls()
    assert all(d.called for _, _, d in client.calls)  # cancelled
    assert not stats.webhook_failed  # not given up on: the daemon stopped
    w.user("after", "x", True)  # not taken any more
    assert len(client.calls) == webhooks.CONCURRENCY


def test_stop_returns_as_soon_as_nothing_is_in_flight() -> None:
    w, client, clock, _ = manual()
    w.user("a", "A", True)
    stopped = w.stopService()
    client.calls[0][2].callback(FakeResponse(200))
    assert stopped.called and not clock.getDelayedCalls()


def test_the_log_shows_the_url_without_its_query() -> None:
    w = Webhooks("https://b.example/h?key=hunter2#x", SECRET, clock=task.Clock(), client=Manual())
    assert w.shown_url == "https://b.example/h"


# -- settings ---------------------------------------------------------------------------


def refused(capfd: Any, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        Options().parseOptions(argv)
    return capfd.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--webhook-url", "http://b.example/h"], "--webhook-url needs webhook_secret"),
        (["--webhook-url", "ftp://b.example/h", "--webhook-secret", SECRET], "http:// or https://"),
        (["--webhook-url", "https:///h", "--webhook-secret", SECRET], "with a host"),
        (
            ["--webhook-url", "http://u:p@b.example/", "--webhook-secret", SECRET],
            "user or password",
        ),
        (
            ["--webhook-url", "http://b/", "--webhook-secret", "short"],
            "--webhook-secret must be at least 16",
        ),
        (["--webhook-rooms", "ok,not ok"], "--webhook-rooms: 'not ok' is not a room"),
        (["--webhook-queue", "0"], "--webhook-queue must be 1-1000000"),
        (["--webhook-timeout", "0"], "--webhook-timeout must be > 0"),
        (
            ["--webhook-url", "http://b/", "--webhook-secret", webhooks.EXAMPLE_SECRET],
            "placeholder",
        ),
    ],
)
def test_bad_webhook_settings_are_refused_naming_the_option(
    argv: list[str], message: str, capfd: Any, monkeypatch: Any
) -> None:
    monkeypatch.delenv("CHATD_WEBHOOK_SECRET", raising=False)
    assert message in refused(capfd, argv)


def test_the_secret_may_come_from_the_environment(capfd: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("CHATD_WEBHOOK_SECRET", SECRET)
    o = Options()
    o.parseOptions(["--webhook-url", "https://b.example/h"])
    assert o.settings.webhook_secret == SECRET
    monkeypatch.setenv("CHATD_WEBHOOK_SECRET", "short")
    assert "CHATD_WEBHOOK_SECRET: webhook_secret must be at least 16" in refused(capfd, [])


# -- against the real daemon: a receiver on 127.0.0.1 ------------------------------------


class Receiver:
    """An HTTP server on a free loopback port recording each POST; ``status`` answers it
    (``None``: never answer, as a hung back end)."""

    def __init__(self, status: int | None = 204) -> None:
        self.status = status
        self.got: list[tuple[dict[str, str], bytes, float]] = []
        self.cond = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                heads = {k.lower(): v for k, v in self.headers.items()}
                with receiver.cond:
                    receiver.got.append((heads, body, time.time()))
                    receiver.cond.notify_all()
                if receiver.status is None:
                    receiver.release.wait(30)
                    return
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/chatd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(body) for _, body, _ in self.got]

    def wait(self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                events = [json.loads(body) for _, body, _ in self.got]
                if check(events):
                    return events
                left = deadline - time.monotonic()
                assert left > 0, f"receiver: not within {timeout} s: {events}"
                self.cond.wait(left)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(status: int | None = 204) -> Receiver:
        r = Receiver(status)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def token(sub: str, **rooms: str) -> str:
    claims = {
        "sub": sub,
        "name": sub.title(),
        "exp": time.time() + 600,
        "rooms": rooms or {"*": "rw"},
    }
    return jwt.encode(claims, JWT_KEY, algorithm="HS256")


def tab(port: int, sub: str) -> V1:
    c = V1(port)
    c.req("hello", token=token(sub))
    c.next("welcome")
    return c


def users(events: list[dict[str, Any]], sub: str) -> list[str]:
    """A user's events in the order chatd made them: by ``ts`` (each is its own request,
    so an offline right after an online may arrive first: docs/WEBHOOKS.md)."""
    mine = [e for e in events if e["type"].startswith("user.") and e["data"]["user"] == sub]
    mine.sort(key=lambda e: (e["ts"], e["type"] == "user.offline"))
    return [e["type"] for e in mine]


def hooked(url: str, *args: str) -> list[str]:
    return [
        "--ping-interval", "0", "--auth", "token", "--jwt-key", JWT_KEY,
        "--presence-debounce", "0.5", "--webhook-url", url, "--webhook-secret", SECRET, *args,
    ]  # fmt: skip


def documented_check() -> Callable[[str, str, bytes], bool]:
    """The receiver's check as docs/WEBHOOKS.md gives it (its one Python block), run."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "WEBHOOKS.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, re.S)
    scope: dict[str, Any] = {}
    exec(code, scope)
    return scope["chatd_event_is_genuine"]


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_the_back_end_hears_of_users_once_and_of_messages_in_its_rooms(daemon, receiver) -> None:
    rx = receiver()
    d = daemon(*hooked(rx.url, "--webhook-rooms", "support-*"))
    tabs = [tab(d.port, "alice"), tab(d.port, "alice")]
    events = rx.wait(lambda ev: users(ev, "alice") == ["user.online"])
    online = next(e for e in events if e["type"] == "user.online")
    assert online["data"] == {"user": "alice", "name": "Alice"}
    tabs[0].join("support-7")
    tabs[0].join("lobby")
    tabs[0].say("lobby", "not for the back end")
    tabs[0].say("support-7", "my order is late")
    events = rx.wait(lambda ev: any(e["type"] == "message.created" for e in ev))
    [created] = [e for e in events if e["type"] == "message.created"]
    assert created["data"]["room"] == "support-7" and created["data"]["text"] == "my order is late"
    assert created["data"]["user"] == "alice" and created["data"]["id"] == 1
    tabs[0].req("edit", room="support-7", id=1, text="my order is very late")
    tabs[0].req("react", room="support-7", id=1, emoji="😠")  # (reactions: not sent)
    tabs[0].req("delete", room="support-7", id=1)
    events = rx.wait(lambda ev: any(e["type"] == "message.deleted" for e in ev))
    [edited] = [e["data"] for e in events if e["type"] == "message.edited"]
    [deleted] = [e["data"] for e in events if e["type"] == "message.deleted"]
    assert (edited["id"], edited["target"], edited["text"]) == (2, 1, "my order is very late")
    assert (deleted["id"], deleted["target"], deleted["user"]) == (4, 1, "alice")
    assert "text" not in deleted
    for c in tabs:
        c.close()
    events = rx.wait(lambda ev: "user.offline" in users(ev, "alice"))
    # A marker after it: bob comes and goes; by then alice had one change each way.
    tab(d.port, "bob").close()
    events = rx.wait(lambda ev: users(ev, "bob") == ["user.online", "user.offline"])
    assert users(events, "alice") == ["user.online", "user.offline"]
    assert sum(e["type"] == "message.created" for e in events) == 1
    # Every request is signed as docs/WEBHOOKS.md says, checked with its own code.
    genuine = documented_check()
    with rx.cond:
        got = list(rx.got)
    for heads, body, when in got:
        assert verify(SECRET, heads["chatd-signature"], body, now=when)
        assert genuine(SECRET, heads["chatd-signature"], body)
        assert not genuine("not-the-secret-at-all", heads["chatd-signature"], body)
        assert not genuine(SECRET, heads["chatd-signature"], body.replace(b'"type"', b'"Type"'))
        assert heads["chatd-event-id"] == json.loads(body)["id"]
    assert len({json.loads(b)["id"] for _, b, _ in got}) == len(got)
    text = metrics(d.port)
    assert 'chatd_webhook_sent_total{type="user.online"} 2.0' in text
    assert 'chatd_webhook_sent_total{type="message.created"} 1.0' in text
    assert "chatd_webhook_queue 0.0" in text


FAST = ("--rate", "1000", "--rate-burst", "1000")  # 200 sends in a row are not refused


def round_trips(port: int, room: str, n: int) -> list[float]:
    """Seconds from each send to its echo, one at a time."""
    c = tab(port, "carol")
    c.join(room)
    took = []
    for i in range(n):
        t0 = time.monotonic()
        c.say(room, f"m{i}")
        while c.next()["type"] != "message":
            pass
        took.append(time.monotonic() - t0)
    c.close()
    return took


def test_a_dead_or_hung_back_end_does_not_slow_chat_and_is_counted(daemon, receiver) -> None:
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hooks"
    hung = receiver(status=None)  # takes the request, never answers
    refusing = receiver(status=400)
    measured = {}
    for name, url in (("dead", dead), ("hung", hung.url)):
        d = daemon(*hooked(url, "--webhook-rooms", "*", "--webhook-queue", "10", *FAST))
        took = round_trips(d.port, "busy", 200)
        measured[name] = (max(took), sorted(took)[len(took) // 2])
        text = metrics(d.port)
        dropped = re.search(r"^chatd_webhook_dropped_total (\S+)$", text, re.M)
        assert dropped and float(dropped.group(1)) >= 200 - 10 - 4, text
        assert 'chatd_webhook_failed_total{type="message.created"}' in text
        assert "chatd_webhook_queue " in text
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 10  # the stop is not held by the back end
        assert "webhooks stopping" in d.log() and SECRET not in d.log()
    for name, (worst, median) in measured.items():
        assert worst < 1.0 and median < 0.05, (name, worst, median)
    d = daemon(*hooked(refusing.url, "--webhook-rooms", "*"))
    round_trips(d.port, "busy", 3)
    refusing.wait(lambda ev: len(ev) >= 4)  # carol online, 3 messages (, offline)

    def failed() -> bool:
        return 'chatd_webhook_failed_total{type="message.created"} 3.0' in metrics(d.port)

    deadline = time.monotonic() + 20
    while not failed():  # a 400 is not retried: failed at once
        assert time.monotonic() < deadline, metrics(d.port)
        time.sleep(0.05)
    assert "given up after 1 attempts: HTTP 400" in d.log()


@contextlib.contextmanager
def two_hooked_nodes(rx: Any) -> Iterator[list[Daemon]]:
    """Two cluster nodes (a Redis of their own, --cluster-ttl 2) sending to ``rx``;
    stopped (by pid) after, with no traceback in the log of one still running."""
    with RedisServer() as redis:
        nodes: list[Daemon] = []
        try:
            for _ in range(2):
                n = Daemon(*hooked(rx.url, "--redis", redis.url, "--cluster-ttl", "2"))
                nodes.append(n)
                n.wait_for_log(r"redis redis://\S+ connected", 30)
            yield nodes
        finally:
            for n in nodes:
                n.stop()
        for n in nodes:
            assert "Traceback" not in n.log(), n.log()


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server missing")
def test_two_nodes_say_a_users_online_and_offline_once(receiver) -> None:
    rx = receiver()
    with two_hooked_nodes(rx) as nodes:
        tabs = [tab(n.port, "alice") for n in nodes for _ in range(2)]
        rx.wait(lambda ev: users(ev, "alice") == ["user.online"])
        for c in tabs:
            c.close()
        rx.wait(lambda ev: "user.offline" in users(ev, "alice"))
        tab(nodes[1].port, "bob").close()  # the marker: after it, nothing more of alice
        events = rx.wait(lambda ev: users(ev, "bob") == ["user.online", "user.offline"])
        assert users(events, "alice") == ["user.online", "user.offline"]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server missing")
def test_a_users_offline_is_said_once_when_the_node_holding_it_dies(receiver) -> None:
    rx = receiver()
    with two_hooked_nodes(rx) as (doomed, survivor):
        alice = tab(doomed.port, "alice")  # noqa: F841 (held open until the node dies)
        both = [tab(doomed.port, "bob"), tab(survivor.port, "bob")]  # bob stays, on the other
        rx.wait(lambda ev: users(ev, "alice") == ["user.online"] == users(ev, "bob"))
        doomed.stop(signal.SIGKILL)  # no goodbye: its members expire through the survivor
        rx.wait(lambda ev: "user.offline" in users(ev, "alice"))
        both[1].close()  # the marker: bob's offline, said after alice's by the survivor
        events = rx.wait(lambda ev: users(ev, "bob") == ["user.online", "user.offline"])
        assert users(events, "alice") == ["user.online", "user.offline"]  # once
