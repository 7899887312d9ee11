"""Bounds a client cannot talk its way past: unfinished messages, pings, logs, close codes.

Each test attacks the real daemon on loopback and checks the promise from the
outside: the close code or HTTP status the attacker gets, the daemon's
memory (RSS), what the log holds, and that a bystander still chats. (The
pongs of one well-behaved connection and the option check run in process.)
"""

from __future__ import annotations

import contextlib
import http.client
import time
import zlib

from inproc import Site
from v1client import V1
from wsclient import BINARY, CLOSE, PING, PONG, Client, Closed, frame

from tools.daemon import Daemon

MiB = 1024 * 1024


def bystander_chats(d: Daemon, room: str = "calm") -> None:
    v = V1(d.port, "calm")
    v.join(room)
    v.say(room, "still here")
    assert v.next("message")["text"] == "still here"
    v.close()


def deflated(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (co.compress(data) + co.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_unfinished_compressed_messages_are_bounded_over_all_clients(daemon) -> None:
    """The start of a big compressed message, never finished, holds its inflated size:
    over all clients that is bounded by --max-total-inbound (close 1013 past it)."""
    d: Daemon = daemon("--max-total-inbound", "40M", "--ping-interval", "0")
    blob = deflated(b"\0" * (15 * MiB))  # about 15 KiB on the wire, 15 MiB inflated
    assert len(blob) < 64 * 1024
    baseline = d.rss_kib()
    held: list[Client] = []
    codes: list[int | None] = []
    for _ in range(10):  # 10 x 15 MiB would be 150 MiB; the bound is 40 MiB
        c = Client(
            d.port, "/relay/bomb", headers={"Sec-WebSocket-Extensions": "permessage-deflate"}
        )
        c.send_frame(BINARY, blob, fin=False, rsv=4)
        c.send_frame(PING, b"sync")  # answered once the fragment before it was taken in
        try:
            while True:
                _, op, payload = c.recv_frame()
                if op == PONG:
                    held.append(c)
                    break
                if op == CLOSE:
                    raise Closed(int.from_bytes(payload[:2], "big"))
        except Closed as e:
            codes.append(e.code)
    assert len(held) == 2 and codes == [1013] * 8, (len(held), codes)
    growth = (d.rss_kib() - baseline) / 1024
    print(f"RSS growth with 2 x 15 MiB held and 8 refused: {growth:.1f} MiB")
    # the bound, plus the message that crossed it and allocator slack; unbounded: 150+
    assert growth < 40 + 2 * 15, growth
    bystander_chats(d)
    for c in held:  # once they go, their share is free again
        c.drop()
    deadline = time.monotonic() + 10
    while True:
        c = Client(
            d.port, "/relay/bomb", headers={"Sec-WebSocket-Extensions": "permessage-deflate"}
        )
        c.send_frame(BINARY, blob, fin=False, rsv=4)
        c.send_frame(PING, b"sync")
        _fin, op, _ = c.recv_frame()
        c.drop()
        if op == PONG or time.monotonic() > deadline:
            break
    assert op == PONG


def test_plain_fragments_count_too_and_finished_messages_give_back(daemon) -> None:
    d: Daemon = daemon("--max-total-inbound", "16M", "--ping-interval", "0")
    a = Client(d.port, "/relay/big")
    b = Client(d.port, "/relay/big")
    for _ in range(3):  # a finished 12 MiB message frees its share each time
        a.send_frame(BINARY, b"x" * (12 * MiB), fin=True)
        assert len(b.recv_message()[1]) == 12 * MiB
        assert len(a.recv_message()[1]) == 12 * MiB
    a.send_frame(BINARY, b"y" * (12 * MiB), fin=False)  # unfinished: 12 of 16 MiB held
    a.send_frame(PING, b"")
    while a.recv_frame()[1] != PONG:
        pass
    b.send_frame(BINARY, b"z" * (6 * MiB), fin=False)
    assert b.expect_close() == 1013
    bystander_chats(d)
    a.close()


def test_ping_flood_gets_bounded_pongs_then_1008(chatd: Daemon) -> None:
    d = chatd  # the module's daemon: the only 1008 in its log is this test's
    c = Client(d.port, "/relay/pings")
    pings = 1000
    c.sock.sendall(b"".join(frame(PING, b"p") for _ in range(pings)))
    pongs = 0
    try:
        while True:
            _, op, _ = c.recv_frame()
            if op == PONG:
                pongs += 1
            elif op == CLOSE:
                raise Closed(None)
    except Closed:
        pass
    except OSError:
        pass
    # the burst is answered; past it no pongs; a flood closes the connection
    assert 100 <= pongs <= 110, pongs
    d.wait_for_log(r"close relay .* code=1008", timeout=10)
    bystander_chats(d)


def test_a_few_pings_are_always_answered() -> None:
    c = Site().client("/relay/pings")  # in process: one connection's answers
    for i in range(20):
        c.send_frame(PING, str(i).encode())
        assert c.recv_frame()[1:] == (PONG, str(i).encode())
    c.close()


def test_access_log_cuts_what_clients_choose(chatd: Daemon) -> None:
    d = chatd
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    before = sum(len(line) for line in d.lines)
    for i in range(50):
        conn.request("GET", f"/{i}" + "A" * 8000, headers={"User-Agent": "U" * 7000})
        r = conn.getresponse()
        r.read()
        assert r.status == 404
    conn.close()
    d.wait_for_log(r'"GET /49A', timeout=10)
    logged = sum(len(line) for line in d.lines) - before
    print(f"50 requests of 15 KB: {logged} bytes of log")
    assert logged < 50 * 800, logged  # was about 15 KB per request


def test_close_without_a_code_is_1005_not_1006(chatd: Daemon) -> None:
    d = chatd  # the only 1005 and 1006 in the module daemon's log are this test's
    c = Client(d.port, "/relay/quiet")
    c.send_frame(CLOSE, b"")
    with contextlib.suppress(Closed, OSError):
        c.expect_close()
    c.sock.close()
    d.wait_for_log(r"close relay .* code=1005", timeout=10)
    dropped = Client(d.port, "/relay/quiet")
    dropped.drop()
    d.wait_for_log(r"close relay .* code=1006", timeout=10)


def test_max_total_inbound_must_fit_the_largest_message(capfd) -> None:
    from test_startup import refused_in_process

    line = refused_in_process(capfd, ["--port", "0", "--max-total-inbound", "1M"])
    assert "--max-total-inbound must be at least" in line, line
