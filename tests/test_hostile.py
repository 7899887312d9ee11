"""Hostile input against the real daemon: every malformed request is answered, never fatal.

Hand-picked examples of each class of bad input (test_fuzz.py generates
more): JSON that Python parses oddly or not at all, fields out of range,
names that pass for someone else's, text that passes for someone else's
line, and frames that never end a message.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from v1client import V1
from wsclient import TEXT

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
