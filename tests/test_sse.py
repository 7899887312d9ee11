"""SSE (chatd/sse.py, docs/SSE.md): GET /sse/<room> against the real daemon.

Live messages as events with their ids, a resume with Last-Event-ID or ?since=
that gives exactly what was missed, edits as messages with a kind, the answers
to bad requests, token auth (forged, expired, another user's personal room),
a consumer that never reads dropped with the daemon's memory bounded, and two
cluster nodes. The heartbeat is tested in process with a ``task.Clock``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import jwt
import pytest
from inproc import Site, connect, turn
from test_backpressure import PeakRss
from test_cluster import node, redis  # noqa: F401 (fixtures)
from test_ops import request as metrics_request
from v1client import V1

from chatd.sse import SSE, accepts_event_stream
from tools.daemon import Daemon

SECRET = "sse-secret-" * 4  # HS256 needs at least 32 bytes
API_TOKEN = "an-api-token-for-the-sse-test"


def token(key: str = SECRET, **claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 600, **claims}
    return jwt.encode(body, key, algorithm="HS256")


class Stream:
    """A raw HTTP/1.1 SSE client: the response head, then events (chunked decoding)."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        head = {"Host": "127.0.0.1", "Accept": "text/event-stream", **(headers or {})}
        lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items() if v)]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.raw = b""
        self.body = b""
        self.chunked = False
        self.timeout = timeout
        while b"\r\n\r\n" not in self.raw:
            self._recv()
        head_bytes, _, self.raw = self.raw.partition(b"\r\n\r\n")
        status_line, *fields = head_bytes.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        self.headers = {k.lower(): v for k, v in (f.split(": ", 1) for f in fields)}
        self.chunked = self.headers.get("transfer-encoding") == "chunked"

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the stream")
        self.raw += data

    def _decode(self) -> None:
        if not self.chunked:
            self.body, self.raw = self.body + self.raw, b""
            return
        while True:
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                raise EOFError("the response ended")
            self.body += rest[:size]
            self.raw = rest[size + 2 :]

    def event(self) -> dict[str, Any]:
        """The next event or comment: {"event", "id", "data" (parsed), "comment"}."""
        deadline = time.monotonic() + self.timeout
        self._decode()
        while b"\n\n" not in self.body:
            assert time.monotonic() < deadline, f"no event within {self.timeout} s"
            self._recv()
            self._decode()
        block, _, self.body = self.body.partition(b"\n\n")
        out: dict[str, Any] = {"event": "message"}
        data: list[str] = []
        for line in block.decode("utf-8").split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                out["comment"] = value
            elif name == "data":
                data.append(value)
            else:
                out[name] = value
        if data:
            out["data"] = json.loads("\n".join(data))
        return out

    def events(self, n: int, skip_comments: bool = True) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            e = self.event()
            if "comment" in e and skip_comments:
                continue
            out.append(e)
        return out

    def joined(self) -> dict[str, Any]:
        e = self.events(1)[0]
        assert e["event"] == "joined", e
        return e

    def content(self) -> bytes:
        """A refusal's body (it says its Content-Length)."""
        size = int(self.headers["content-length"])
        while len(self.raw) < size:
            self._recv()
        return self.raw[:size]

    def close(self) -> None:
        self.sock.close()


def say(c: V1, room: str, *texts: str) -> list[int]:
    """Send ``texts``; the ids they got (from the sender's own copies)."""
    ids = []
    for text in texts:
        c.say(room, text)
        while True:
            m = c.next()
            if m["type"] == "message" and m["text"] == text:
                ids.append(m["id"])
                break
    return ids


def test_live_messages_resume_and_edits(chatd: Daemon) -> None:
    alice = V1(chatd.port, "alice")
    alice.join("tea")
    first = say(alice, "tea", "before")[0]
    s = Stream(chatd.port, "/sse/tea")
    assert s.status == 200, s.headers
    assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert s.headers["cache-control"].startswith("no-cache")
    j = s.joined()
    # A fresh stream starts live; its id is where a reconnect would resume from.
    assert j["id"] == str(first) and j["retry"] == "2000"
    assert j["data"] == {
        "type": "joined",
        "room": "tea",
        "last_id": first,
        "epoch": j["data"]["epoch"],
    }
    ids = say(alice, "tea", "one", "two", "three")
    got = s.events(3)
    assert [e["id"] for e in got] == [str(i) for i in ids]
    assert [e["data"]["text"] for e in got] == ["one", "two", "three"]
    assert got[0]["event"] == "message" and got[0]["data"]["type"] == "message"
    assert got[0]["data"]["from"] == "alice" and got[0]["data"]["id"] == ids[0]
    # Metrics as for WebSockets: a connection gauge of kind "sse", deliveries as chat's.
    status, _, body = metrics_request(chatd.port, "GET", "/metrics")
    assert status == 200 and 'chatd_connections{kind="sse"} 1.0' in body.decode(), body
    # An edit is a message with a kind, as chatd.v1 shows it.
    alice.req("edit", room="tea", id=ids[0], text="one!")
    edit = s.events(1)[0]["data"]
    assert edit["kind"] == "edit" and edit["target"] == ids[0] and edit["text"] == "one!"
    last_seen = edit["id"]
    s.close()
    missed = say(alice, "tea", "four", "five")
    # Last-Event-ID: exactly the missed ones, then live.
    r = Stream(chatd.port, "/sse/tea", {"Last-Event-ID": str(last_seen)})
    j = r.joined()
    assert j["data"]["recovered"] is True and j["id"] == str(last_seen)
    got = r.events(2)
    assert [int(e["id"]) for e in got] == missed
    assert [e["data"]["text"] for e in got] == ["four", "five"]
    live = say(alice, "tea", "six")
    assert [int(e["id"]) for e in r.events(1)] == live
    r.close()
    # ?since= does the same; Last-Event-ID wins over it (EventSource keeps the URL).
    q = Stream(chatd.port, f"/sse/tea?since={missed[0]}")
    assert q.joined()["data"]["recovered"] is True
    assert [int(e["id"]) for e in q.events(2)] == [missed[1], live[0]]
    q.close()
    q = Stream(chatd.port, "/sse/tea?since=0", {"Last-Event-ID": str(missed[1])})
    q.joined()
    assert [int(e["id"]) for e in q.events(1)] == live
    q.close()
    # An id the room never had: not recovered, and the stream's id says where it is exact.
    q = Stream(chatd.port, "/sse/tea", {"Last-Event-ID": "999999"})
    j = q.joined()
    assert j["data"]["recovered"] is False and j["data"]["reason"] == "unknown_id"
    assert j["id"] == str(live[0])
    q.close()
    alice.close()


def test_another_epoch_is_not_recovered(chatd: Daemon) -> None:
    """An id of another history (``?epoch=`` not the room's): the recent messages, marked."""
    alice = V1(chatd.port, "alice")
    alice.join("ep")
    ids = say(alice, "ep", "a", "b", "c")
    s = Stream(chatd.port, f"/sse/ep?since={ids[1]}&epoch=an-old-epoch")
    j = s.joined()
    assert (j["data"]["recovered"], j["data"]["reason"], j["data"]["reset"]) == (
        False,
        "epoch",
        True,
    )
    assert j["id"] == str(ids[0] - 1)  # exact from the first message it replays
    assert [int(e["id"]) for e in s.events(3)] == ids
    s.close()
    alice.close()


def test_reset_event() -> None:
    from chatd.hub import Reset
    from chatd.sse import SSERenderer

    event = SSERenderer().reset(Reset("r", "e2", 7))
    assert event == (
        b'event: reset\nid: 7\ndata: {"type":"reset","room":"r","epoch":"e2","last_id":7}\n\n'
    )


def test_a_long_replay_comes_in_pages(chatd: Daemon) -> None:
    alice = V1(chatd.port, "alice")
    alice.join("long")
    text = "x" * 8000
    ids = say(alice, "long", *(f"{i} {text}" for i in range(40)))  # 320 KB: several pages
    s = Stream(chatd.port, "/sse/long?since=0")
    assert s.joined()["data"]["recovered"] is True
    assert [int(e["id"]) for e in s.events(40)] == ids
    live = say(alice, "long", "after")
    assert [int(e["id"]) for e in s.events(1)] == live
    s.close()
    alice.close()


def request(port: int, path: str, headers: dict[str, str] | None = None) -> Stream:
    return Stream(port, path, headers)


def test_bad_requests_get_clear_answers(chatd: Daemon) -> None:
    cases = [
        ("/sse/", {}, 404),
        ("/sse/a/b", {}, 404),
        ("/sse/..", {}, 400),
        ("/sse/" + "x" * 65, {}, 400),
        ("/sse/bad%20name", {}, 400),
        ("/sse/ok", {"Accept": "text/html"}, 406),
        ("/sse/ok", {"Accept": "text/event-stream;q=0"}, 406),
        ("/sse/ok", {"Last-Event-ID": "-1"}, 400),
        ("/sse/ok?since=abc", {}, 400),
    ]
    for path, headers, status in cases:
        s = request(chatd.port, path, headers)
        assert s.status == status, (path, headers, s.status)
        s.close()
    for accept in ("*/*", "text/*", "text/html, */*;q=0.8", ""):  # "": no Accept header
        s = request(chatd.port, "/sse/ok", {"Accept": accept})
        assert s.status == 200, accept
        s.joined()
        s.close()
    assert not accepts_event_stream(b"application/json")
    # CORS: a page of an origin the WebSocket check allows may read the stream.
    here = f"127.0.0.1:{chatd.port}"
    s = request(chatd.port, "/sse/ok", {"Host": here, "Origin": f"http://{here}"})
    assert s.status == 200 and s.headers["access-control-allow-origin"] == f"http://{here}"
    s.close()
    s = request(chatd.port, "/sse/ok", {"Host": here, "Origin": "http://evil.example"})
    assert s.status == 200 and "access-control-allow-origin" not in s.headers
    assert s.headers["vary"] == "Origin"
    s.close()


def test_heartbeat_comments_on_the_clock() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    site = Site()
    sse = site.site.resource.extra[b"sse"]
    assert isinstance(sse, SSE)
    clock = Clock()
    sse.clock, sse.heartbeat = clock, 5.0
    t = connect(site.site)
    t.protocol.dataReceived(
        b"GET /sse/quiet HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    assert turn(lambda: b"event: joined" in t.value(), turns=50), t.value()
    assert b": ping" not in t.value()
    clock.advance(4.9)
    assert b": ping" not in t.value()
    clock.advance(0.1)
    assert t.value().count(b": ping\n\n") == 1
    clock.advance(5.0)
    assert t.value().count(b": ping\n\n") == 2
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert not sse.streams and not clock.getDelayedCalls()  # the timer stops with the last


def test_token_auth(daemon) -> None:
    d: Daemon = daemon(
        "--ping-interval",
        "0",
        "--auth",
        "optional",
        "--jwt-key",
        SECRET,
        "--anonymous-rooms",
        "lobby=r",
        "--api-token",
        API_TOKEN,
    )
    alice = token(rooms={"tea": "r"})

    def status(path: str, headers: dict[str, str] | None = None) -> int:
        s = request(d.port, path, headers)
        s.close()
        return s.status

    assert status("/sse/lobby") == 200  # anonymous, as --anonymous-rooms says
    s = request(d.port, "/sse/tea")
    assert s.status == 401 and s.headers["www-authenticate"].startswith("Bearer")
    assert json.loads(s.content())["reason"] == "missing"
    s.close()
    assert status(f"/sse/tea?token={alice}") == 200
    assert status("/sse/tea", {"Authorization": f"Bearer {alice}"}) == 200
    assert status(f"/sse/tea?token={token(key='another-secret-' * 3, rooms={'tea': 'r'})}") == 401
    assert status(f"/sse/tea?token={token(exp=time.time() - 3600, rooms={'tea': 'r'})}") == 401
    assert status(f"/sse/coffee?token={alice}") == 403  # no right to this room
    assert status(f"/sse/@alice?token={alice}") == 200  # one's own personal room
    assert status(f"/sse/@bob?token={alice}") == 403
    assert status("/sse/@alice") == 401  # never anonymous
    assert "token=REDACTED" in d.wait_for_log(r"GET /sse/coffee\?token=")
    # The simplest notification: the back end posts to a user, the user's stream gets it.
    mine = Stream(d.port, "/sse/@alice", {"Authorization": f"Bearer {alice}"})
    mine.joined()
    status_code, _, body = metrics_request(
        d.port,
        "POST",
        "/api/users/alice/messages",
        json.dumps({"text": "your order shipped", "from": "shop"}).encode(),
        {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
    )
    assert status_code == 201, body
    note = mine.events(1)[0]
    assert note["id"] == str(json.loads(body)["id"])
    assert (note["data"]["room"], note["data"]["from"]) == ("@alice", "shop")
    assert note["data"]["text"] == "your order shipped"
    mine.close()
    assert alice not in d.log()


def test_a_consumer_that_never_reads_is_dropped_memory_bounded(daemon) -> None:
    d: Daemon = daemon(
        "--max-backlog", "1M", "--ping-interval", "0", "--rate", "100000", "--rate-burst", "100000"
    )
    slow = Stream(d.port, "/sse/flood", rcvbuf=4096)  # joins, then never reads
    assert slow.status == 200
    healthy = Stream(d.port, "/sse/flood")
    healthy.joined()
    rss = PeakRss(d)
    publisher = V1(d.port, "pub")
    publisher.join("flood")
    text = "y" * 15000
    n = 1500  # 22 MB in all: far more than the bound
    for i in range(n):
        publisher.say("flood", f"{i} {text}")
        while publisher.next()["type"] != "message":  # its own copy: paced by the daemon
            pass  # (presence: the dropped consumer leaves)
        if i % 50 == 49:  # the healthy consumer keeps up
            got = healthy.events(50)
            assert got[-1]["data"]["text"].startswith(f"{i} ")
    growth = rss.stop()
    d.wait_for_log(r"dropped sse consumer of flood: backlog", 30)
    print(f"daemon RSS: baseline {rss.baseline} KiB, peak {rss.peak} KiB, growth {growth:.1f} MiB")
    assert growth < 12, growth  # unbounded, the silent consumer would pin ~22 MiB
    slow.close()
    healthy.close()
    publisher.close()


def test_a_message_on_one_node_reaches_sse_on_another(node) -> None:  # noqa: F811
    a, b = node(), node()
    s = Stream(b.port, "/sse/tea")
    s.joined()
    alice = V1(a.port, "alice")
    alice.join("tea")
    ids = say(alice, "tea", "from a", "again")
    got = s.events(2)
    assert [int(e["id"]) for e in got] == ids
    assert [e["data"]["text"] for e in got] == ["from a", "again"]
    s.close()
    missed = say(alice, "tea", "missed")
    r = Stream(b.port, "/sse/tea", {"Last-Event-ID": str(ids[-1])})
    assert r.joined()["data"]["recovered"] is True
    assert [int(e["id"]) for e in r.events(1)] == missed
    r.close()
    alice.close()


def _streams_are_not_members(a: Daemon, b: Daemon, room: str) -> None:
    """Streams on ``a`` and ``b`` (one daemon or two nodes) are listeners: no presence
    of theirs reaches a member, and no member list names them."""
    alice = V1(a.port, "alice")
    alice.join(room)
    streams = [Stream(b.port, f"/sse/{room}"), Stream(a.port, f"/sse/{room}")]
    for s in streams:
        s.joined()
    bob = V1(a.port, "bob")
    assert sorted(bob.join(room)["members"]) == ["alice", "bob"]
    p = alice.next("presence")
    assert (p["nick"], p["event"]) == ("bob", "join")
    for s in streams:
        s.close()
    carol = V1(b.port, "carol")  # the next presence alice sees is carol's: no stream's leave
    carol.join(room)
    p = alice.next("presence")
    assert (p["nick"], p["event"]) == ("carol", "join")
    for c in (alice, bob, carol):
        c.close()


def test_a_stream_is_a_listener_not_a_member(chatd: Daemon) -> None:
    _streams_are_not_members(chatd, chatd, "quiet")


def test_a_stream_is_a_listener_not_a_member_on_a_cluster(node) -> None:  # noqa: F811
    _streams_are_not_members(node(), node(), "quiet")


if __name__ == "__main__":
    pytest.main([__file__])


def test_a_stream_ends_when_its_token_expires() -> None:
    """SSE cannot refresh a token: the stream ends (an ``expired`` event) at exp + grace."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from chatd.auth import EXPIRY_GRACE

    site = Site("--auth", "token", "--jwt-key", SECRET)
    sse = site.site.resource.extra[b"sse"]
    clock = Clock()
    sse.clock = clock
    t = connect(site.site)
    ask = f"GET /sse/@alice?token={token(exp=time.time() + 10)} HTTP/1.1\r\nHost: x\r\n\r\n"
    t.protocol.dataReceived(ask.encode())
    assert turn(lambda: b"event: joined" in t.value(), turns=50), t.value()
    clock.advance(EXPIRY_GRACE + 5)
    assert b"event: expired" not in t.value()
    clock.advance(6)
    assert b"event: expired" in t.value() and t.value().endswith(b"0\r\n\r\n")  # ended
    assert not sse.streams
    t.protocol.connectionLost(Failure(ConnectionDone()))


def test_streams_count_toward_the_per_address_cap(daemon) -> None:
    """--max-connections-per-ip holds for SSE as for any connection: checked at accept."""
    d: Daemon = daemon("--ping-interval", "0", "--max-connections-per-ip", "2")
    first, second = Stream(d.port, "/sse/capped"), Stream(d.port, "/sse/capped")
    first.joined(), second.joined()
    with pytest.raises((EOFError, ConnectionError)):
        Stream(d.port, "/sse/capped")  # dropped at accept: no answer at all
    first.close()
    deadline = time.monotonic() + 10
    while True:  # once the daemon has seen the first one go, a new one is let in
        try:
            third = Stream(d.port, "/sse/capped")
            break
        except (EOFError, ConnectionError):
            assert time.monotonic() < deadline, "the cap was not given back"
            time.sleep(0.05)
    third.joined()
    third.close()
    second.close()


@pytest.mark.browser
def test_a_browser_eventsource_gets_messages_and_resumes(browser, chatd: Daemon) -> None:
    """docs/SSE.md's example, in Chromium: onmessage gets each message with its id; a
    new EventSource after a gap, with the id it last saw, gets what it missed."""
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    pg.goto(f"http://127.0.0.1:{chatd.port}/plain.html")
    open_source = """(url) => {
        window.got = []; window.joined = null;
        window.es = new EventSource(url);
        es.addEventListener("joined", (e) => { window.joined = JSON.parse(e.data); });
        es.onmessage = (e) => { window.got.push([e.lastEventId, JSON.parse(e.data).text]); };
    }"""
    pg.evaluate(open_source, "/sse/browser")
    pg.wait_for_function("window.joined !== null", timeout=30_000)
    alice = V1(chatd.port, "alice")
    alice.join("browser")
    ids = say(alice, "browser", "one", "two")
    pg.wait_for_function("window.got.length >= 2", timeout=30_000)
    assert pg.evaluate("window.got") == [[str(ids[0]), "one"], [str(ids[1]), "two"]]
    pg.evaluate("window.es.close()")
    missed = say(alice, "browser", "three")
    pg.evaluate(open_source, f"/sse/browser?since={ids[1]}")
    pg.wait_for_function("window.got.length >= 1", timeout=30_000)
    assert pg.evaluate("window.joined.recovered") is True
    assert pg.evaluate("window.got") == [[str(missed[0]), "three"]]
    pg.evaluate("window.es.close()")
    context.close()
    alice.close()
