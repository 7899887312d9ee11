"""chatd.v1: every message type, error and limit.

Against the real daemon (a module-wide one, or one of its own where the process
is the point: a restart, kernel buffers, overload); a test that needs other
options than the shared daemon's and nothing of the process runs on the site
those options make, in process (tests/inproc.py).
"""

from __future__ import annotations

import json
import time

import pytest
from inproc import Site
from test_ops import request
from v1client import V1
from wsclient import TEXT, Client, HandshakeError, frame

from tools.daemon import Daemon


def test_subprotocol_negotiated(chatd: Daemon) -> None:
    c = V1(chatd.port, subprotocols="other, chatd.v1")
    assert "Sec-WebSocket-Protocol: chatd.v1" in c.response_headers
    c.close()


def test_hello_welcome_and_nick_rules(chatd: Daemon) -> None:
    c = V1(chatd.port)
    for bad in ["", "x" * 33, "two words", "<b>", "ID1234", 42, None]:
        c.req("hello", nick=bad)
        err = c.next("error")
        assert err["code"] in ("bad_nick", "bad_field"), err
    c.req("hello", nick="Zoë_李-1.0", ref="r1")
    w = c.next("welcome")
    assert w["nick"] == "Zoë_李-1.0" and isinstance(w["session"], str) and len(w["session"]) >= 16
    assert w["ref"] == "r1"
    c.req("hello", nick="again", ref=7)
    assert c.next("error") == {
        "type": "error",
        "code": "already_hello",
        "message": "already hello as Zoë_李-1.0",
        "ref": 7,
    }
    c.close()


def test_join_presence_send_leave(chatd: Daemon) -> None:
    a = V1(chatd.port, "alice")
    j = a.join("room1")
    assert j == {
        "type": "joined",
        "room": "room1",
        "members": ["alice"],
        "history": [],
        "last_id": 0,
        "epoch": None,  # no message yet
        "read": 0,  # nothing read yet (a read marker: docs/PROTOCOL.md)
        "unread": 0,
    }
    b = V1(chatd.port, "bob")
    j = b.join("room1")
    assert j["members"] == ["alice", "bob"]
    assert a.next("presence") == {
        "type": "presence",
        "room": "room1",
        "nick": "bob",
        "event": "join",
    }
    before = int(time.time() * 1000)
    a.say("room1", "hi bob", ref="m1")
    for c in (a, b):  # the sender gets its own message: its acknowledgement
        m = c.next("message")
        assert m["room"] == "room1" and m["id"] == 1 and m["from"] == "alice"
        assert m["text"] == "hi bob" and m["ref"] == "m1"
        assert before - 1000 <= m["ts"] <= int(time.time() * 1000) + 1000
    b.say("room1", "hi alice")
    assert a.next("message")["id"] == 2
    assert "ref" not in b.next("message")
    b.req("leave", room="room1", ref="bye")
    assert b.next("left") == {"type": "left", "room": "room1", "ref": "bye"}
    assert a.next("presence")["event"] == "leave"
    b.say("room1", "after leaving")
    assert b.next("error")["code"] == "not_joined"
    b.join("room1")
    assert a.next("presence") == {
        "type": "presence",
        "room": "room1",
        "nick": "bob",
        "event": "join",
    }
    b.drop()  # vanishing counts as leaving
    assert a.next("presence") == {
        "type": "presence",
        "room": "room1",
        "nick": "bob",
        "event": "leave",
    }
    a.close()


def test_rooms_are_separate(chatd: Daemon) -> None:
    a, b = V1(chatd.port, "ann"), V1(chatd.port, "ben")
    a.join("sep-1")
    b.join("sep-2")
    a.say("sep-1", "one")
    b.say("sep-2", "two")
    assert a.next("message")["text"] == "one"
    assert b.next("message")["text"] == "two"
    a.close()
    b.close()


def test_nick_unique_within_a_room(chatd: Daemon) -> None:
    a, b = V1(chatd.port, "Carol"), V1(chatd.port, "carol")
    a.join("uniq")
    b.req("join", room="uniq", ref=1)
    assert b.next("error") == {
        "type": "error",
        "code": "nick_taken",
        "message": "carol is already in uniq",
        "ref": 1,
    }
    assert b.join("elsewhere")["members"] == ["carol"]
    witness = V1(chatd.port, "dora")  # sees Carol leave: then (and only then) the nick is free
    witness.join("uniq")
    a.close()
    assert witness.next("presence") == {
        "type": "presence",
        "room": "uniq",
        "nick": "Carol",
        "event": "leave",
    }
    assert sorted(b.join("uniq")["members"]) == ["carol", "dora"]  # free again once Carol left
    witness.close()
    b.close()


def test_history_on_join_and_since() -> None:
    d = Site("--join-history", "3")
    a = d.v1("hist")
    a.join("h")
    for i in range(5):
        a.say("h", f"m{i}")
    for i in range(5):
        assert a.next("message")["text"] == f"m{i}"
    b = d.v1("late")
    j = b.join("h")
    assert [m["text"] for m in j["history"]] == ["m2", "m3", "m4"] and j["last_id"] == 5
    assert [m["id"] for m in j["history"]] == [3, 4, 5]
    c = d.v1("resumer")
    j = c.join("h", since=1)
    assert [m["id"] for m in j["history"]] == [2, 3, 4, 5] and "truncated" not in j
    assert j["history"][0] == {
        "type": "message",
        "room": "h",
        "id": 2,
        "ts": j["history"][0]["ts"],
        "from": "hist",
        "text": "m1",
    }
    for x in (a, b, c):
        x.close()


def test_reconnect_with_since_sees_every_missed_message_once(chatd: Daemon) -> None:
    a, b = V1(chatd.port, "away"), V1(chatd.port, "stays")
    last = a.join("gap")["last_id"]
    b.join("gap")
    a.next("presence")
    b.say("gap", "seen")
    last = a.next("message")["id"]
    a.drop()
    for i in range(3):
        b.say("gap", f"missed {i}")
    a = V1(chatd.port, "away")
    j = a.join("gap", since=last)
    assert [m["text"] for m in j["history"]] == ["missed 0", "missed 1", "missed 2"]
    b.say("gap", "live")
    m = a.next("message")
    assert m["text"] == "live" and m["id"] == j["last_id"] + 1  # no gap, no duplicate
    a.close()
    b.close()


def test_join_in_the_same_turn_as_sends_no_duplicates(chatd: Daemon) -> None:
    """Sends and a join in one TCP segment: history and live stream meet exactly."""
    a = V1(chatd.port, "burst")
    a.join("turn")
    b = V1(chatd.port, "joiner")
    frames = b"".join(
        frame(TEXT, json.dumps({"type": "send", "room": "turn", "text": f"t{i}"}).encode())
        for i in range(5)
    )
    a.sock.sendall(frames)
    b.req("join", room="turn")
    seen: list[int] = []
    j = b.next("joined")
    seen += [m["id"] for m in j["history"]]
    while len(seen) < 5:
        seen.append(b.next("message")["id"])
    assert seen == [1, 2, 3, 4, 5]
    a.close()
    b.close()


def frames_until(c: V1, type_: str) -> list[dict]:
    """Every frame up to and including the first of ``type_``."""
    out = [c.next()]
    while out[-1]["type"] != type_:
        out.append(c.next())
    return out


def test_send_then_leave_in_one_write_is_acknowledged_and_seen_before_the_leave(
    chatd: Daemon,
) -> None:
    """send and leave in one TCP segment: the sender still gets its message (the
    acknowledgement), once, and the others see the message before the sender leaves."""
    bob = V1(chatd.port, "bob")
    bob.join("bye")
    alice = V1(chatd.port, "alice")
    alice.join("bye")
    assert bob.next("presence")["nick"] == "alice"
    alice.sock.sendall(
        frame(TEXT, json.dumps({"type": "send", "room": "bye", "text": "bye", "ref": 1}).encode())
        + frame(TEXT, json.dumps({"type": "leave", "room": "bye", "ref": 2}).encode())
    )
    alice.req("hello", nick="again", ref=3)  # answered after all that went before
    got = [(f["type"], f.get("ref")) for f in frames_until(alice, "error")]
    assert got == [("message", 1), ("left", 2), ("error", 3)]
    got = [(f["type"], f.get("text"), f.get("event")) for f in frames_until(bob, "presence")]
    assert got == [("message", "bye", None), ("presence", None, "leave")]
    alice.close()
    bob.close()


def test_history_survives_a_restart(daemon, tmp_path) -> None:
    d = Daemon(cwd=str(tmp_path))
    a = V1(d.port, "before")
    a.join("keep")
    for i in range(3):
        a.say("keep", f"k{i}")
    for _ in range(3):
        a.next("message")
    a.close()
    d.stop()
    d2 = Daemon(cwd=str(tmp_path))
    try:
        b = V1(d2.port, "after")
        j = b.join("keep", since=0)
        assert [m["text"] for m in j["history"]] == ["k0", "k1", "k2"] and j["last_id"] == 3
        b.say("keep", "k3")
        assert b.next("message")["id"] == 4  # ids go on increasing
        b.close()
    finally:
        d2.stop()


def test_edits_deletes_and_reactions_on_the_daemon_and_after_a_restart(tmp_path) -> None:
    token = "an-api-token-for-the-edit-test"
    d = Daemon("--api-token", token, cwd=str(tmp_path))
    try:
        ann, bob = V1(d.port, "ann"), V1(d.port, "bob")
        ann.join("edits")
        bob.join("edits")
        ann.next("presence")
        ann.say("edits", "draft one")
        ann.say("edits", "keep me")
        first, second = ann.next("message"), ann.next("message")
        bob.next("message"), bob.next("message")
        ann.req("edit", room="edits", id=first["id"], text="final one", ref="e")
        edit = ann.next("message")
        assert (edit["kind"], edit["target"], edit["text"], edit["ref"]) == (
            "edit",
            first["id"],
            "final one",
            "e",
        )
        bob.req("react", room="edits", id=second["id"], emoji="👍")
        bob.req("delete", room="edits", id=second["id"])  # not his
        assert bob.next("message")["kind"] == "edit"
        # (the refusal is answered at once; the reaction once its batch is stored)
        got = sorted((m["type"], m.get("kind") or m.get("code")) for m in (bob.next(), bob.next()))
        assert got == [("error", "forbidden"), ("message", "react")]
        auth = {"Authorization": f"Bearer {token}"}
        path = f"/api/rooms/edits/messages/{first['id']}"
        status, _, body = request(d.port, "DELETE", path, None, auth)
        assert status == 200 and json.loads(body)["target"] == first["id"], body
        gone = bob.next("message")
        assert (gone["kind"], gone["target"], gone["from"]) == ("delete", first["id"], "api")
        for bad, code in [
            ("/api/rooms/edits/messages/99", 404),
            ("/api/rooms/a%20b/messages/1", 400),
        ]:
            assert request(d.port, "DELETE", bad, None, auth)[0] == code
        status, _, _ = request(
            d.port, "PATCH", path, b'{"text": "x"}', {**auth, "Content-Type": "text/plain"}
        )
        assert status == 415
        for f in tmp_path.glob("chatd.sqlite3*"):  # (the database, its WAL: every byte)
            assert b"draft" not in f.read_bytes(), f
        bob.req("read", room="edits", id=first["id"])  # his read marker, kept across the restart
        assert bob.next("read")["id"] == first["id"]
        ann.say("edits", "after bob read")
        bob.next("message")
        ann.close(), bob.close()
    finally:
        d.stop()
    d2 = Daemon(cwd=str(tmp_path))
    try:
        c = V1(d2.port, "cy")
        history = c.join("edits", since=0)["history"]
        by_id = {m["id"]: m for m in history}
        assert (by_id[first["id"]]["deleted"], by_id[first["id"]]["text"]) == (True, "")
        assert by_id[second["id"]]["reactions"] == {"👍": ["bob"]}
        assert by_id[edit["id"]]["text"] == ""  # (the deleted message's edit lost its text too)
        back = V1(d2.port, "bob").join("edits")
        assert (back["read"], back["unread"]) == (first["id"], 2)  # "keep me", "after bob read"
        for f in tmp_path.glob("chatd.sqlite3*"):  # (the database, its WAL: every byte)
            assert b"draft" not in f.read_bytes(), f
        c.close()
    finally:
        d2.stop()


def test_retention_and_truncated() -> None:
    d = Site("--history-size", "5", "--rate-burst", "100")
    a = d.v1("ret")
    a.join("r")
    for i in range(12):
        a.say("r", f"n{i}")
    for _ in range(12):
        a.next("message")
    b = d.v1("old")
    j = b.join("r", since=2)
    assert [m["id"] for m in j["history"]] == [8, 9, 10, 11, 12]
    assert j["truncated"] is True
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_message"),
        (b'"hello"', "bad_message"),
        (b'{"type": "dance"}', "unknown_type"),
        (b'{"no": "type"}', "unknown_type"),
        (b'{"type": "send", "room": "x"}', "bad_field"),
        (b'{"type": "send", "room": "x", "text": 5}', "bad_field"),
        (b'{"type": "join", "room": "bad room"}', "bad_room"),
        (b'{"type": "join", "room": "ok", "since": -1}', "bad_field"),
        (b'{"type": "join", "room": "ok", "since": "3"}', "bad_field"),
        (b'{"type": "join", "room": "ok", "since": true}', "bad_field"),
        (b'{"type": "leave", "room": "never"}', "not_joined"),
        (b'{"type": "send", "room": "ok", "text": "x", "ref": {"a": 1}}', "bad_field"),
        (b'{"type": "send", "room": "never", "text": "x"}', "not_joined"),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_stays(chatd, raw, code) -> None:
    c = V1(chatd.port, "errs")
    c.send_frame(TEXT, raw)
    err = c.next("error")
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert c.join("still-works")["type"] == "joined"
    c.close()


def test_join_before_hello(chatd: Daemon) -> None:
    c = V1(chatd.port)
    c.req("join", room="x")
    assert c.next("error")["code"] == "hello_first"
    c.close()


def test_text_limits() -> None:
    d = Site("--max-text", "10")
    c = d.v1("limits")
    c.join("t")
    c.say("t", "0123456789")
    assert c.next("message")["text"] == "0123456789"
    c.say("t", "01234567890", ref="long")
    assert c.next("error") == {
        "type": "error",
        "code": "too_long",
        "message": "a message is at most 10 bytes of UTF-8",
        "ref": "long",
    }
    c.say("t", "你好世界")  # 12 bytes of UTF-8
    assert c.next("error")["code"] == "too_long"
    c.say("t", "   ")
    assert c.next("error")["code"] == "bad_field"
    c.send_frame(TEXT, b'{"type":"send","room":"t","text":"\\ud800"}')
    assert c.next("error")["code"] == "bad_field"
    c.close()


def test_too_many_rooms(chatd: Daemon) -> None:
    c = V1(chatd.port, "roamer")
    for i in range(16):
        c.join(f"many-{i}")
    c.req("join", room="many-16")
    assert c.next("error")["code"] == "too_many_rooms"
    assert c.join("many-0")["room"] == "many-0"  # re-joining one it is in is fine
    c.close()


def test_binary_and_oversize_frames_close(chatd: Daemon) -> None:
    c = V1(chatd.port, "bin")
    c.send(b"\x00")
    assert c.expect_close() == 1003
    c = V1(chatd.port, "big")
    c.send_frame(TEXT, b"x" * (64 * 1024 + 1))
    assert c.expect_close() == 1009


def test_rate_limit_error_then_1008_on_flood() -> None:
    # Every frame takes a token: hello and join are 2 of the burst of 5.
    d = Site("--rate", "1", "--rate-burst", "5", "--rate-flood", "5")
    c, other = d.v1("flood"), d.v1("calm")
    c.join("f")
    other.join("f")
    c.next("presence")
    for i in range(3):
        c.say("f", f"ok{i}")
    for i in range(3):
        assert other.next("message")["text"] == f"ok{i}"
    c.say("f", "too fast", ref="x")
    while (m := c.next())["type"] == "message":
        pass
    assert m == {
        "type": "error",
        "code": "rate_limited",
        "message": "too many messages; slow down",
        "ref": "x",
    }
    for _ in range(10):
        c.say("f", "flooding")
    assert c.expect_close() == 1008
    assert other.next("presence")["event"] == "leave"  # and nobody else was harmed
    other.say("f", "fine")
    assert other.next("message")["text"] == "fine"
    other.close()


def test_plain_and_v1_share_the_lobby(chatd: Daemon) -> None:
    v = V1(chatd.port, "vera")
    j = v.join("lobby")
    p = Client(chatd.port, "/")
    pid = f"ID{p.local_port}"
    assert v.next("presence") == {"type": "presence", "room": "lobby", "nick": pid, "event": "join"}
    p.send("from plain")
    m = v.next("message")
    assert m["from"] == pid and m["text"] == "from plain" and m["id"] > j["last_id"]
    assert p.recv() == f"{pid}: from plain"
    v.say("lobby", "from v1")
    assert p.recv() == "vera: from v1"
    assert v.next("message")["text"] == "from v1"
    p.close()
    assert v.next("presence") == {
        "type": "presence",
        "room": "lobby",
        "nick": pid,
        "event": "leave",
    }
    v.close()


def test_plain_flood_closed_1008() -> None:
    d = Site("--rate", "1", "--rate-burst", "3")
    p = d.client("/")
    for i in range(4):
        p.send(f"p{i}")
    assert p.expect_close() == 1008


def test_v1_handshake_without_offer_is_plain(chatd: Daemon) -> None:
    p = Client(chatd.port, "/", headers={"Sec-WebSocket-Protocol": "something-else"})
    assert "Sec-WebSocket-Protocol" not in p.response_headers
    p.close()
    with pytest.raises(HandshakeError):
        Client(chatd.port, "/relay/bad room")


def run_slow_consumer(d: Daemon, count: int, size: int, code: int):
    """One v1 member never reads, one reads everything, one sends.

    Returns the close code the silent one read (``code`` expected), what the
    healthy one got, and the daemon's RSS growth in MiB.

    The sender paces itself by its readers (the healthy one and its own echoes), so
    on a loaded machine neither can fall behind into a bound meant for the slow one.
    """
    from test_backpressure import CloseWatch, PeakRss, Readers

    slow = V1(d.port, "slow", rcvbuf=4096)
    slow.join("busy")
    healthy = V1(d.port, "healthy")
    healthy.join("busy")
    sender = V1(d.port, "sender")
    sender.join("busy")
    healthy.next("presence")
    closed = CloseWatch(d, slow, code)
    rss = PeakRss(d)
    got: list[int] = []

    def read_healthy() -> bool:
        m = healthy.next()
        if m["type"] != "message":
            return False
        got.append(m["id"])
        return True

    readers = Readers()
    readers.start("healthy", count, read_healthy)
    readers.start("sender", count, lambda: sender.next()["type"] == "message")
    text = "x" * (size - 40)
    for i in range(count):
        readers.wait_behind(i)
        sender.say("busy", f"{i:08d}{text}")
    readers.join()
    return closed.code(), got, rss.stop()


def test_v1_slow_consumer_dropped_1008_others_get_everything(daemon) -> None:
    d = daemon(
        "--max-backlog",
        "4M",
        "--rate",
        "100000",
        "--rate-burst",
        "100000",
        "--history-size",
        "100",
        "--join-history",
        "0",
    )
    code, got, growth = run_slow_consumer(d, count=3000, size=16 * 1024, code=1008)  # ~48 MiB
    print(f"v1 slow consumer: daemon RSS growth {growth:.1f} MiB for ~48 MiB sent")
    assert got == list(range(got[0], got[0] + 3000))
    assert code == 1008
    assert growth < 24


def test_overloaded_server_closes_slow_consumers_1013(daemon) -> None:
    d = daemon(
        "--max-total-backlog",
        "256K",
        "--rate",
        "100000",
        "--rate-burst",
        "100000",
        "--history-size",
        "100",
    )
    code, got, _ = run_slow_consumer(d, count=500, size=16 * 1024, code=1013)
    assert len(got) == 500
    assert code == 1013


def test_a_phone_on_a_new_network_takes_its_session_over_with_the_resume_secret(chatd) -> None:
    old = V1(chatd.port)
    old.req("hello", nick="walker")
    secret = old.next("welcome")["resume"]
    old.join("street")
    watcher = V1(chatd.port, "watcher")
    watcher.join("street")
    assert old.next("presence")["nick"] == "watcher"
    # The old connection is still open (a half-open socket, as after a network
    # switch): without the secret the nick is taken; with another's secret too.
    intruder = V1(chatd.port)
    intruder.req("hello", nick="walker", resume="x" * 32)
    assert intruder.next("welcome")["resumed"] is False
    intruder.req("join", room="street")
    assert intruder.next("error")["code"] == "nick_taken"
    new = V1(chatd.port)
    new.req("hello", nick="walker", resume=secret)
    welcome = new.next("welcome")
    assert (welcome["resumed"], welcome["rooms"]) == (True, ["street"])
    assert welcome["resume"] != secret  # a new secret for the new connection
    assert old.expect_close() == 4000
    assert new.join("street")["type"] == "joined"  # the nick is free: no nick_taken
    events = [watcher.next("presence") for _ in range(2)]
    assert [(e["nick"], e["event"]) for e in events] == [("walker", "leave"), ("walker", "join")]
    # A secret works once: it left with the old connection.
    again = V1(chatd.port)
    again.req("hello", nick="other", resume=secret)
    assert again.next("welcome")["resumed"] is False


def test_a_send_retried_with_its_cid_is_stored_once(chatd: Daemon) -> None:
    room = "cid-room"
    alice, bob = V1(chatd.port, "alice"), V1(chatd.port, "bob")
    alice.join(room)
    bob.join(room)
    alice.next("presence")
    alice.say(room, "only once", cid="c-1", ref=1)
    first = alice.next("message")
    assert (first["text"], first["ref"]) == ("only once", 1)
    assert bob.next("message")["id"] == first["id"]
    alice.say(room, "only once", cid="c-1", ref=2)  # its answer was lost: a retry
    again = alice.next("message")
    assert (again["id"], again["text"], again["ref"]) == (first["id"], "only once", 2)
    bob.say(room, "next")  # bob got no second copy: his own message comes next
    assert bob.next("message")["text"] == "next"
    assert alice.next("message")["text"] == "next"
    alice.say(room, "x", cid="")
    assert alice.next("error")["code"] == "bad_field"
    alice.say(room, "x", cid="c" * 65)
    assert alice.next("error")["code"] == "bad_field"


def test_the_push_api_takes_an_idempotency_key(daemon) -> None:
    token = "an-api-token-for-the-idempotency-test"
    d = daemon("--api-token", token)

    def post(key: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        status, _, body = request(
            d.port, "POST", "/api/rooms/news/messages", b'{"text": "deploy done"}', headers
        )
        return status, json.loads(body)

    status, first = post("deploy-42")
    assert status == 201 and "duplicate" not in first
    status, again = post("deploy-42")
    assert status == 200 and again == {**first, "duplicate": True}
    assert post(None)[1]["id"] == first["id"] + 1  # without a key, every post is new
    assert post("x" * 65)[0] == 400
    assert post("")[0] == 400
