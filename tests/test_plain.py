"""The seed's chat on "/", done right: real daemon, raw WebSocket clients."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from inproc import Site
from wsclient import CONT, TEXT, Client

from tools.daemon import Daemon


def clients(d: Daemon, n: int) -> list[Client]:
    return [Client(d.port, "/") for _ in range(n)]


def test_broadcast_to_three_in_seed_format(chatd: Daemon) -> None:
    a, b, c = clients(chatd, 3)
    try:
        a.send("hello")
        for who in (a, b, c):  # the sender gets its own message too
            assert who.recv() == f"ID{a.local_port}: hello"
        c.send("from c")
        for who in (a, b, c):
            assert who.recv() == f"ID{c.local_port}: from c"
    finally:
        for x in (a, b, c):
            x.close()


def test_utf8_intact_and_fragmented(chatd: Daemon) -> None:
    a, b = clients(chatd, 2)
    try:
        text = "你好，世界 — ünïcødé 🎉"
        raw = text.encode("utf-8")
        # Split inside multi-byte characters: each fragment alone is not valid UTF-8.
        a.send_fragmented(raw, TEXT, pieces=7)
        assert b.recv() == f"ID{a.local_port}: {text}"
        assert a.recv() == f"ID{a.local_port}: {text}"
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def wide() -> Iterator[Daemon]:
    """A daemon whose chat text may fill a whole 64 KiB message (``--max-text``)."""
    with Daemon("--ping-interval", "0", "--max-text", str(64 * 1024)) as d:
        yield d
    assert "Unhandled" not in d.log(), d.log()


@pytest.mark.parametrize("size", [125, 126, 16 * 1024, 65535 - 20, 65536])
def test_sizes_up_to_the_limit(chatd: Daemon, wide: Daemon, size: int) -> None:
    """The seed broke past 125 bytes; every length up to the limit arrives whole: up to
    --max-text (16 KiB), and up to 64 KiB (the largest message) with --max-text 64K."""
    a, b = clients(chatd if size <= 16 * 1024 else wide, 2)
    try:
        text = ("0123456789abcdef" * (size // 16 + 1))[:size]
        a.send_fragmented(text.encode(), TEXT, pieces=3)
        assert b.recv() == f"ID{a.local_port}: {text}"
    finally:
        a.close()
        b.close()


def test_over_the_limit_is_closed_1009_and_others_unharmed(chatd: Daemon) -> None:
    a, b = clients(chatd, 2)
    try:
        a.send("x" * (64 * 1024 + 1))
        assert a.expect_close() == 1009
        b.send("still here")
        assert b.recv() == f"ID{b.local_port}: still here"
    finally:
        b.close()


def test_text_over_max_text_is_closed_1009_not_stored_nor_sent() -> None:
    """--max-text counts bytes of UTF-8 for plain clients too; they cannot read an
    error, so the connection is closed with 1009 and the text goes nowhere."""
    d = Site("--max-text", "100")
    watcher = d.v1("watcher")
    watcher.join("lobby")
    a = d.client("/")
    assert watcher.next("presence")["event"] == "join"
    fits = "é" * 50  # 100 bytes
    a.send(fits)
    assert a.recv() == f"ID{a.local_port}: {fits}"
    a.send("é" * 50 + "x")  # 51 characters, 101 bytes
    assert a.expect_close() == 1009
    assert watcher.next("message")["text"] == fits
    assert watcher.next("presence")["event"] == "leave"  # and nothing between
    late = d.v1("late")
    assert [m["text"] for m in late.join("lobby")["history"]] == [fits]
    watcher.close()
    late.close()


def test_empty_and_blank_text_is_dropped() -> None:
    """Nothing to say: not stored, not sent (v1 members never see an empty text);
    the connection stays."""
    d = Site()
    watcher = d.v1("watcher")
    watcher.join("lobby")
    a = d.client("/")
    assert watcher.next("presence")["event"] == "join"
    for blank in ("", "   ", "\t\n \u3000"):
        a.send(blank)
    a.send("words")
    assert a.recv() == f"ID{a.local_port}: words"  # its first message back
    m = watcher.next("message")
    assert (m["id"], m["text"]) == (1, "words")
    a.close()
    watcher.close()


def test_over_the_limit_across_fragments_is_1009(chatd: Daemon) -> None:
    a = Client(chatd.port)
    a.send_fragmented(b"y" * (64 * 1024 + 10), TEXT, pieces=4)
    assert a.expect_close() == 1009


def test_binary_is_closed_1003(chatd: Daemon) -> None:
    a, b = clients(chatd, 2)
    try:
        a.send(b"\x00\x01binary")
        assert a.expect_close() == 1003
        b.send("after binary")
        assert b.recv() == f"ID{b.local_port}: after binary"
    finally:
        b.close()


def test_invalid_utf8_is_closed_1007(chatd: Daemon) -> None:
    a = Client(chatd.port)
    a.send_frame(TEXT, b"\xff\xfe bad")
    assert a.expect_close() == 1007


def test_protocol_errors_get_1002_not_a_silent_drop(chatd: Daemon) -> None:
    a = Client(chatd.port)
    a.send_frame(TEXT, b"reserved bits", rsv=0b010)
    assert a.expect_close() == 1002
    b = Client(chatd.port)
    b.send_frame(TEXT, b"unmasked", mask=False)
    assert b.expect_close() == 1002
    c = Client(chatd.port)
    c.send_frame(CONT, b"continuation with nothing to continue")
    assert c.expect_close() == 1002


def test_close_handshake_is_answered(chatd: Daemon) -> None:
    a = Client(chatd.port)
    assert a.close(1000) == 1000


def test_dropped_clients_are_removed_and_never_written_again(chatd: Daemon) -> None:
    """Clients that vanish (TCP reset, no close frame) or close cleanly leave the room."""
    keep = Client(chatd.port)
    gone = [Client(chatd.port) for _ in range(20)]
    for i, g in enumerate(gone):
        if i % 2:
            g.drop()
        else:
            g.close()
    try:
        for i in range(50):
            keep.send(f"m{i}")
        for i in range(50):
            assert keep.recv() == f"ID{keep.local_port}: m{i}"
        # A client that joins now sees only what is sent from now on.
        late = Client(chatd.port)
        keep.send("late")
        assert late.recv() == f"ID{keep.local_port}: late"
        late.close()
    finally:
        keep.close()
    assert "Traceback" not in chatd.log()


def test_half_open_handshake_does_not_block_others(chatd: Daemon) -> None:
    """A client that connects and says nothing must not hold anyone up."""
    idle = socket.create_connection(("127.0.0.1", chatd.port))
    try:
        a = Client(chatd.port)
        a.send("ok")
        assert a.recv() == f"ID{a.local_port}: ok"
        a.close()
    finally:
        idle.close()
