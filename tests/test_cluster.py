"""Several real chatd nodes sharing one real redis-server (``--redis``).

Every node is ``twistd -n chatd`` on an ephemeral loopback port; Redis is
Debian's redis-server on another, with its append-only file on. Faults are
real too: Redis stopped and started again, a pub/sub connection killed with
CLIENT KILL, a node killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import jwt
import pytest
from test_ops import TOKEN, request
from v1client import V1
from wsclient import BINARY, TEXT, Client, frame

from chatd import limits
from tools.daemon import Daemon, child_env, twistd
from tools.redis import RedisServer

TTL = "2"  # seconds before a silent node's members are removed

pytestmark = pytest.mark.skipif(
    not shutil.which("redis-server"), reason="redis-server missing: `make test` installs it"
)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


@pytest.fixture
def node(redis: RedisServer) -> Iterator[Callable[..., Daemon]]:
    """Start cluster nodes on ``redis``; each is stopped (by pid) after the test."""
    started: list[Daemon] = []

    def start(*args: str, url: str | None = None, wait: bool = True) -> Daemon:
        d = Daemon("--redis", url or redis.url, "--ping-interval", "0", "--cluster-ttl", TTL, *args)
        started.append(d)
        if wait:
            d.wait_for_log(r"redis redis://\S+ connected", 30)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        assert "Unhandled" not in d.log(), d.log()
        assert "Traceback" not in d.log(), d.log()


def messages(c: V1, n: int) -> list[dict]:
    """The next ``n`` chat messages (presence frames skipped)."""
    out = []
    while len(out) < n:
        obj = c.next()
        if obj["type"] == "message":
            out.append(obj)
    return out


def next_presence(c: V1, timeout: float = 10.0) -> dict:
    c.sock.settimeout(timeout)
    while True:
        obj = c.next()
        if obj["type"] == "presence":
            return obj


def healthz(d: Daemon) -> tuple[int, dict]:
    status, _, body = request(d.port, "GET", "/healthz")
    return status, json.loads(body)


def metric(d: Daemon, name: str) -> float:
    _, _, body = request(d.port, "GET", "/metrics")
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    assert m, name
    return float(m.group(1))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` (bounded); returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def wait_relay_subscribed(redis: RedisServer, room: str, nodes: int) -> None:
    """Wait (bounded) until ``nodes`` nodes have subscribed to the relay room's channel:
    a node's subscription is confirmed asynchronously, after its client's handshake."""

    def subscribers() -> int:
        return int(redis.command("PUBSUB", "NUMSUB", f"chatd:r:{{{room}}}").split()[-1])

    wait_until(lambda: subscribers() >= nodes, 30, f"{nodes} nodes subscribed to relay {room}")


# -- chat across nodes -------------------------------------------------------


def test_three_nodes_one_order_ids_cluster_wide(node) -> None:
    nodes = [node(), node(), node()]
    clients = [V1(d.port, f"n{i}") for i, d in enumerate(nodes)]
    for c in clients:
        c.join("room")
    per_sender = 40

    def talk(c: V1, i: int) -> None:
        for k in range(per_sender):
            c.say("room", f"{i}:{k}")

    threads = [threading.Thread(target=talk, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a sender is stuck"
    total = per_sender * len(clients)
    seen = [[(m["id"], m["text"]) for m in messages(c, total)] for c in clients]
    # Every node delivered every message once, in the same order, ids 1..N.
    assert seen[0] == seen[1] == seen[2]
    assert [i for i, _ in seen[0]] == list(range(1, total + 1))
    for i in range(len(clients)):  # each sender's messages in the order it sent them
        mine = [t for _, t in seen[0] if t.startswith(f"{i}:")]
        assert mine == [f"{i}:{k}" for k in range(per_sender)]


def test_presence_members_and_nicks_span_nodes(node) -> None:
    a, b = node(), node()
    ann = V1(a.port, "ann")
    assert ann.join("hall")["members"] == ["ann"]
    bob = V1(b.port, "bob")
    joined = bob.join("hall")
    assert sorted(joined["members"]) == ["ann", "bob"]
    assert next_presence(ann) == {
        "type": "presence",
        "room": "hall",
        "nick": "bob",
        "event": "join",
    }
    # A nick is unique in a room across the cluster, case-insensitively, and
    # by limits.nick_key: fullwidth letters, look-alikes.
    for look_alike in ("\uff42\uff4f\uff42", "b0b"):
        spoof = V1(a.port, look_alike)
        spoof.req("join", room="hall")
        assert spoof.next("error")["code"] == "nick_taken", look_alike
        spoof.close()
    other = V1(a.port, "BOB")
    other.req("join", room="hall")
    assert other.next("error")["code"] == "nick_taken"
    bob.req("leave", room="hall")
    assert bob.next("left")["room"] == "hall"
    assert next_presence(ann)["event"] == "leave"
    # Once bob left, the nick is free again, on any node.
    assert sorted(other.join("hall")["members"]) == ["BOB", "ann"]
    # A node stopping cleanly takes its members out at once.
    b.stop()
    carl = V1(a.port, "carl")
    assert sorted(carl.join("hall")["members"]) == ["BOB", "ann", "carl"]


def test_presence_join_reaches_members_on_the_joiners_own_node(node) -> None:
    """bob (node a) sees alice join through node a, as carol (node b) does; alice never
    gets her own join. In both orders of the join script's reply and its marker on the
    channel: a small reply usually comes first; a long history (750 KiB) holds the reply
    back behind the marker."""
    from test_output import read_history

    fast = ("--rate", "10000", "--rate-burst", "10000")
    a, b = node(*fast), node(*fast)
    for room, backlog in (("short", 0), ("long", limits.JOIN_HISTORY)):
        bob = V1(a.port, "bob")
        bob.join(room)
        carol = V1(b.port, "carol")
        carol.join(room)
        assert next_presence(bob)["nick"] == "carol"
        for i in range(backlog):
            carol.say(room, f"{i:04d} " + "x" * 15_000)
            carol.next("message")
        assert len(messages(bob, backlog)) == backlog
        alice = V1(a.port, "alice")
        alice.req("join", room=room)
        joined = alice.next("joined")
        assert len(read_history(alice, joined)[0]) == backlog
        alice.say(room, "hi", ref=room)  # whatever presence there is comes before it
        for c in (alice, bob, carol):
            got = frames_until(
                c, lambda f, ref=room: f["type"] == "message" and f.get("ref") == ref
            )
            presence = [(f["nick"], f["event"]) for f in got if f["type"] == "presence"]
            assert presence == ([] if c is alice else [("alice", "join")]), (room, got)
        for c in (alice, bob, carol):
            c.close()


def test_send_then_leave_in_one_write_is_still_acknowledged(node) -> None:
    """send and leave in one TCP segment: the post is still in Redis when the leave takes
    effect; the sender gets its message (the acknowledgement) anyway, once, after
    ``left``. Every member on either node gets the message."""
    a, b = node(), node()
    alice, bob = V1(a.port, "alice"), V1(a.port, "bob")
    carol = V1(b.port, "carol")
    for c in (bob, carol, alice):
        c.join("bye")
    for c in (bob, carol):
        wait_presence = frames_until(c, lambda f: f.get("nick") == "alice")
        assert wait_presence[-1]["event"] == "join"
    alice.sock.sendall(
        frame(TEXT, json.dumps({"type": "send", "room": "bye", "text": "bye", "ref": 1}).encode())
        + frame(TEXT, json.dumps({"type": "leave", "room": "bye", "ref": 2}).encode())
    )
    got = frames_until(alice, lambda f: f["type"] == "message")
    assert [(f["type"], f.get("ref")) for f in got] == [("left", 2), ("message", 1)]
    assert (got[-1]["from"], got[-1]["text"], got[-1]["room"]) == ("alice", "bye", "bye")
    alice.req("hello", nick="again", ref=3)  # no second copy before this answer
    assert [f["type"] for f in frames_until(alice, lambda f: f["type"] == "error")] == ["error"]
    for c in (bob, carol):
        m = frames_until(c, lambda f: f["type"] == "message")[-1]
        assert (m["id"], m["text"], m["ref"]) == (got[-1]["id"], "bye", 1)
    for c in (alice, bob, carol):
        c.close()


def test_since_recovery_on_another_node(node) -> None:
    a, b, c = node(), node(), node()
    reader = V1(a.port, "reader")
    reader.join("news")
    writer = V1(b.port, "writer")
    writer.join("news")
    for k in range(5):
        writer.say("news", f"before {k}")
    got = messages(reader, 5)
    last = got[-1]["id"]
    reader.close()
    for k in range(7):
        writer.say("news", f"missed {k}")
    messages(writer, 12)  # all stored and published
    back = V1(c.port, "reader")  # reconnects to another node
    joined = back.join("news", since=last)
    assert [m["text"] for m in joined["history"]] == [f"missed {k}" for k in range(7)]
    assert joined["last_id"] == last + 7 and "truncated" not in joined
    writer.say("news", "live")
    assert messages(back, 1)[0]["id"] == last + 8


def test_history_retention_in_redis_and_truncated(node, redis) -> None:
    a = node("--history-size", "5", "--join-history", "3")
    c = V1(a.port, "ann")
    c.join("r")
    for k in range(8):
        c.say("r", f"m{k}")
    messages(c, 8)
    d = V1(a.port, "bob")
    j = d.join("r")
    assert [m["text"] for m in j["history"]] == ["m5", "m6", "m7"]
    j = d.join("r", since=1)
    assert [m["id"] for m in j["history"]] == [4, 5, 6, 7, 8] and j["truncated"] is True
    assert redis.command("XLEN", "chatd:c:{r}:log") == b"5"


def test_relay_across_nodes_byte_exact(node, redis) -> None:
    a, b = node(), node()
    x = Client(a.port, "/relay/game")
    y = Client(b.port, "/relay/game")
    wait_relay_subscribed(redis, "game", 2)
    blob = bytes(range(256)) * 40
    x.send_frame(BINARY, blob)
    assert y.recv_message() == (BINARY, blob)
    assert x.recv_message() == (BINARY, blob)  # the sender's node: once, not twice
    y.send_frame(TEXT, "ünï ✓".encode())
    assert x.recv_message() == (TEXT, "ünï ✓".encode())
    assert y.recv_message() == (TEXT, "ünï ✓".encode())
    x.send_frame(TEXT, b"again")
    assert y.recv_message() == (TEXT, b"again")


def test_push_api_on_one_node_reaches_another(node, redis) -> None:
    a = node("--api-token", TOKEN)
    b = node()
    v = V1(b.port, "vera")
    v.join("lobby")
    p = Client(b.port, "/")  # the seed's plain chat, in lobby
    p.send("here")  # its own line back: p is in the room now
    assert p.recv() == f"ID{p.local_port}: here"
    assert messages(v, 1)[0]["text"] == "here"
    relay = Client(b.port, "/relay/quotes")
    wait_relay_subscribed(redis, "quotes", 1)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, _, body = request(
        a.port,
        "POST",
        "/api/rooms/lobby/messages",
        json.dumps({"text": "hi", "from": "ci"}).encode(),
        auth,
    )
    assert status == 201, body
    msg = messages(v, 1)[0]
    assert (msg["from"], msg["text"], msg["id"]) == ("ci", "hi", json.loads(body)["id"])
    assert p.recv() == "ci: hi"
    bin_headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    status, _, _ = request(a.port, "POST", "/api/relay/quotes/messages", b"\x00\xffq", bin_headers)
    assert status == 200
    assert relay.recv_message() == (BINARY, b"\x00\xffq")


def test_plain_lobby_bridges_across_nodes(node) -> None:
    a, b = node(), node()
    v = V1(a.port, "vera")
    v.join("lobby")
    p = Client(b.port, "/")
    pid = f"ID{p.local_port}"
    assert next_presence(v)["nick"] == pid
    p.send("from plain")
    assert p.recv() == f"{pid}: from plain"
    m = messages(v, 1)[0]
    assert (m["from"], m["text"]) == (pid, "from plain")
    v.say("lobby", "from v1")
    assert p.recv() == "vera: from v1"


# -- faults --------------------------------------------------------------------


def ann_and_bob(a: Daemon, b: Daemon) -> tuple[V1, V1]:
    """ann on node a and bob on node b, both in room r; ann has seen bob join."""
    ann = V1(a.port, "ann")
    ann.join("r")
    bob = V1(b.port, "bob")
    bob.join("r")
    assert next_presence(ann)["nick"] == "bob"
    return ann, bob


def test_redis_down_then_back(node, redis) -> None:
    a, b = node(), node()
    ann, bob = ann_and_bob(a, b)
    x, y = Client(a.port, "/relay/local"), Client(a.port, "/relay/local")
    ann.say("r", "before", ref=1)
    assert messages(ann, 1)[0]["id"] == 1 and messages(bob, 1)[0]["id"] == 1

    redis.stop()
    wait_until(lambda: healthz(a)[0] == 503, 30, "node a degraded")
    _, body = healthz(a)
    assert body["status"] == "degraded" and "redis" in body["problems"]
    assert metric(a, "chatd_redis_up") == 0
    # Chat sends are refused, not accepted and lost; the connection stays.
    ann.say("r", "during", ref=2)
    err = ann.next("error")
    assert (err["code"], err["ref"]) == ("unavailable", 2)
    late = V1(a.port, "late")
    late.req("join", room="r")
    assert late.next("error")["code"] == "unavailable"
    # Relay rooms keep working on the node.
    x.send_frame(TEXT, b"still here")
    assert y.recv_message() == (TEXT, b"still here")

    started = time.monotonic()
    redis.start()
    took = wait_until(lambda: healthz(a)[0] == 200 and healthz(b)[0] == 200, 30, "back")
    assert took < 10, took  # the backoff is at most 2 s (slack for a loaded machine)
    assert metric(a, "chatd_redis_up") == 1
    assert metric(a, "chatd_redis_reconnects_total") >= 1
    # Resumed by itself: same members, ids go on (Redis kept its data).
    bob.say("r", "after")
    assert [m["id"] for m in messages(ann, 1)] == [2]
    assert [m["id"] for m in messages(bob, 1)] == [2]
    late.join("r")
    assert time.monotonic() - started < 45


def frames_until(c: V1, done: Callable[[dict], bool], timeout: float = 30.0) -> list[dict]:
    """Every frame up to and including the first for which ``done`` is true."""
    c.sock.settimeout(timeout)
    out: list[dict] = []
    while not out or not done(out[-1]):
        try:
            out.append(c.next())
        except TimeoutError:
            raise AssertionError(f"silence after {out}") from None
    return out


def send_answered(c: V1, text: str, ref: str) -> list[dict]:
    """Send; the frames up to its answer (its message or an error), which must come.

    (A message published before the node's channel is subscribed again is
    read back from the stream, which keeps no refs: it is matched by text.)
    """
    c.say("r", text, ref=ref)
    frames = frames_until(
        c,
        lambda f: (
            (f["type"] == "error" and f.get("ref") == ref)
            or (f["type"] == "message" and f["text"] == text)
        ),
    )
    assert frames[-1]["type"] == "message", frames[-1]
    return frames


def test_redis_loses_its_data_new_epoch_no_reused_ids_no_silence(node) -> None:
    with RedisServer(persist=False) as volatile:  # restarts empty
        a, b = node(url=volatile.url), node(url=volatile.url)
        ann, bob = ann_and_bob(a, b)
        for k in range(3):
            ann.say("r", f"old {k}")
        assert [m["id"] for m in messages(ann, 3)] == [m["id"] for m in messages(bob, 3)]
        carl = V1(a.port, "carl")
        before = carl.join("r")
        old_epoch = before["epoch"]
        assert isinstance(old_epoch, str) and len(old_epoch) >= 11
        assert before["last_id"] == 3 and "reset" not in before
        assert volatile.command("GET", "chatd:c:{r}:epoch").decode() == old_epoch

        volatile.stop()
        wait_until(lambda: healthz(a)[0] == 503 and healthz(b)[0] == 503, 30, "degraded")
        ann.say("r", "during", ref="d")  # answered while Redis is down too
        assert frames_until(ann, lambda f: f.get("ref") == "d")[-1]["code"] == "unavailable"
        volatile.start()  # same port, no data
        assert volatile.command("EXISTS", "chatd:c:{r}:seq") == b"0"
        wait_until(lambda: healthz(a)[0] == 200 and healthz(b)[0] == 200, 30, "back")

        # A send on each node is answered, and members on both nodes get the
        # reset first, then the new epoch's messages, in order.
        seen_a = send_answered(ann, "new a", "a1")
        seen_b = send_answered(bob, "new b", "b1")
        for k in range(3):
            seen_a += send_answered(ann, f"more {k}", f"m{k}")
        texts = ["new a", "new b", "more 0", "more 1", "more 2"]
        seen_b += frames_until(bob, lambda f: f.get("text") == "more 2")
        for seen in (seen_a, seen_b):
            events = [f for f in seen if f["type"] in ("reset", "message")]
            reset, msgs = events[0], events[1:]
            assert reset["type"] == "reset" and reset["room"] == "r", events
            assert reset["epoch"] != old_epoch and reset["last_id"] == 0
            assert [(m["id"], m["text"]) for m in msgs] == list(enumerate(texts, 1))
        new_epoch = reset["epoch"]
        assert volatile.command("GET", "chatd:c:{r}:epoch").decode() == new_epoch

        # A fresh join shows the new epoch; one that names the old epoch with
        # its old 'since' gets the new history marked as reset, never ids 4..5
        # presented as what followed the old 3.
        dave = V1(b.port, "dave")
        fresh = dave.join("r")
        assert fresh["epoch"] == new_epoch and fresh["last_id"] == 5 and "reset" not in fresh
        back = V1(a.port, "eve")
        stale = back.join("r", since=3, epoch=old_epoch)
        assert stale["reset"] is True and stale["epoch"] == new_epoch
        assert [m["text"] for m in stale["history"]] == texts and "truncated" not in stale
        back.req("join", room="r", since=3, epoch=new_epoch)  # the right epoch: 'since' counts
        same = frames_until(back, lambda f: f["type"] == "joined")[-1]
        assert [m["id"] for m in same["history"]] == [4, 5] and "reset" not in same

        # Data lost under a live pub/sub connection (FLUSHALL) is met the same way.
        assert volatile.command("FLUSHALL") == b"OK"
        seen = send_answered(bob, "after flush", "f1")
        events = [f for f in seen if f["type"] in ("reset", "message")]
        assert events[0]["type"] == "reset" and events[0]["epoch"] not in (old_epoch, new_epoch)
        assert [(m["id"], m["text"]) for m in events[1:]] == [(1, "after flush")]
        seen = frames_until(ann, lambda f: f.get("text") == "after flush")
        assert [f["type"] for f in seen if f["type"] in ("reset", "message")] == [
            "reset",
            "message",
        ]


def test_epoch_for_rooms_from_before_epochs_and_for_a_lost_counter(node, redis) -> None:
    a = node()
    ann = V1(a.port, "ann")
    ann.join("old")
    for k in range(3):
        ann.say("old", f"m{k}")
    messages(ann, 3)
    ann.close()  # the room is empty again: node a forgets it
    wait_until(lambda: redis.command("HLEN", "chatd:c:{old}:m") == b"0", 30, "ann left")
    assert redis.command("DEL", "chatd:c:{old}:epoch") == b"1"  # as a Redis from before epochs
    bob = V1(a.port, "bob")
    joined = bob.join("old", since=1, epoch="from-another-time")
    epoch = joined["epoch"]  # given on first use; ids and history go on
    assert epoch and joined["reset"] is True and joined["last_id"] == 3
    assert [m["text"] for m in joined["history"]] == ["m0", "m1", "m2"]
    bob.say("old", "m3")
    assert messages(bob, 1)[0]["id"] == 4
    assert redis.command("GET", "chatd:c:{old}:epoch").decode() == epoch
    # The counter gone with the epoch still there: id 1 again, so a new epoch.
    assert redis.command("DEL", "chatd:c:{old}:seq", "chatd:c:{old}:log") == b"2"
    bob.say("old", "again")
    reset = bob.next("reset")
    assert reset["epoch"] != epoch and reset["last_id"] == 0
    assert [(m["id"], m["text"]) for m in messages(bob, 1)] == [(1, "again")]
    assert redis.command("GET", "chatd:c:{old}:epoch").decode() == reset["epoch"]


def test_a_new_epoch_met_while_reading_back_a_gap(node, redis) -> None:
    a, b = node(), node()
    ann, bob = ann_and_bob(a, b)
    for k in range(3):
        ann.say("r", f"old {k}")
    messages(bob, 3)
    assert redis.command("FLUSHALL") == b"OK"  # the room's data is gone...
    node_b = re.search(r"cluster node (\w+)", b.log())
    assert node_b
    (victim,) = [c for c in redis.clients() if c.get("name") == f"chatd:{node_b[1]}:sub"]
    assert redis.command("CLIENT", "KILL", "ID", victim["id"]) == b"1"  # ...and b's channel
    texts = [f"new {k}" for k in range(20)]
    for t in texts:  # some while b's channel is down: b reads them from the new stream
        send_answered(ann, t, t)
    seen = frames_until(bob, lambda f: f.get("text") == texts[-1], timeout=30)
    events = [f for f in seen if f["type"] in ("reset", "message")]
    assert events[0]["type"] == "reset" and events[0]["last_id"] == 0, events
    assert [(m["id"], m["text"]) for m in events[1:]] == list(enumerate(texts, 1))
    assert metric(b, 'chatd_cluster_events_total{kind="reset"}') == 1
    assert metric(b, 'chatd_cluster_events_total{kind="gap"}') >= 1  # read back: the gap's way


def test_pubsub_connection_lost_messages_are_read_back(node, redis) -> None:
    a = node()
    b = node("--api-token", TOKEN)
    ann = V1(a.port, "ann")
    ann.join("r")
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def post(text: str) -> int:
        status, _, body = request(
            b.port, "POST", "/api/rooms/r/messages", json.dumps({"text": text}).encode(), auth
        )
        assert status == 201, body
        return json.loads(body)["id"]

    post("first")
    assert messages(ann, 1)[0]["text"] == "first"
    node_id = re.search(r"cluster node (\w+)", a.log())
    assert node_id
    (victim,) = [c for c in redis.clients() if c.get("name") == f"chatd:{node_id[1]}:sub"]
    assert redis.command("CLIENT", "KILL", "ID", victim["id"]) == b"1"
    ids = [post(f"gap {k}") for k in range(20)]  # some while a's channel is down
    got = messages(ann, 20)
    assert [m["id"] for m in got] == ids  # none lost, none twice, in order
    _, _, body = request(a.port, "GET", "/metrics")
    gap = re.search(r'^chatd_cluster_events_total\{kind="gap"\} (\S+)$', body.decode(), re.M)
    assert gap and float(gap[1]) >= 1  # some were read back from the stream
    post("last")
    assert messages(ann, 1)[0]["text"] == "last"


def test_node_killed_members_expire_and_acknowledged_messages_survive(node) -> None:
    a, b = node(), node()
    ann, bob = ann_and_bob(a, b)
    for k in range(10):
        bob.say("r", f"acked {k}")
    acked = [m["id"] for m in messages(bob, 10)]  # bob saw them come back: acknowledged
    b.stop(signal.SIGKILL)
    killed = time.monotonic()
    left = next_presence(ann, timeout=float(TTL) * 3 + 5)
    took = time.monotonic() - killed
    assert (left["nick"], left["event"]) == ("bob", "leave")
    assert took <= float(TTL) * 2 + 1, took
    back = V1(a.port, "bob")  # the nick is free again
    joined = back.join("r", since=0)
    assert [m["id"] for m in joined["history"]] == acked
    assert sorted(joined["members"]) == ["ann", "bob"]


def test_node_starts_without_redis_and_joins_when_it_appears(node, redis) -> None:
    port = redis.port
    redis.stop()
    a = node(url=f"redis://127.0.0.1:{port}/0", wait=False)
    status, body = healthz(a)
    assert status == 503 and body["status"] == "degraded"
    c = V1(a.port, "ann")
    c.req("join", room="r")
    assert c.next("error")["code"] == "unavailable"
    redis.start()
    wait_until(lambda: healthz(a)[0] == 200, 30, "node up")
    assert c.join("r")["members"] == ["ann"]


def test_bad_redis_url_is_refused_before_binding(tmp_path) -> None:
    out = subprocess.run(
        [twistd(), "-n", "--pidfile=", "chatd", "--port", "0", "--redis", "http://x"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode != 0
    assert "redis must be a redis://host[:port][/db] URL" in out.stdout + out.stderr


def test_node_given_up_for_dead_comes_back_and_writes_its_members_back(node) -> None:
    a, b = node(), node()
    ann, bob = ann_and_bob(a, b)
    os.kill(b.pid, signal.SIGSTOP)  # our own child: frozen, its sockets stay open
    try:
        left = next_presence(ann, timeout=float(TTL) * 3 + 5)
        assert (left["nick"], left["event"]) == ("bob", "leave")
    finally:
        os.kill(b.pid, signal.SIGCONT)
    back = next_presence(ann, timeout=30)
    assert (back["nick"], back["event"]) == ("bob", "join")
    b.wait_for_log("given up for dead; re-registering", 30)
    bob.say("r", "still here")
    assert messages(ann, 1)[0]["text"] == "still here"
    carl = V1(a.port, "carl")
    assert sorted(carl.join("r")["members"]) == ["ann", "bob", "carl"]


@pytest.mark.browser
def test_the_page_on_two_nodes(node, browser) -> None:
    from test_browser_chat import Person

    a, b = node(), node()
    alice, bob = Person(browser, a.port), Person(browser, b.port)
    try:
        alice.join("alice", "tea")
        bob.join("bob", "tea")
        # Each page sees what it asserts only once it came back through Redis: wait for it.
        alice.wait_members(["alice", "bob"])
        bob.wait_members(["alice", "bob"])
        alice.say("hello from node a")
        bob.wait_text("hello from node a")
        bob.say("hello from node b")
        both = ["hello from node a", "hello from node b"]
        alice.wait_texts(both)
        bob.wait_texts(both)  # Bob's own copy too, not just Alice's
    finally:
        alice.close()
        bob.close()


def test_big_history_in_pages_across_nodes(node) -> None:
    """2 MiB of history from Redis reaches a reader on another node in 64 KiB pages,
    then the live stream: no gap, no duplicate."""
    from test_output import PAGE, read_history

    fast = ("--rate", "10000", "--rate-burst", "10000")
    a, b = node(*fast), node(*fast)
    n = 200
    w = V1(a.port, "writer")
    w.join("big")
    for i in range(n):
        w.say("big", f"{i:06d} " + "x" * 10_000)
        w.next("message")
    r = V1(b.port, "reader", rcvbuf=4096)
    r.req("join", room="big", since=0)
    _, payload = r.recv_message()
    joined = json.loads(payload)
    assert joined["type"] == "joined" and joined["more"] is True and len(payload) <= PAGE
    assert next_presence(w)["nick"] == "reader"
    w.say("big", "during")  # while the reader catches up: once, after the last page
    msgs, sizes = read_history(r, joined)
    assert [m["id"] for m in msgs] == list(range(1, n + 1))
    assert max(sizes[1:]) <= PAGE
    live = r.next("message")
    assert live["id"] == n + 1 and live["text"] == "during"
    r.close()
    w.close()


def test_replay_trimmed_under_a_slow_reader_is_never_a_silent_gap(node) -> None:
    """Redis trims the stream while a reader is still paging through it: the reader gets
    every message up to last_id, or is dropped (and resumes with since); never a gap."""
    from test_output import read_history
    from wsclient import Closed

    fast = ("--rate", "10000", "--rate-burst", "10000", "--history-size", "300")
    a = node(*fast)
    w = V1(a.port, "writer")
    w.join("trim")
    for i in range(300):  # 4.5 MiB: more than the kernel's buffers take
        w.say("trim", f"{i:06d} " + "x" * 15_000)
        w.next("message")
    r = V1(a.port, "reader", rcvbuf=4096)
    r.req("join", room="trim", since=0)
    _, payload = r.recv_message()  # joined; the pages wait for the reader
    joined = json.loads(payload)
    assert next_presence(w)["nick"] == "reader"
    for i in range(400):  # the stream keeps its last 300: all of the replay goes
        w.say("trim", f"later {i}")
        w.next("message")
    msgs: list[dict] = []
    try:
        read_history(r, joined, msgs)
    except (Closed, OSError) as e:
        print(f"dropped mid-replay after {len(msgs)} messages: {e!r}")
        assert [m["id"] for m in msgs] == list(range(1, len(msgs) + 1))
        a.wait_for_log(r"close v1 .* code=1006", 30)
    else:
        print(f"all {len(msgs)} read before the trim reached them")
        assert [m["id"] for m in msgs] == list(range(1, 301))
        assert [r.next("message")["id"] for _ in range(400)] == list(range(301, 701))
    w.close()


JWT_KEY = "a-secret-of-at-least-32-bytes-for-the-cluster"


def signed_in(d: Daemon, sub: str, room: str | None = None) -> V1:
    """A chatd.v1 client of ``d`` with a token for ``sub`` (rw in lobby), in ``room`` if given."""
    c = V1(d.port)
    claims = {"sub": sub, "exp": time.time() + 600, "rooms": {"lobby": "rw"}}
    c.req("hello", token=jwt.encode(claims, JWT_KEY, algorithm="HS256"))
    c.next("welcome")
    if room is not None:
        c.join(room)
    return c


def test_personal_rooms_members_and_closing_a_user_span_the_nodes(node) -> None:
    args = ("--auth", "token", "--jwt-key", JWT_KEY, "--api-token", "an-api-token-for-the-back-end")
    a, b = node(*args), node(*args)
    on_a, on_b, bob = (
        signed_in(d, sub, "lobby") for d, sub in ((a, "alice"), (b, "alice"), (b, "bob"))
    )
    # A notification posted on one node reaches the user's personal room on another.
    on_a.req("join", room="@alice")
    while on_a.next()["type"] != "joined":  # (the others' presence in lobby may come first)
        pass
    push = urllib.request.Request(
        f"http://127.0.0.1:{b.port}/api/users/alice/messages",
        data=json.dumps({"text": "from node b", "from": "shop"}).encode(),
        headers={
            "Authorization": "Bearer an-api-token-for-the-back-end",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(push, timeout=30) as r:
        assert r.status == 201
    while (m := on_a.next())["type"] != "message":
        assert m["type"] == "presence"
    assert (m["room"], m["text"]) == ("@alice", "from node b")
    req = urllib.request.Request(
        f"http://127.0.0.1:{a.port}/api/rooms/lobby/members",
        headers={"Authorization": "Bearer an-api-token-for-the-back-end"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:  # every node's members, from Redis
        assert sorted(json.loads(r.read())["members"]) == ["alice", "bob"]  # a user once
    req = urllib.request.Request(
        f"http://127.0.0.1:{a.port}/api/users/alice/connections",
        method="DELETE",
        headers={"Authorization": "Bearer an-api-token-for-the-back-end"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202
    assert on_a.expect_close() == 4003
    assert on_b.expect_close() == 4003  # on the other node too
    bob.say("lobby", "still here")
    while (m := bob.next())["type"] != "message":
        assert m["type"] == "presence"
    assert m["text"] == "still here"


def test_a_user_switching_nodes_within_the_debounce_never_leaves(node, redis) -> None:
    """Presence per user across nodes: a phone whose connection drops on node a and
    comes back on node b within --presence-debounce shows no leave and no join; its
    leave, when it goes for good, is said once (docs/PROTOCOL.md, presence)."""
    args = ("--auth", "token", "--jwt-key", JWT_KEY, "--presence-debounce", "1")
    a, b = node(*args), node(*args)
    bob = signed_in(b, "bob", "lobby")
    phone = signed_in(a, "alice", "lobby")
    joined = bob.next("presence")
    assert (joined["event"], joined["user"], joined["nick"]) == ("join", "alice", "alice")

    def held() -> list[bytes]:
        return redis.command("HKEYS", "chatd:c:{lobby}:m").split()

    on_a = node_prefix(a)
    assert any(k.startswith(on_a) for k in held())
    phone.sock.close()  # the network goes away under it
    again = signed_in(b, "alice")
    assert sorted(again.join("lobby")["members"]) == ["alice", "bob"]
    # Node a removes its member id once the debounce is over (polled, bounded).
    deadline = time.monotonic() + 30
    while any(k.startswith(on_a) for k in held()):
        assert time.monotonic() < deadline, held()
        time.sleep(0.05)
    bob.say("lobby", "still here?")
    assert bob.next("message")["text"] == "still here?"  # nothing came before it
    again.close()
    left = bob.next("presence")  # once she is gone for good, after the debounce
    assert (left["event"], left["user"]) == ("leave", "alice")


def node_prefix(d: Daemon) -> bytes:
    """The member id prefix of ``d``'s node, as its log says it (``cluster node <id>``)."""
    m = re.search(r"cluster node (\S+)", d.log())
    assert m, d.log()
    return (m.group(1) + ".").encode()


def test_a_session_resumes_on_another_node(node) -> None:
    """An anonymous phone on node a loses its network and comes back on node b
    with its resume secret: node a closes the old connection (4000) and lets go
    of its nick before node b welcomes it, so it joins its rooms again at once
    under the same nick (without the resume: nick_taken until a ping timeout)."""
    a, b = node(), node()
    phone = V1(a.port)
    phone.req("hello", nick="ann")
    secret = phone.next("welcome")["resume"]
    phone.join("lobby")
    phone.join("tea")
    watcher = V1(b.port)
    watcher.req("hello", nick="bob")
    watcher.next("welcome")
    watcher.join("tea")
    back = V1(b.port)
    back.req("hello", nick="ann", resume=secret, ref=1)
    back.req("join", room="tea", ref=2)  # sent at once: it waits behind the hello
    welcome = back.next("welcome")
    assert (welcome["resumed"], welcome["rooms"], welcome["ref"]) == (True, ["lobby", "tea"], 1)
    joined = back.next("joined")
    assert joined["ref"] == 2 and sorted(joined["members"]) == ["ann", "bob"]
    assert phone.expect_close() == 4000
    again = V1(a.port)  # the secret works once
    again.req("hello", nick="ann2", resume=secret)
    assert again.next("welcome")["resumed"] is False
    # A secret naming a node that is gone gets an answer too (after a bounded wait).
    lost = V1(b.port)
    lost.req("hello", nick="cy", resume="0123456789ab." + "x" * 32)
    assert lost.next("welcome")["resumed"] is False


def test_retries_of_one_cid_on_two_nodes_at_once_are_stored_once(node) -> None:
    """A user's send whose answer was lost is retried, from another tab on another
    node, while the first may still be in flight: one message, the same id for
    both, and the room sees it once."""
    args = ("--auth", "token", "--jwt-key", JWT_KEY)
    a, b = node(*args), node(*args)
    tab_a, tab_b = signed_in(a, "alice", "lobby"), signed_in(b, "alice", "lobby")
    watcher = signed_in(b, "bob", "lobby")
    for i in range(20):  # twenty cids, each sent on both nodes in the same instant
        tab_a.say("lobby", f"m{i}", cid=f"cid-{i}", ref=f"a{i}")
        tab_b.say("lobby", f"m{i}", cid=f"cid-{i}", ref=f"b{i}")
    ids: dict[str, set[int]] = {}
    for tab, mine in ((tab_a, "a"), (tab_b, "b")):
        # Every send is answered once with its ref: the room's copy if it was stored,
        # the stored message itself (to this tab alone) if the other tab's won.
        answered: set[str] = set()
        texts: set[str] = set()
        while len(answered) < 20 or len(texts) < 20:
            m = tab.next()
            if m["type"] != "message":
                continue
            ids.setdefault(m["text"], set()).add(m["id"])
            texts.add(m["text"])
            if m.get("ref", "").startswith(mine):
                assert m["ref"] not in answered
                answered.add(m["ref"])
    assert sorted(ids) == sorted(f"m{i}" for i in range(20))
    assert all(len(v) == 1 for v in ids.values()), ids  # one id per cid, on both nodes
    watcher.say("lobby", "end")
    texts = []
    while (m := watcher.next())["type"] != "message" or m["text"] != "end":
        if m["type"] == "message":
            texts.append(m["text"])
    assert sorted(texts) == sorted(f"m{i}" for i in range(20))  # each once


def test_typing_crosses_nodes_and_skips_the_typers_other_tabs(node) -> None:
    args = ("--auth", "token", "--jwt-key", JWT_KEY)
    a, b = node(*args), node(*args)
    tab_a, tab_b = signed_in(a, "alice", "lobby"), signed_in(b, "alice", "lobby")
    bob = signed_in(b, "bob", "lobby")
    tab_a.req("typing", room="lobby")
    while (m := bob.next())["type"] != "typing":
        assert m["type"] == "presence"
    assert (m["room"], m["user"], m["name"]) == ("lobby", "alice", "alice")
    bob.say("lobby", "hm?")  # alice's other tab got no typing of her own: this comes first
    while (m := tab_b.next())["type"] == "presence":
        pass
    assert (m["type"], m["text"]) == ("message", "hm?")


def test_read_markers_work_across_nodes(node) -> None:
    args = ("--auth", "token", "--jwt-key", JWT_KEY)
    a, b = node(*args), node(*args)
    writer = signed_in(a, "bob", "lobby")
    for i in range(5):
        writer.say("lobby", f"t{i}")
    phone = signed_in(a, "alice", "lobby")
    phone.req("read", room="lobby", id=3)
    while (m := writer.next())["type"] != "read":  # the room is small: bob is told
        pass
    assert (m["user"], m["id"]) == ("alice", 3)
    laptop = signed_in(b, "alice")  # her other device, on the other node
    joined = laptop.join("lobby")
    assert (joined["read"], joined["unread"], joined["last_id"]) == (3, 2, 5)
    laptop.req("read", room="lobby", id=5)
    while (m := phone.next())["type"] != "read" or m["id"] != 5:  # her phone follows
        pass


def next_of(c: V1, type_: str) -> dict:
    """The next frame of ``type_``, past presence and the like (bounded by the socket's timeout)."""
    for _ in range(100):
        if (m := c.next())["type"] == type_:
            return m
    raise AssertionError(f"no {type_} in 100 frames")


def test_edits_deletes_and_reactions_cross_nodes_and_deleted_text_leaves_redis(node, redis) -> None:
    args = ("--auth", "token", "--jwt-key", JWT_KEY, "--api-token", TOKEN)
    a, b = node(*args), node(*args)
    alice, bob = signed_in(a, "alice", "lobby"), signed_in(b, "bob", "lobby")
    alice.say("lobby", "a secret recipe")
    first = next_of(alice, "message")
    assert next_of(bob, "message")["id"] == first["id"]
    bob.req("edit", room="lobby", id=first["id"], text="bob's now", ref=1)  # not his
    assert (next_of(bob, "error")["code"]) == "forbidden"
    alice.req("edit", room="lobby", id=first["id"], text="a shared recipe")
    seen = [next_of(bob, "message")]
    bob.req("react", room="lobby", id=first["id"], emoji="🍰")
    seen.append(next_of(bob, "message"))
    assert [(m["kind"], m["target"], m.get("text"), m.get("emoji")) for m in seen] == [
        ("edit", first["id"], "a shared recipe", None),
        ("react", first["id"], None, "🍰"),
    ]
    assert [next_of(alice, "message")["id"] for _ in range(2)] == [m["id"] for m in seen]
    # The back end edits anything, through either node.
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    path = f"/api/rooms/lobby/messages/{first['id']}"
    status, _, body = request(b.port, "PATCH", path, b'{"text": "the recipe"}', auth)
    assert status == 200 and json.loads(body)["target"] == first["id"], body
    assert next_of(alice, "message")["text"] == next_of(bob, "message")["text"] == "the recipe"
    late = signed_in(b, "carol")  # before the delete: a page as it is now
    late.req("history", room="lobby")
    [now] = next_of(late, "history")["messages"][:1]
    assert (now["text"], now["edited"], now["reactions"]) == ("the recipe", True, {"🍰": ["bob"]})
    alice.req("delete", room="lobby", id=first["id"])
    gone = next_of(bob, "message")
    assert (gone["kind"], gone["target"]) == ("delete", first["id"])
    logs = [k for k in redis.command("KEYS", "*").decode().split() if k.endswith(":log")]
    stored = b"".join(redis.command("DUMP", k) for k in redis.command("KEYS", "*").split())
    stored += b"".join(redis.command("XRANGE", k, "-", "+") for k in logs)
    assert b"recipe" not in stored and b"\xf0\x9f\x8d\xb0" in stored  # (the reaction is kept)
    status, _, body = request(a.port, "DELETE", path, None, auth)
    assert status == 404, body  # deleted already
    replay = late.join("lobby", since=0)["history"]
    assert [m["id"] for m in replay] == list(range(first["id"], gone["id"] + 1))
    assert (replay[0]["deleted"], replay[0]["text"], replay[0]["updated"]) == (
        True,
        "",
        gone["id"],
    )
    assert all(m.get("text", "") == "" for m in replay if m.get("kind") == "edit")
