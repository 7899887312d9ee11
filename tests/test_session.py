"""chatd.session without sockets: the chatd.v1 logic fed frames and a clock.

An in-memory hub (SQLite in memory, commits and writes at an "end of turn"
these tests call), a ``twisted.internet.task.Clock`` for the rate limit, and
an ``Output`` that records: no reactor, no sleeps, no sockets.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from inproc import text_frames
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

import chatd.session
from chatd import limits
from chatd.fanout import Link, Outbox
from chatd.history import MAX_REACTIONS, History, Message
from chatd.hub import InMemoryHub, Joined, NickTaken, Unavailable
from chatd.session import PAGE_BYTES, ChatSession, HistoryPages, V1Renderer
from chatd.stats import Stats

ROOT = Path(__file__).resolve().parent.parent


class Turns:
    """The end of a reactor turn, by hand: the hub's commits, then the fan-out's writes."""

    def __init__(self) -> None:
        self.soon: list = []
        self.writes: list = []

    def end(self) -> None:
        while self.soon or self.writes:
            for queue in (self.soon, self.writes):
                while queue:
                    queue.pop(0)()


def make_hub(turns: Turns, history: History | None = None, **kw: Any) -> InMemoryHub:
    hub = InMemoryHub(
        history if history is not None else History(":memory:"),
        call_soon=turns.soon.append,
        outbox=Outbox(call_soon=turns.writes.append),
        **kw,
    )
    hub.add_format("v1", V1Renderer())
    return hub


class Output:
    """What a session sends, recorded (the adapter's side of ``chatd.session.Output``)."""

    def __init__(self) -> None:
        self.writable = True
        self.sent: list[dict[str, Any]] = []
        self.pages: list[HistoryPages] = []
        self.failed: tuple[int, str] | None = None

    def send_payload(self, payload: bytes) -> None:
        assert self.writable, "a frame for a connection that cannot take it"
        self.sent.append(json.loads(payload))

    def send_pages(self, pages: HistoryPages) -> None:
        self.pages.append(pages)

    def fail(self, code: int, reason: str) -> None:
        self.failed = (code, reason)

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


class Client:
    """A session with its link (what the hub fans out to) and its recorded output."""

    def __init__(self, hub: Any, clock: Clock | None = None, **kw: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        self.transport = StringTransport()
        self.dropped: list[str] = []
        self.link = Link(self.transport, 1 << 24, self.dropped.append)
        self.out = Output()
        self.stats = Stats()
        self.session = ChatSession(
            hub, self.link, self.out, self.clock.seconds(), stats=self.stats, **kw
        )

    def __call__(self, **frame: Any) -> list[dict[str, Any]]:
        """Send one frame (as keyword fields), return the answers it got at once."""
        self.raw(json.dumps(frame).encode())
        return self.out.take()

    def raw(self, payload: bytes) -> None:
        self.session.receive(payload, self.clock.seconds())

    def live(self) -> list[dict[str, Any]]:
        """What the hub fanned out to this link (text frames, each payload under 126 bytes)."""
        return text_frames(self.transport)


def hello(c: Client, nick: str) -> None:
    assert c(type="hello", nick=nick)[0]["type"] == "welcome"


# -- hello, join, send, leave -------------------------------------------------


def test_hello_join_send_leave_answers() -> None:
    turns = Turns()
    hub = make_hub(turns)
    ann = Client(hub)
    [welcome] = ann(type="hello", nick="ann", ref=1)
    assert welcome == {
        "type": "welcome",
        "nick": "ann",
        "session": ann.session.session,
        "resume": ann.session.resume_secret,
        "ref": 1,
    }
    assert len(ann.session.session) == 16 and ann.session.resume_secret.startswith("local.")
    assert len(ann.session.resume_secret) == len("local.") + 32
    [joined] = ann(type="join", room="tea", ref="j")
    assert joined == {
        "type": "joined",
        "room": "tea",
        "members": ["ann"],
        "history": [],
        "last_id": 0,
        "epoch": None,
        "read": 0,
        "unread": 0,
        "ref": "j",
    }
    assert ann(type="send", room="tea", text="hi", ref=7) == []  # acknowledged by its copy
    turns.end()
    [msg] = [f for f in ann.live() if f["type"] == "message"]
    assert msg["id"] == 1 and msg["from"] == "ann" and msg["text"] == "hi" and msg["ref"] == 7
    assert ann(type="leave", room="tea", ref=2) == [{"type": "left", "room": "tea", "ref": 2}]
    assert hub.members("tea") == []


def test_two_sessions_see_presence_and_messages_and_history_on_join() -> None:
    turns = Turns()
    hub = make_hub(turns)
    ann, bob = Client(hub), Client(hub)
    hello(ann, "ann")
    hello(bob, "bob")
    ann(type="join", room="tea")
    ann(type="send", room="tea", text="first")
    turns.end()
    ann.live()
    [joined] = bob(type="join", room="tea", since=0)
    assert joined["members"] == ["ann", "bob"] and joined["last_id"] == 1
    assert [m["text"] for m in joined["history"]] == ["first"]
    assert joined["epoch"] and "more" not in joined
    turns.end()
    assert ann.live() == [{"type": "presence", "room": "tea", "nick": "bob", "event": "join"}]
    bob(type="send", room="tea", text="second")
    turns.end()
    assert [f["text"] for f in ann.live()] == ["second"]
    # a re-join with the epoch it was given and the last id it saw: nothing missed
    [again] = ann(type="join", room="tea", since=2, epoch=joined["epoch"])
    assert again["history"] == [] and again["last_id"] == 2 and "reset" not in again
    [other] = ann(type="join", room="tea", since=2, epoch="gone")
    assert other["reset"] is True and len(other["history"]) == 2
    bob.session.close()
    turns.end()
    assert ann.live() == [{"type": "presence", "room": "tea", "nick": "bob", "event": "leave"}]


# -- the error table ----------------------------------------------------------


class BrokenHub:
    """A hub that cannot store, record a join, or leave (a bug)."""

    def __init__(self, hub: InMemoryHub) -> None:
        self.hub = hub

    def chat_join(self, room, link, nick, fmt, since=None, unique=True, epoch=None, user=""):
        if room == "down":
            return fail(Unavailable("redis is away"))
        return self.hub.chat_join(
            room, link, nick, fmt, since, unique=unique, epoch=epoch, user=user
        )

    def chat_leave(self, room, link):
        raise RuntimeError("a bug")

    def post(self, room, sender, text, ref=None, user="", key=""):
        return fail(Unavailable("disk full"))


def _taken(c: Client) -> list:
    other = Client(c.session.hub)
    hello(other, "ann")
    other(type="join", room="pot")
    return c(type="join", room="pot", ref=3)


def _too_many(c: Client) -> list:
    for i in range(limits.MAX_ROOMS_PER_CONNECTION - 1):  # (and tea)
        assert c(type="join", room=f"r{i}")[0]["type"] == "joined"
    assert c(type="join", room="tea")[0]["type"] == "joined"  # one it is in: fine
    return c(type="join", room="one-more", ref=3)


def _limited(c: Client) -> list:
    for _ in range(limits.RATE_BURST - 2):  # (hello and join took two)
        c(type="nope")
    return c(type="send", room="tea", text="x", ref=3)


def _too_many_reactions(c: Client) -> list:
    hub = c.session.hub
    hub.post("tea", "bob", "react to me")
    for i in range(MAX_REACTIONS):
        hub.post("tea", "cy", chr(0x1F600 + i), None, "", "", "react", 1)
    hub.flush()
    c.out.take()
    return c(type="react", room="tea", id=1, emoji="🦀", ref=3)


ERRORS: list[tuple[str, Any, bool]] = [
    # (code, the frame: bytes, a dict, or a function of the client; how: True for a
    # client that said hello and joined "tea", and whose answer carries ref 3; False:
    # the same, no ref in the answer; "fresh": no hello; "broken": on a BrokenHub)
    ("bad_json", b'{"type":"hello",', False),
    ("bad_json", b'{"a":1,"a":2}', False),
    ("bad_json", b"NaN", False),
    ("bad_message", b'["hello"]', False),
    ("unknown_type", {"type": "shout", "ref": 3}, True),
    ("unknown_type", {"nick": "x", "ref": 3}, True),
    ("unknown_type", {"type": 5, "ref": 3}, True),
    ("bad_field", {"type": "send", "room": "tea", "ref": 3}, True),
    ("bad_field", {"type": "send", "room": "tea", "text": " \n", "ref": 3}, True),
    ("bad_field", b'{"type":"send","room":"tea","text":"\\ud800","ref":3}', True),
    ("bad_field", {"type": "join", "room": "x", "since": -1, "ref": 3}, True),
    ("bad_field", {"type": "join", "room": "x", "since": 2**53, "ref": 3}, True),
    ("bad_field", {"type": "join", "room": "x", "since": True, "ref": 3}, True),
    ("bad_field", {"type": "join", "room": "x", "epoch": "", "ref": 3}, True),
    ("bad_field", {"type": "join", "room": "x", "epoch": "e" * 65, "ref": 3}, True),
    # a bad ref is not echoed
    ("bad_field", {"type": "hello", "nick": "x", "ref": "r" * 65}, False),
    ("bad_field", {"type": "hello", "nick": "x", "ref": 2**53}, False),
    ("bad_nick", {"type": "hello", "nick": "", "ref": 3}, "fresh"),
    ("already_hello", {"type": "hello", "nick": "bob", "ref": 3}, True),
    ("hello_first", {"type": "join", "room": "tea", "ref": 3}, "fresh"),
    ("bad_room", {"type": "join", "room": "a b", "ref": 3}, True),
    ("bad_room", {"type": "join", "room": "..", "ref": 3}, True),
    ("nick_taken", _taken, True),
    ("too_many_rooms", _too_many, True),
    ("not_joined", {"type": "send", "room": "elsewhere", "text": "x", "ref": 3}, True),
    ("not_joined", {"type": "leave", "room": "elsewhere", "ref": 3}, True),
    ("too_long", {"type": "send", "room": "tea", "text": "é" * 6, "ref": 3}, True),
    ("too_long", {"type": "edit", "room": "tea", "id": 1, "text": "é" * 6, "ref": 3}, True),
    ("not_found", {"type": "edit", "room": "tea", "id": 9, "text": "x", "ref": 3}, True),
    ("not_found", {"type": "delete", "room": "tea", "id": 9, "ref": 3}, True),
    ("not_found", {"type": "react", "room": "tea", "id": 9, "emoji": "👍", "ref": 3}, True),
    ("too_many", _too_many_reactions, True),
    ("bad_field", {"type": "react", "room": "tea", "id": 1, "emoji": "a b", "ref": 3}, True),
    ("bad_field", {"type": "react", "room": "tea", "id": 1, "emoji": "", "ref": 3}, True),
    ("bad_field", {"type": "react", "room": "tea", "id": 1, "emoji": "x" * 33, "ref": 3}, True),
    ("bad_field", {"type": "unreact", "room": "tea", "id": 1, "emoji": "\n", "ref": 3}, True),
    ("bad_field", {"type": "delete", "room": "tea", "id": 0, "ref": 3}, True),
    ("bad_field", {"type": "edit", "room": "tea", "id": 1, "ref": 3}, True),
    ("not_joined", {"type": "delete", "room": "elsewhere", "id": 1, "ref": 3}, True),
    ("rate_limited", _limited, True),
    ("unavailable", {"type": "send", "room": "tea", "text": "x", "ref": 3}, "broken"),
    ("unavailable", {"type": "join", "room": "down", "ref": 3}, "broken"),
    ("internal_error", {"type": "leave", "room": "tea", "ref": 3}, "broken"),
]


@pytest.mark.parametrize(("code", "frame", "how"), ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error_code(code: str, frame: Any, how: Any) -> None:
    turns = Turns()
    hub: Any = make_hub(turns)
    if how == "broken":
        hub = BrokenHub(hub)
    c = Client(hub, max_text=11)  # "é" * 6 is 12 bytes
    if how != "fresh":
        hello(c, "ann")
        assert c(type="join", room="tea")[0]["type"] == "joined"
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        if callable(frame):
            answers = frame(c)
        else:
            c.raw(frame if isinstance(frame, bytes) else json.dumps(frame).encode())
            answers = c.out.take()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    [error] = answers
    assert error["type"] == "error" and error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error.get("ref") == (3 if how is not False else None)
    assert c.out.failed is None  # an error leaves the connection open
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == (1 if code == "internal_error" else 0)
    assert c(type="hello", nick="z")[0]["type"] in ("welcome", "error")  # still answering


def test_every_code_of_the_protocol_error_table_is_tested() -> None:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    table = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert len(documented) == 19
    # (unauthorized and forbidden need a token policy: tests/test_auth.py tries them)
    assert documented == {code for code, _, _ in ERRORS} | {"unauthorized", "forbidden"}


def test_an_error_after_the_frame_was_taken_goes_with_its_ref() -> None:
    turns = Turns()
    c = Client(BrokenHub(make_hub(turns)))
    hello(c, "ann")
    assert c(type="send", room="tea", text="x", ref="s")[0]["code"] == "not_joined"
    c(type="join", room="tea")
    [error] = c(type="send", room="tea", text="x", ref="s")
    assert error == {
        "type": "error",
        "code": "unavailable",
        "message": "the message could not be stored and was not sent",
        "ref": "s",
    }


# -- the rate limit -----------------------------------------------------------


def test_rate_limit_refuses_past_the_burst_and_recovers_with_time() -> None:
    turns = Turns()
    clock = Clock()
    c = Client(make_hub(turns), clock, rate=2.0, rate_burst=3, rate_flood=5)
    hello(c, "ann")
    assert c(type="nope")[0]["code"] == "unknown_type"
    assert c(type="nope")[0]["code"] == "unknown_type"  # the burst is spent
    assert c(type="hello", nick="bob", ref=1)[0] == {
        "type": "error",
        "code": "rate_limited",
        "message": "too many messages; slow down",
        "ref": 1,
    }
    assert c.stats.rate_limited["v1"] == 1
    clock.advance(0.5)  # one token back at 2/s, but the debt is paid first
    assert c(type="nope")[0]["code"] == "rate_limited"
    clock.advance(10)  # the bucket is full again
    for _ in range(3):
        assert c(type="nope")[0]["code"] == "unknown_type"
    assert c(type="nope")[0]["code"] == "rate_limited"
    assert c.out.failed is None


def test_a_sustained_flood_closes_1008_without_an_answer() -> None:
    turns = Turns()
    clock = Clock()
    c = Client(make_hub(turns), clock, rate=1.0, rate_burst=2, rate_flood=3)
    answers = []
    for _ in range(5):
        answers += c(type="nope")
    assert [a["code"] for a in answers] == ["unknown_type"] * 2 + ["rate_limited"] * 3
    assert c.out.failed is None
    assert c(type="nope") == []
    assert c.out.failed == (1008, "rate limit: sustained flood")
    assert c.stats.rate_limited["v1"] == 4


def test_time_spreads_the_same_frames_under_the_rate() -> None:
    clock = Clock()
    c = Client(make_hub(Turns()), clock, rate=1.0, rate_burst=2, rate_flood=3)
    for _ in range(100):
        assert c(type="nope")[0]["code"] == "unknown_type"
        clock.advance(1.0)
    assert c.stats.rate_limited["v1"] == 0 and c.out.failed is None


# -- frames behind a pending join ---------------------------------------------


class SlowHub:
    """An InMemoryHub whose joins are answered when the test says (as a cluster's)."""

    def __init__(self, hub: InMemoryHub) -> None:
        self.hub = hub
        self.joins: list[tuple[tuple, Deferred]] = []

    def chat_join(self, room, link, nick, fmt, since=None, unique=True, epoch=None, user=""):
        d: Deferred = Deferred()
        self.joins.append(((room, link, nick, fmt, since, epoch), d))
        return d

    def answer(self, error: Exception | None = None) -> None:
        (room, link, nick, fmt, since, epoch), d = self.joins.pop(0)
        if error is not None:
            d.errback(error)
        else:
            self.hub.chat_join(room, link, nick, fmt, since, epoch=epoch).chainDeferred(d)

    def chat_leave(self, room, link):
        return self.hub.chat_leave(room, link)

    def post(self, room, sender, text, ref=None, user="", key=""):
        return self.hub.post(room, sender, text, ref, user, key)


def test_frames_behind_a_pending_join_are_answered_in_order() -> None:
    turns = Turns()
    hub = SlowHub(make_hub(turns))
    c = Client(hub)
    hello(c, "ann")
    assert c(type="join", room="tea", ref=1) == []
    # all wait, even those that need no room (and errors)
    assert c(type="send", room="tea", text="after the join", ref=2) == []
    assert c(type="nope", ref=3) == []
    assert c(type="join", room="pot", ref=4) == []
    assert c(type="send", room="pot", text="waits for the second join", ref=5) == []
    assert c(type="leave", room="tea", ref=6) == []
    assert len(c.session.waiting) == 5 and len(hub.joins) == 1
    hub.answer()  # tea: the send, the error, then the next join, which waits again
    answers = c.out.take()
    assert [(a["type"], a.get("ref")) for a in answers] == [("joined", 1), ("error", 3)]
    assert len(c.session.waiting) == 2 and len(hub.joins) == 1
    hub.answer()  # pot: its send, then the leave
    answers = c.out.take()
    assert [(a["type"], a.get("ref")) for a in answers] == [("joined", 4), ("left", 6)]
    assert not c.session.waiting and c.session.joining is None
    turns.end()
    sent = [(f["room"], f["ref"]) for f in c.live() if f["type"] == "message"]
    assert sent == [("tea", 2), ("pot", 5)]


def test_a_failed_pending_join_answers_then_the_rest_follows() -> None:
    turns = Turns()
    hub = SlowHub(make_hub(turns))
    c = Client(hub)
    hello(c, "ann")
    c(type="join", room="tea", ref=1)
    c(type="send", room="tea", text="x", ref=2)
    hub.answer(NickTaken("ann"))
    assert c.out.take() == [
        {"type": "error", "code": "nick_taken", "message": "ann is already in tea", "ref": 1},
        {"type": "error", "code": "not_joined", "message": "join tea first", "ref": 2},
    ]
    c(type="join", room="tea", ref=3)
    hub.answer(Unavailable("redis"))
    [error] = c.out.take()
    assert error["code"] == "unavailable" and error["ref"] == 3


def test_a_waiting_frame_keeps_the_rate_verdict_of_when_it_came() -> None:
    clock = Clock()
    hub = SlowHub(make_hub(Turns()))
    c = Client(hub, clock, rate=1.0, rate_burst=3, rate_flood=10)
    hello(c, "ann")
    c(type="join", room="tea")
    c(type="nope", ref=1)
    c(type="nope", ref=2)  # over the burst
    clock.advance(60)  # the join takes long: the bucket refills meanwhile
    hub.answer()
    codes = [(a.get("code"), a.get("ref")) for a in c.out.take()]
    assert codes == [(None, None), ("unknown_type", 1), ("rate_limited", 2)]


def test_one_frame_past_max_waiting_requests_closes_1008() -> None:
    hub = SlowHub(make_hub(Turns()))
    c = Client(hub, rate_burst=1000)
    hello(c, "ann")
    c(type="join", room="tea")
    for _ in range(limits.MAX_WAITING_REQUESTS):
        assert c(type="nope") == []
    assert c.out.failed is None
    c.raw(b'{"type":"nope"}')
    assert c.out.failed == (1008, "too many requests behind a pending one")
    assert len(c.session.waiting) == limits.MAX_WAITING_REQUESTS


def test_close_leaves_every_room_and_a_late_join_writes_nothing() -> None:
    turns = Turns()
    hub = SlowHub(make_hub(turns))
    ann, bob = Client(hub), Client(hub)
    hello(ann, "ann")
    hello(bob, "bob")
    bob(type="join", room="tea")
    hub.answer()
    bob.out.take()
    ann(type="join", room="tea")
    hub.answer()
    ann(type="join", room="pot")  # not answered yet
    ann(type="send", room="tea", text="never", ref=1)
    ann.out.take()
    ann.out.writable = False  # as the adapter's, once closing (send_payload asserts it)
    ann.session.close()
    ann.session.close()  # once is enough
    assert ann.session.link is None and ann.session.output is not ann.out  # no cycle left
    assert hub.hub.members("tea") == ["bob"]
    hub.answer()  # pot answers after the close: nothing is written, nothing waits
    assert ann.out.sent == [] and not ann.session.waiting
    ann.raw(b'{"type":"hello","nick":"x"}')  # a frame after close: ignored
    assert ann.out.sent == [] and ann.out.failed is None
    turns.end()
    assert [f["event"] for f in bob.live() if f["type"] == "presence"] == ["join", "leave"]


def test_a_send_answered_after_leaving_is_copied_to_the_sender_alone() -> None:
    stats = Stats()

    class Later:
        def __init__(self) -> None:
            self.posted: list[Deferred] = []

        def chat_join(self, room, link, nick, fmt, since=None, unique=True, epoch=None, user=""):
            return _fired(Joined(room, [nick], [], 0, False))

        def chat_leave(self, room, link):
            return True

        def post(self, room, sender, text, ref=None, user="", key=""):
            self.posted.append(Deferred())
            return self.posted[-1]

    hub = Later()
    out = Output()
    s = ChatSession(hub, object(), out, 0.0, stats=stats)  # type: ignore[arg-type]
    s.receive(b'{"type":"hello","nick":"ann"}', 0.0)
    s.receive(b'{"type":"join","room":"tea"}', 0.0)
    s.receive(b'{"type":"send","room":"tea","text":"hi","ref":9}', 0.0)
    s.receive(b'{"type":"leave","room":"tea"}', 0.0)
    out.take()
    hub.posted[0].callback(Message("tea", 1, 5, "ann", "hi", 9))  # type: ignore[arg-type]
    [copy] = out.take()
    assert copy["type"] == "message" and copy["id"] == 1 and copy["ref"] == 9
    assert stats.deliveries["chat"] == 1 and stats.bytes_out["chat"] > 0


def _fired(result: object) -> Deferred:
    d: Deferred = Deferred()
    d.callback(result)
    return d


# -- history pages --------------------------------------------------------------


def _big_room(turns: Turns, n: int, size: int = 16 * 1024) -> InMemoryHub:
    hub = make_hub(turns)
    writer = Client(hub)
    hello(writer, "w")
    writer(type="join", room="tea")
    for i in range(n):
        writer(type="send", room="tea", text=f"{i:04d}" + "x" * (size - 4))
    turns.end()
    return hub


def test_history_pages_go_to_the_output_each_at_most_page_bytes() -> None:
    turns = Turns()
    hub = _big_room(turns, 40)
    c = Client(hub)
    hello(c, "ann")
    [joined] = c(type="join", room="tea", since=0, ref="j")
    assert joined["more"] is True and joined["last_id"] == 40 and joined["ref"] == "j"
    [pages] = c.out.pages
    payloads = list(pages)  # what the link does as the transport drains
    frames = [json.loads(p) for p in payloads]
    assert all(len(p) <= PAGE_BYTES for p in payloads)
    assert [f["type"] for f in frames] == ["history"] * len(frames)
    assert [f["more"] for f in frames] == [True] * (len(frames) - 1) + [False]
    ids = [m["id"] for m in joined["history"]] + [m["id"] for f in frames for m in f["messages"]]
    assert ids == list(range(1, 41))
    assert pages.done


def test_a_history_that_fits_the_joined_frame_sends_no_pages() -> None:
    turns = Turns()
    c = Client(_big_room(turns, 2, size=100))
    hello(c, "ann")
    [joined] = c(type="join", room="tea", since=0)
    assert len(joined["history"]) == 2 and "more" not in joined
    assert c.out.pages == []


def test_no_pages_for_an_output_that_cannot_take_them() -> None:
    turns = Turns()
    c = Client(_big_room(turns, 10))

    class Closing(Output):
        def send_payload(self, payload: bytes) -> None:
            super().send_payload(payload)
            if self.sent[-1]["type"] == "joined":
                self.writable = False  # e.g. the joined frame passed --max-backlog

    c.out = c.session.output = Closing()
    hello(c, "ann")
    [joined] = c(type="join", room="tea", since=0)
    assert joined["more"] is True and c.out.pages == []


class SlowCursor:
    """A cursor that reads from somewhere slow (Redis): each batch is a Deferred."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.after = 0
        self.until = messages[-1].id
        self.reads: list[Deferred] = []

    def read(self) -> Deferred:
        d: Deferred = Deferred()
        self.reads.append(d)
        return d

    def arrive(self, n: int) -> None:
        batch, self.messages = self.messages[:n], self.messages[n:]
        self.after = batch[-1].id
        self.reads.pop(0).callback(batch)


def test_pages_wait_for_a_slow_cursor_and_wake_the_link() -> None:
    msgs = [Message("tea", i, 0, "w", "y" * 30_000) for i in range(1, 7)]
    cursor = SlowCursor(msgs)

    class Hub:
        def chat_join(self, room, link, nick, fmt, since=None, unique=True, epoch=None, user=""):
            return _fired(Joined(room, [nick], [], 6, False, "e1", False, cursor))  # type: ignore[arg-type]

    out = Output()
    s = ChatSession(Hub(), object(), out, 0.0)  # type: ignore[arg-type]
    s.receive(b'{"type":"hello","nick":"ann"}', 0.0)
    s.receive(b'{"type":"join","room":"tea","since":0}', 0.0)
    _welcome, joined = out.take()
    assert joined["history"] == [] and joined["more"] is True
    [pages] = out.pages
    woken: list[int] = []
    pages.wake = lambda: woken.append(1)  # the link's drain
    assert next(pages) == b""  # wait: a read is on its way
    cursor.arrive(3)
    assert woken == [1]
    first = json.loads(next(pages))
    assert [m["id"] for m in first["messages"]] == [1, 2] and first["more"] is True
    second = json.loads(next(pages))  # 3, then 4 is not here yet: the page ends
    assert [m["id"] for m in second["messages"]] == [3] and second["more"] is True
    assert next(pages) == b""
    cursor.arrive(3)
    rest = [json.loads(p) for p in pages]
    assert [m["id"] for f in rest for m in f["messages"]] == [4, 5, 6]
    assert rest[-1]["more"] is False


def test_a_failed_cursor_read_fails_the_pages() -> None:
    cursor = SlowCursor([Message("tea", 1, 0, "w", "x")])

    class Hub:
        def chat_join(self, room, link, nick, fmt, since=None, unique=True, epoch=None, user=""):
            return _fired(Joined(room, [nick], [], 1, False, "e1", False, cursor))  # type: ignore[arg-type]

    out = Output()
    s = ChatSession(Hub(), object(), out, 0.0)  # type: ignore[arg-type]
    s.receive(b'{"type":"hello","nick":"ann"}', 0.0)
    s.receive(b'{"type":"join","room":"tea"}', 0.0)
    [pages] = out.pages
    assert next(pages) == b""
    cursor.reads.pop(0).errback(Unavailable("redis lost it"))
    with pytest.raises(Unavailable):
        next(pages)  # (the link gives up on the connection)


# -- what the session is made of ----------------------------------------------


def test_the_session_imports_neither_autobahn_nor_the_reactor() -> None:
    tree = ast.parse(Path(chatd.session.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
    assert not any(n.startswith("autobahn") for n in names)
    assert not any(n.startswith("twisted.internet.reactor") for n in names)
    assert "twisted.internet.reactor" not in Path(chatd.session.__file__).read_text()


def test_a_hello_that_resumes_elsewhere_holds_what_follows_until_it_is_answered() -> None:
    turns = Turns()
    hub = make_hub(turns)
    asked: list[tuple[str, str | None, Deferred]] = []

    def resume(secret: str, sub: str | None) -> Deferred:
        asked.append((secret, sub, Deferred()))
        return asked[-1][2]

    c = Client(hub, resume=resume)
    assert c(type="hello", nick="ann", resume="n2.secret", ref=1) == []  # not yet
    assert c(type="join", room="tea", ref=2) == []  # behind the hello, in order
    [(secret, sub, d)] = asked
    assert (secret, sub) == ("n2.secret", None)
    d.callback(["tea"])
    welcome, joined = c.out.take()
    assert (welcome["type"], welcome["resumed"], welcome["rooms"]) == ("welcome", True, ["tea"])
    assert (joined["type"], joined["ref"]) == ("joined", 2)
    # Closed while the other node has not answered: the answer finds no one.
    late = Client(hub, resume=resume)
    late(type="hello", nick="bob", resume="n2.other")
    late.session.close()
    asked[-1][2].callback(None)
    assert late.out.take() == []


def test_joined_says_whether_since_was_recovered_completely_and_if_not_why() -> None:
    turns = Turns()
    hub = make_hub(turns, History(":memory:", 3))  # three messages kept per room
    writer = Client(hub)
    hello(writer, "ann")
    writer(type="join", room="tea")
    for i in range(5):
        writer(type="send", room="tea", text=f"t{i + 1}")
    turns.end()
    c = Client(hub)
    hello(c, "bob")

    def join(**fields: Any) -> dict[str, Any]:
        [joined] = c(type="join", room="tea", **fields)
        c(type="leave", room="tea")
        c.out.take()
        return joined

    assert "recovered" not in join()  # no since: nothing to recover
    ok = join(since=2)
    assert (ok["recovered"], [m["id"] for m in ok["history"]]) == (True, [3, 4, 5])
    assert "reason" not in ok
    assert join(since=5)["recovered"] is True  # nothing missed is recovered too
    lost = join(since=1)  # 2 is gone
    assert (lost["recovered"], lost["reason"], lost["truncated"]) == (False, "truncated", True)
    ahead = join(since=9)
    assert (ahead["recovered"], ahead["reason"]) == (False, "unknown_id")
    other = join(since=2, epoch="not-this-one")
    assert (other["recovered"], other["reason"], other["reset"]) == (False, "epoch", True)


def test_history_pages_by_id_newest_or_oldest_first_and_under_the_frame_size() -> None:
    turns = Turns()
    hub = make_hub(turns, History(":memory:", 8))  # ids 3..10 kept of 10
    c = Client(hub)
    hello(c, "ann")
    c(type="join", room="tea")
    for i in range(10):
        c(type="send", room="tea", text=f"t{i + 1}")
    turns.end()
    c.out.take()

    def page(**fields: Any) -> tuple[list[int], bool]:
        [answer] = c(type="history", room="tea", ref="h", **fields)
        assert (answer["type"], answer["room"], answer["ref"]) == ("history", "tea", "h")
        assert answer["epoch"] == hub.broker.history.epoch("tea")
        return [m["id"] for m in answer["messages"]], answer["more"]

    assert page(limit=3) == ([8, 9, 10], True)  # the latest
    assert page(before=8, limit=3) == ([5, 6, 7], True)  # scrolling up
    assert page(before=5, limit=3) == ([3, 4], False)  # the oldest kept
    assert page(after=5, limit=2) == ([6, 7], True)  # catching up
    assert page(after=5, before=8) == ([6, 7], False)
    assert page(after=10) == ([], False)
    assert page() == (list(range(3, 11)), False)
    for bad in ({"limit": 0}, {"limit": 101}, {"before": 0}, {"after": -1}, {"limit": "3"}):
        [error] = c(type="history", room="tea", **bad)
        assert error["code"] == "bad_field", bad
    # Not joined is fine (a reader may look without being present); big texts: one frame
    # stays under PAGE_BYTES, the messages nearest the asked-for end kept.
    big = Client(hub)
    hello(big, "bob")
    big(type="join", room="big")
    for i in range(6):
        big(type="send", room="big", text=str(i) * 16_000)
    turns.end()
    big.out.take()
    [answer] = c(type="history", room="big")
    assert [m["id"] for m in answer["messages"]] == [3, 4, 5, 6] and answer["more"] is True
    assert len(json.dumps(answer)) <= chatd.session.PAGE_BYTES
    [answer] = c(type="history", room="big", after=0)
    assert [m["id"] for m in answer["messages"]] == [1, 2, 3, 4] and answer["more"] is True


def ann_and_bob_in_tea() -> tuple[Turns, InMemoryHub, Client, Client]:
    """Two sessions on one hub, said hello and joined ``tea``."""
    turns = Turns()
    hub = make_hub(turns)
    ann, bob = Client(hub), Client(hub)
    hello(ann, "ann")
    hello(bob, "bob")
    for c in (ann, bob):
        c(type="join", room="tea")
    return turns, hub, ann, bob


def test_typing_goes_to_the_others_at_most_once_a_second_and_is_not_answered() -> None:
    turns, hub, ann, bob = ann_and_bob_in_tea()
    turns.end()
    ann.live(), bob.live()
    assert ann(type="typing", room="tea", ref=1) == []  # no answer: it is ephemeral
    assert ann(type="typing", room="tea") == []  # a repeat within the second: dropped
    turns.end()
    assert bob.live() == [{"type": "typing", "room": "tea", "name": "ann"}]
    assert ann.live() == []  # not to the typer
    ann.clock.advance(limits.TYPING_INTERVAL)
    ann(type="typing", room="tea")
    turns.end()
    assert bob.live() == [{"type": "typing", "room": "tea", "name": "ann"}]
    [error] = ann(type="typing", room="elsewhere")
    assert error["code"] == "not_joined"
    assert hub.broker.history.last_id("tea") == 0  # nothing stored


def test_read_markers_reach_the_readers_tabs_and_the_room_and_come_back_with_joined() -> None:
    turns, _, ann, bob = ann_and_bob_in_tea()
    for i in range(4):
        bob(type="send", room="tea", text=f"t{i}")
    turns.end()
    ann.live(), bob.live()
    assert ann(type="read", room="tea", id=3, ref=1) == []  # answered by the event
    turns.end()
    said = {"type": "read", "room": "tea", "name": "ann", "id": 3}
    assert ann.live() == [said] and bob.live() == [said]
    ann(type="read", room="tea", id=2)  # never back: nothing happens
    turns.end()
    assert ann.live() == [] and bob.live() == []
    [joined] = ann(type="join", room="tea")  # (a resynchronisation: the marker comes with it)
    assert (joined["read"], joined["unread"], joined["last_id"]) == (3, 1, 4)
    for bad in ({"id": -1}, {"id": "3"}, {}):
        [error] = ann(type="read", room="tea", **bad)
        assert error["code"] == "bad_field", bad
    [error] = ann(type="read", room="elsewhere", id=1)
    assert error["code"] == "not_joined"


def test_edits_deletes_and_reactions_reach_the_room_and_replay_as_they_are_now() -> None:
    turns, hub, ann, bob = ann_and_bob_in_tea()
    ann(type="send", room="tea", text="helo")
    turns.end()
    ann.live(), bob.live()
    # Only the author edits or deletes; anyone who may write reacts.
    for frame in ({"type": "edit", "text": "mine now"}, {"type": "delete"}):
        [error] = bob(room="tea", id=1, ref=7, **frame)
        assert (error["code"], error["ref"]) == ("forbidden", 7)
    assert ann(type="edit", room="tea", id=1, text="hello", ref=5) == []  # (answered live)
    assert bob(type="react", room="tea", id=1, emoji="👍") == []
    assert bob(type="react", room="tea", id=1, emoji="👨‍👩‍👧") == []  # (joiners are fine)
    bob(type="unreact", room="tea", id=1, emoji="👨‍👩‍👧")
    turns.end()
    seen = ann.live()
    assert seen == bob.live()  # (ann's ref comes back on ann's copy only)
    assert [(m["id"], m["kind"], m["target"], m.get("text"), m.get("emoji")) for m in seen] == [
        (2, "edit", 1, "hello", None),
        (3, "react", 1, None, "👍"),
        (4, "react", 1, None, "👨‍👩‍👧"),
        (5, "unreact", 1, None, "👨‍👩‍👧"),
    ]
    [page] = bob(type="history", room="tea", limit=1, before=2)
    [first] = page["messages"]
    assert (first["text"], first["edited"], first["updated"]) == ("hello", True, 5)
    assert first["reactions"] == {"👍": ["bob"]} and "deleted" not in first
    assert ann(type="delete", room="tea", id=1) == []
    turns.end()
    [gone] = bob.live()
    assert (gone["kind"], gone["target"], gone["id"]) == ("delete", 1, 6) and "text" not in gone
    [error] = ann(type="edit", room="tea", id=1, text="back")
    assert error["code"] == "not_found"
    # A newcomer's replay: the message as it is now, then the events (ignored by the
    # rule: apply an event only if its id is above the message's "updated").
    cy = Client(hub)
    hello(cy, "cy")
    [joined] = cy(type="join", room="tea", since=0)
    first, *events = joined["history"]
    assert (first["text"], first["deleted"], first["updated"]) == ("", True, 6)
    assert "reactions" not in first and "edited" in first
    assert [e["id"] for e in events] == [2, 3, 4, 5, 6] and events[0]["text"] == ""
    assert hub.broker.history.db.execute(
        "SELECT count(*) FROM messages WHERE text LIKE '%hel%'"
    ).fetchone() == (0,)
