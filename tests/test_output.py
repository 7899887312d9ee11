"""The output side against the real daemon: every byte sent counts, history always arrives.

A client that stops reading is closed (1008) at --max-backlog whatever keeps
the server writing to it (pings it sends, joins it repeats), and the
daemon's memory stays flat. History goes out as ``joined`` plus ``history``
pages of at most 64 KiB, paced by the client, and meets the live stream with
no gap and no duplicate; a client with a 1 MiB frame limit resumes.
"""

from __future__ import annotations

import json
import threading
import time
import zlib

import pytest
from v1client import V1
from wsclient import PING, TEXT, Client, frame

from tools.daemon import Daemon

PAGE = 64 * 1024
FAST = ("--ping-interval", "0", "--rate", "10000", "--rate-burst", "10000")


def post_many(d: Daemon, room: str, n: int, size: int, nick: str = "writer") -> V1:
    """``n`` messages of about ``size`` bytes in ``room``, each starting with its index."""
    w = V1(d.port, nick)
    w.join(room)
    for i in range(n):
        w.say(room, f"{i:06d} " + "x" * (size - 7))
        assert w.next("message")["text"].startswith(f"{i:06d}")
    return w


def read_history(c: V1, joined: dict, msgs: list | None = None) -> tuple[list[dict], list[int]]:
    """The messages of ``joined`` and the ``history`` pages after it (into ``msgs``), and
    each frame's size."""
    msgs = [] if msgs is None else msgs
    msgs += joined["history"]
    sizes = [len(json.dumps(joined, ensure_ascii=False, separators=(",", ":")).encode())]
    more = joined.get("more", False)
    while more:
        op, payload = c.recv_message()
        assert op == TEXT
        page = json.loads(payload)
        assert page["type"] == "history" and page["room"] == joined["room"], page
        assert set(page) == {"type", "room", "messages", "more"}
        sizes.append(len(payload))
        msgs += page["messages"]
        more = page["more"]
    return msgs, sizes


def raw_join(c: V1, room: str, **fields) -> tuple[dict, int]:
    c.req("join", room=room, **fields)
    _, payload = c.recv_message()
    obj = json.loads(payload)
    assert obj["type"] == "joined", obj
    return obj, len(payload)


def test_big_history_in_pages_then_live_no_gap_no_duplicate(daemon) -> None:
    d: Daemon = daemon(*FAST)
    n = 200  # 2 MiB of history: far more than a page, more than the kernel's buffers take
    w = post_many(d, "big", n, 10 * 1024)
    # The reader's small receive buffer makes the pages wait for it to read.
    r = V1(d.port, "reader", rcvbuf=4096)
    joined, first = raw_join(r, "big", since=0)
    assert first <= PAGE and joined["more"] is True and joined["last_id"] == n
    assert "truncated" not in joined
    # Posted while the reader is catching up: it must come once, after the last page.
    w.say("big", "during")
    assert w.next("presence")["nick"] == "reader"
    w.next("message")
    msgs, sizes = read_history(r, joined)
    sizes[0] = first
    assert [m["id"] for m in msgs] == list(range(1, n + 1))
    assert all(m["text"].startswith(f"{i:06d}") for i, m in enumerate(msgs))
    assert all(m["type"] == "message" and m["room"] == "big" for m in msgs)
    assert max(sizes) <= PAGE, sizes
    assert len(sizes) >= 2 * 1024 * 1024 // PAGE
    live = r.next("message")
    assert live["id"] == n + 1 and live["text"] == "during"
    w.say("big", "after")
    assert r.next("message")["id"] == n + 2
    print(f"{len(sizes)} frames, largest {max(sizes)} bytes, joined {first} bytes")
    r.close()
    w.close()


def test_since_zero_over_the_whole_retention(daemon) -> None:
    d: Daemon = daemon(*FAST, "--history-size", "40")
    w = post_many(d, "r", 60, 15 * 1024)
    r = V1(d.port, "reader")
    joined, first = raw_join(r, "r", since=0, ref="j1")
    assert joined["truncated"] is True and joined["ref"] == "j1" and joined["more"] is True
    msgs, sizes = read_history(r, joined)
    sizes[0] = first
    assert [m["id"] for m in msgs] == list(range(21, 61))
    assert max(sizes) <= PAGE, sizes
    # Answers to later requests come after the last page, in order.
    r.req("join", room="r", since=59, ref="j2")
    again = r.next("joined")
    assert again["ref"] == "j2" and [m["id"] for m in again["history"]] == [60]
    assert "more" not in again
    r.close()
    w.close()


# The longest room name and nick, and a ref: what the server adds to a message.
ROOM, NICK, REF = "r" * 64, "n" * 32, "f" * 64
# Control characters are escaped in JSON (6 bytes each): this text fits in a
# 64 KiB `send` (--max-message-size), and the `message` it makes does not.
ESCAPED = "\x01" * 10892


def say_escaped(d: Daemon) -> V1:
    w = V1(d.port, NICK)
    w.join(ROOM)
    w.say(ROOM, ESCAPED, ref=REF)  # 65,531 bytes
    _, payload = w.recv_message()
    assert len(payload) > PAGE and json.loads(payload)["text"] == ESCAPED
    return w


def test_a_message_bigger_than_a_page_goes_out_alone_and_whole(daemon) -> None:
    d: Daemon = daemon(*FAST)
    w = say_escaped(d)
    w.say(ROOM, "small")
    w.next("message")
    r = V1(d.port, "reader")
    joined, size = raw_join(r, ROOM, since=0)
    assert size > PAGE and [m["text"] for m in joined["history"]] == [ESCAPED]
    assert joined["more"] is True  # the next one did not fit beside it
    msgs, _ = read_history(r, joined)
    assert [m["text"] for m in msgs] == [ESCAPED, "small"]
    r.close()
    w.close()


def test_compressed_client_gets_messages_bigger_than_the_incoming_limit(daemon) -> None:
    d: Daemon = daemon(*FAST)
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate", "Sec-WebSocket-Protocol": "chatd.v1"}
    c = Client(d.port, "/", headers=offer)
    assert "permessage-deflate" in c.response_headers
    inflate = zlib.decompressobj(-15)

    def next_obj() -> dict:
        fin, rsv, opcode, payload = c.read_frame()
        assert opcode == TEXT and fin
        if rsv & 4:  # compressed (context takeover: one inflater for the connection)
            payload = inflate.decompress(payload + b"\x00\x00\xff\xff")
        return json.loads(payload)

    c.send_frame(TEXT, json.dumps({"type": "hello", "nick": "zip"}).encode())
    assert next_obj()["type"] == "welcome"
    c.send_frame(TEXT, json.dumps({"type": "join", "room": ROOM}).encode())
    assert next_obj()["type"] == "joined"
    w = say_escaped(d)  # live, compressed
    assert next_obj()["type"] == "presence"
    assert next_obj()["text"] == ESCAPED
    w.say(ROOM, "small")
    assert next_obj()["text"] == "small"
    # and in history: joined, then a page
    c.send_frame(TEXT, json.dumps({"type": "join", "room": ROOM, "since": 0}).encode())
    joined = next_obj()
    assert [m["text"] for m in joined["history"]] == [ESCAPED] and joined["more"] is True
    page = next_obj()
    assert page["type"] == "history" and page["messages"][0]["text"] == "small"
    assert page["more"] is False
    c.close()
    w.close()


def test_websockets_client_with_its_1_mib_limit_resumes(daemon) -> None:
    sync_client = pytest.importorskip("websockets.sync.client")
    d: Daemon = daemon(*FAST)
    n = 150  # 1.5 MiB of history: one joined frame would pass the client's 1 MiB limit
    w = post_many(d, "lim", n, 10 * 1024)
    with sync_client.connect(d.url("/"), subprotocols=["chatd.v1"], open_timeout=30) as ws:
        ws.send(json.dumps({"type": "hello", "nick": "lib"}))
        assert json.loads(ws.recv(30))["type"] == "welcome"
        ws.send(json.dumps({"type": "join", "room": "lim", "since": 0}))
        frame = json.loads(ws.recv(30))
        ids = [m["id"] for m in frame["history"]]
        more = frame.get("more", False)
        while more:
            frame = json.loads(ws.recv(30))
            assert frame["type"] == "history"
            ids += [m["id"] for m in frame["messages"]]
            more = frame["more"]
        assert ids == list(range(1, n + 1))
        w.say("lim", "live")
        assert json.loads(ws.recv(30))["id"] == n + 1
    w.close()


class Sampler:
    """The daemon's peak RSS while a test runs, sampled every 10 ms."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.baseline = self.peak = d.rss_kib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.d.rss_kib())
            time.sleep(0.01)

    def stop(self) -> float:
        self.done.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the RSS sampler is stuck"
        return (self.peak - self.baseline) / 1024


def flood(c: Client, batch: bytes, max_bytes: int, max_seconds: float) -> int:
    """Send ``batch`` again and again, never reading, until the server drops us or a bound."""
    sent = 0
    deadline = time.monotonic() + max_seconds
    c.sock.settimeout(1.0)
    while sent < max_bytes and time.monotonic() < deadline:
        try:
            c.sock.sendall(batch)
        except TimeoutError:
            continue  # the server reads as it can; the deadline bounds us
        except OSError:
            break  # dropped: the close handshake timed out
        sent += len(batch)
    return sent


def test_ping_flood_that_never_reads_is_closed_and_memory_stays_flat(daemon) -> None:
    d: Daemon = daemon("--max-backlog", "1M", "--ping-interval", "0")
    c = Client(d.port, "/relay/pings", rcvbuf=4096)
    sampler = Sampler(d)
    ping = b"".join(
        bytes([0x80 | PING, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125 for _ in range(1000)
    )
    sent = flood(c, ping, 64 * 1024 * 1024, 30)  # unbounded, the pongs would pin ~64 MiB
    d.wait_for_log(r"code=1008", timeout=60)
    growth = sampler.stop()
    print(f"sent {sent >> 20} MiB of pings; RSS +{growth:.1f} MiB (peak {sampler.peak} KiB)")
    assert growth < 12, growth
    # Whichever comes first closes it: the ping rate (a flood of pings) or the
    # backlog (pongs count like any other byte sent).
    c.sock.close()


@pytest.mark.parametrize("size", [1000, 10 * 1024], ids=["one-frame", "paged"])
def test_join_flood_that_never_reads_is_closed_and_memory_stays_flat(daemon, size) -> None:
    """Each join answers 50 KiB (one joined frame) or 500 KiB (joined and pages)."""
    d: Daemon = daemon(*FAST, "--max-backlog", "1M")
    w = post_many(d, "hist", 50, size)
    c = V1(d.port, "joiner", rcvbuf=4096)
    sampler = Sampler(d)
    join = frame(TEXT, json.dumps({"type": "join", "room": "hist"}).encode()) * 100
    # 5,000 joins would be 250 MiB (or 2.5 GiB) unbounded.
    sent = flood(c, join, 50 * len(join), 30)
    d.wait_for_log(r"code=1008", timeout=60)
    growth = sampler.stop()
    print(f"sent {sent // len(join) * 100} joins; RSS +{growth:.1f} MiB (peak {sampler.peak} KiB)")
    assert growth < 12, growth
    assert "slow consumer" in d.log()
    c.sock.close()
    w.close()


def test_history_request_flood_that_never_reads_is_closed_and_memory_stays_flat(daemon) -> None:
    """Each history request answers about 50 KiB: 5,000 of them unread would be 250 MiB."""
    d: Daemon = daemon(*FAST, "--max-backlog", "1M")
    w = post_many(d, "hist", 50, 1000)
    c = V1(d.port, "reader", rcvbuf=4096)
    sampler = Sampler(d)
    ask = frame(TEXT, json.dumps({"type": "history", "room": "hist", "limit": 100}).encode())
    batch = ask * 100
    sent = flood(c, batch, 50 * len(batch), 30)
    d.wait_for_log(r"code=1008", timeout=60)
    growth = sampler.stop()
    print(f"sent {sent // len(ask)} history requests; RSS +{growth:.1f} MiB")
    assert growth < 12, growth
    c.sock.close()
    w.close()


def test_a_reading_client_is_not_dropped_by_a_big_history(daemon) -> None:
    """The pages go out as the client reads: 2 MiB of history through a 1 MiB backlog."""
    d: Daemon = daemon(*FAST, "--max-backlog", "1M")
    w = post_many(d, "big", 200, 10 * 1024)
    r = V1(d.port, "reader", rcvbuf=4096)
    joined, _ = raw_join(r, "big", since=0)
    msgs, _ = read_history(r, joined)
    assert [m["id"] for m in msgs] == list(range(1, 201))
    assert "code=1008" not in d.log()
    r.close()
    w.close()


def test_a_16_mib_resume_goes_out_a_page_at_a_time(daemon) -> None:
    """The whole retention (1000 messages of 16 KiB) to one client: memory stays flat."""
    d: Daemon = daemon(*FAST)
    n = 1000
    w = post_many(d, "full", n, 16 * 1024)
    r = V1(d.port, "reader", rcvbuf=4096)
    sampler = Sampler(d)
    joined, first = raw_join(r, "full", since=0)
    msgs, sizes = read_history(r, joined)
    growth = sampler.stop()
    sizes[0] = first
    assert [m["id"] for m in msgs] == list(range(1, n + 1))
    assert max(sizes) <= PAGE
    total = sum(sizes) / 1024 / 1024
    print(f"{len(sizes)} frames, {total:.1f} MiB, largest {max(sizes)}; RSS +{growth:.1f} MiB")
    # Rendered at once it would be 16 MiB of JSON, plus the messages it came from.
    assert growth < 8, growth
    r.close()
    w.close()
