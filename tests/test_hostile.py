"""Hostile input against the real daemon: every malformed request is answered, never fatal.

Hand-picked examples of each class of bad input (test_fuzz.py generates
more): JSON that Python parses oddly or not at all, fields out of range,
names that pass for someone else's, text that passes for someone else's
line, and frames that never end a message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator

import pytest
from v1client import V1
from wsclient import BINARY, CONT, TEXT, Client, frame

from tools.daemon import Daemon

TOKEN = "hostile-input-token-0123456789"


@pytest.fixture(scope="module")
def hostile() -> Iterator[Daemon]:
    """One daemon with the push API on, shared by this module."""
    with Daemon("--ping-interval", "0", "--api-token", TOKEN) as d:
        yield d
    log = d.log()
    assert "Unhandled" not in log and "Traceback" not in log, log


def post(d: Daemon, body: bytes, room: str = "lobby") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/api/rooms/{room}/messages",
            body=body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        data = r.read()
        assert r.getheader("Content-Type") == "application/json", (r.status, data)
        return r.status, json.loads(data)
    finally:
        conn.close()


# -- malformed frames ---------------------------------------------------------------

DEEP = b'{"type":"send","room":"x","text":"t","extra":' + b"[" * 20000 + b"]" * 20000 + b"}"

BAD_FRAMES = [
    (b"[" * 50000, "bad_json"),  # RecursionError in Python's parser
    (DEEP, "bad_json"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "bad_json"),
    (b'{"type": ["hello"], "nick": "x"}', "unknown_type"),  # unhashable
    (b'{"type": {"a": 1}}', "unknown_type"),
    (b'{"type": 7}', "unknown_type"),
    (b'{"type": "x' + b"y" * 10000 + b'"}', "unknown_type"),
    (b'{"type": "join", "room": "ok", "since": 9223372036854775808}', "bad_field"),
    (b'{"type": "join", "room": "ok", "since": 9007199254740992}', "bad_field"),
    (b'{"type": "join", "room": "ok", "since": ' + b"9" * 4000 + b"}", "bad_field"),
    (b'{"type": "join", "room": "ok", "since": ' + b"9" * 5000 + b"}", "bad_json"),
    (b'{"type": "join", "room": "ok", "since": 1.0}', "bad_field"),
    (b'{"type": "join", "room": "ok", "since": 1e400}', "bad_json"),
    (b'{"type": "join", "room": "ok", "since": NaN}', "bad_json"),
    (b'{"type": "join", "room": "ok", "since": Infinity}', "bad_json"),
    (b'{"type": "join", "room": "ok", "since": -Infinity}', "bad_json"),
    (b'{"type": "join", "type": "send", "room": "ok"}', "bad_json"),  # duplicate key
    (b'{"type": "join", "room": "ok", "ref": 9007199254740992}', "bad_field"),
    (b'{"type": "join", "room": "ok", "ref": 1.5}', "bad_field"),
    (b'{"type": "join", "room": "ok", "ref": true}', "bad_field"),
    (b'{"type": "join", "room": "ok", "ref": "\\udc00"}', "bad_field"),
    (b'{"type": "join", "room": "ok", "ref": []}', "bad_field"),
    (b'{"type": "join", "room": ["ok"]}', "bad_field"),
    (b'{"type": "join", "room": "\\ud800"}', "bad_room"),
    (b'{"type": "hello", "nick": "\\ud800"}', "already_hello"),
    (b'{"type": "send", "room": "ok", "text": {"t": 1}}', "bad_field"),
    (b'\xef\xbb\xbf{"type": "join", "room": "ok"}', "bad_json"),  # a BOM
    (b'{"type": "join", "room": "ok"}\x00', "bad_json"),
    (b"", "bad_json"),
    (b"null", "bad_message"),
]


@pytest.mark.parametrize(("raw", "code"), BAD_FRAMES, ids=[str(i) for i in range(len(BAD_FRAMES))])
def test_malformed_frame_gets_its_error_and_the_connection_stays(hostile, raw, code) -> None:
    c = V1(hostile.port, "odd")
    c.send_frame(TEXT, raw)
    err = c.next("error")
    assert err["code"] == code, err
    assert "ref" not in err or isinstance(err["ref"], (str, int))
    assert c.join("still-works")["type"] == "joined"
    c.say("still-works", "and chats")
    assert c.next("message")["text"] == "and chats"
    c.close()


def test_the_first_hello_with_odd_nicks(hostile) -> None:
    c = V1(hostile.port)
    for raw in (
        b'{"type": "hello", "nick": "\\ud800"}',
        b'{"type": "hello", "nick": ["a"]}',
        b'{"type": "hello", "nick": {"a": 1}}',
        b'{"type": "hello", "nick": 1e10}',
        b'{"type": "hello"}',
    ):
        c.send_frame(TEXT, raw)
        assert c.next("error")["code"] == "bad_nick", raw
    c.req("hello", nick="fine")
    assert c.next("welcome")["nick"] == "fine"
    c.close()


API_BAD = [
    b"[" * 50000,
    b'{"text": "x", "extra": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"text": "x", "n": NaN}',
    b'{"text": "x", "text": "y"}',
    b'{"text": "x", "n": ' + b"9" * 5000 + b"}",
    b'{"text": "x", "from": ["a"]}',
    b'{"text": "x", "from": null}',
    b'{"text": ["x"]}',
    b'{"text": "\\ud800"}',
    b"\xff\xfe{",
    b"",
]


@pytest.mark.parametrize("body", API_BAD, ids=[str(i) for i in range(len(API_BAD))])
def test_api_answers_unusable_bodies_with_a_json_400(hostile, body) -> None:
    status, answer = post(hostile, body)
    assert status == 400 and isinstance(answer["error"], str), (status, answer)
    assert post(hostile, b'{"text": "still fine"}')[0] == 201


# -- names that pass for others ---------------------------------------------------

RESERVED_VARIANTS = [
    "ID1234",
    "id1234",
    "Id1234",
    "iD1234",
    "\uff29\uff244321",  # fullwidth ID
    "ID\uff11\uff12\uff13\uff14",  # fullwidth digits
    "lD1234",  # l for I
    "1D1234",
    "\u0406D1234",  # Cyrillic I: also mixes scripts
    "\u13c6\u13a01234",  # Cherokee letters that look like I and D
    "ID\u0661\u0662",  # Arabic-Indic digits
    "ID1234.",  # shows as "ID1234.: text"
    "ID1234_x",
    "I.D-42",
]
MIXED_SCRIPTS = [
    "\u0440\u0430ypal",  # Cyrillic r, a among Latin
    "b\u03bfb",  # Greek omicron
    "\u0430lice",
    "ab\u0661",  # ASCII letters, fine; but mixed digit systems below
    "a1\u0661",
]


@pytest.mark.parametrize("nick", RESERVED_VARIANTS + MIXED_SCRIPTS)
def test_spoofing_nicks_are_refused(hostile, nick) -> None:
    if nick == "ab\u0661":  # one numbering system, one script: fine
        c = V1(hostile.port, nick)
        c.close()
        return
    c = V1(hostile.port)
    c.req("hello", nick=nick, ref="n")
    err = c.next("error")
    assert err["code"] == "bad_nick" and err["ref"] == "n", (nick, err)
    status, answer = post(hostile, json.dumps({"text": "hi", "from": nick}).encode())
    assert status == 400 and "'from'" in answer["error"], (nick, status, answer)
    c.close()


def test_nicks_that_read_the_same_are_one_name_in_a_room(hostile) -> None:
    first = V1(hostile.port, "alice")
    first.join("names")
    also_first = V1(hostile.port, "coco")
    also_first.join("names")
    first.next("presence")
    for nick in [
        "ALICE",
        "Alice",
        "\uff41\uff4c\uff49\uff43\uff45",
        "aIice",
        "a1ice",
        "COCO",
        "\u0441\u043e\u0441\u043e",
    ]:
        c = V1(hostile.port, nick)
        c.req("join", room="names", ref=1)
        assert c.next("error")["code"] == "nick_taken", nick
        assert c.join("elsewhere")["members"][-1] == nick  # the nick itself is fine
        c.close()
    # names from languages that mix scripts, and ordinary ones, are accepted
    for nick in [
        "Zo\u00eb_\u674e-1.0",
        "\u5c71\u7530\u305f\u308d\u3046",
        "\u0418\u0432\u0430\u043d",
        "\u0394\u03b7\u03bc\u03ae\u03c4\u03c1\u03b7\u03c2",
        "ID",
        "IDx1",
    ]:
        c = V1(hostile.port, nick)
        assert c.join("names")["members"][-1] == nick
        c.close()
    first.close()
    also_first.close()


# -- text that passes for other lines ---------------------------------------------------

BREAKS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_plain_clients_see_no_line_that_another_could_have_sent(hostile) -> None:
    v = V1(hostile.port, "mallory")
    v.join("lobby")
    p = Client(hostile.port, "/")
    v.next("presence")
    victim = f"ID{p.local_port}"
    for br in BREAKS:
        text = f"hello{br}{victim}: I said nothing{br}alice: nor I{br}\x1b[1A\x1b[2K{victim}: x"
        v.say("lobby", text)
        assert v.next("message")["text"] == text  # v1 clients get it as sent
        shown = p.recv()
        assert isinstance(shown, str)
        lines = shown.split("\n")
        assert lines[0] == "mallory: hello", (br, shown)
        for line in lines[1:]:
            assert line.startswith("  "), (br, shown)
        for sep in ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x1b"]:
            assert sep not in shown, (br, shown)
        assert lines == [
            "mallory: hello",
            f"  {victim}: I said nothing",
            "  alice: nor I",
            f"  \ufffd[1A\ufffd[2K{victim}: x",
        ]
    # a plain sender's own text is shown the same way
    p.send("mine\nmallory: fake")
    assert p.recv() == f"{victim}: mine\n  mallory: fake"
    assert v.next("message")["text"] == "mine\nmallory: fake"
    p.close()
    v.close()


# -- messages that never end ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/relay/frames"])
def test_endless_empty_continuation_frames_close_1009_at_once(hostile, path) -> None:
    headers = {"Sec-WebSocket-Protocol": "chatd.v1"} if path == "/" else None
    c = Client(hostile.port, path, headers=headers)
    other = V1(hostile.port, "bystander")
    other.join("frames")
    flood = frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) * 5000
    started = time.monotonic()
    with contextlib.suppress(OSError):  # the server may have closed already
        c.sock.sendall(flood)
    assert c.expect_close() == 1009
    assert time.monotonic() - started < 5
    other.say("frames", "still here")
    assert other.next("message")["text"] == "still here"
    other.close()
    # 1024 frames are still one message
    ok = V1(hostile.port, "fragments")
    body = json.dumps({"type": "join", "room": "frames"}).encode()
    ok.sock.sendall(
        frame(TEXT, body[:1], fin=False)
        + frame(CONT, b"", fin=False) * 1022
        + frame(CONT, body[1:], fin=True)
    )
    assert ok.next("joined")["room"] == "frames"
    ok.close()


def test_one_byte_fragments_are_cut_but_64_byte_ones_are_a_message(hostile) -> None:
    """1024 frames free, then one per 64 bytes: a big message in small fragments passes."""
    c = Client(hostile.port, "/relay/small-fragments")
    body = b"x" * (64 * 3000)  # 3000 fragments of 64 bytes, far over 1024
    pieces = [body[i : i + 64] for i in range(0, len(body), 64)]
    wire = frame(BINARY, pieces[0], fin=False) + b"".join(
        frame(CONT, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces[1:], 1)
    )
    c.sock.sendall(wire)
    assert c.recv_message() == (BINARY, body)
    ones = frame(BINARY, b"y", fin=False) + frame(CONT, b"y", fin=False) * 3000
    with contextlib.suppress(OSError):
        c.sock.sendall(ones)
    assert c.expect_close() == 1009
