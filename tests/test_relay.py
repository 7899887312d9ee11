"""Relay rooms on /relay/<room>: byte-exact, same opcode, sender included, isolated."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
from inproc import Site
from wsclient import BINARY, TEXT, Client, HandshakeError

from tools.daemon import Daemon


def test_text_and_binary_byte_exact_to_every_member(chatd: Daemon) -> None:
    members = [Client(chatd.port, "/relay/quotes") for _ in range(3)]
    try:
        blob = bytes(range(256)) * 4 + os.urandom(1000)
        text = "AAPL 189.5 ▲ 你好"
        members[0].send(blob)
        members[1].send(text)
        for m in members:
            assert m.recv_message() == (BINARY, blob)
            assert m.recv_message() == (TEXT, text.encode("utf-8"))
    finally:
        for m in members:
            m.close()


def test_rooms_never_see_each_other(chatd: Daemon) -> None:
    a1, a2 = Client(chatd.port, "/relay/a"), Client(chatd.port, "/relay/a")
    b1 = Client(chatd.port, "/relay/b")
    plain = Client(chatd.port, "/")
    try:
        a1.send("for a")
        b1.send("for b")
        plain.send("for the chat")
        assert a2.recv() == "for a"
        assert a1.recv() == "for a"
        assert b1.recv() == "for b"
        assert plain.recv() == f"ID{plain.local_port}: for the chat"
        # Nothing else is pending anywhere: a marker sent now is the next thing each reads.
        for c in (a1, b1):
            c.send("marker")
        assert a2.recv() == "marker"
        assert b1.recv() == "marker"
    finally:
        for c in (a1, a2, b1, plain):
            c.close()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1024 * 1024])
def test_sizes_fragmented_binary(chatd: Daemon, size: int) -> None:
    a, b = Client(chatd.port, "/relay/sizes"), Client(chatd.port, "/relay/sizes")
    try:
        blob = os.urandom(size)
        a.send_fragmented(blob, BINARY, pieces=5)
        assert b.recv_message() == (BINARY, blob)
        assert a.recv_message() == (BINARY, blob)
    finally:
        a.close()
        b.close()


def test_relay_limit_is_1009() -> None:
    d = Site("--relay-max-size", "1K")
    a, b = d.client("/relay/r"), d.client("/relay/r")
    a.send(b"z" * 1024)
    assert b.recv() == b"z" * 1024
    a.send(b"z" * 1025)
    assert a.expect_close() == 1009
    b.send("b is fine")
    assert b.recv() == "b is fine"
    b.close()


def test_room_created_on_join_and_dropped_when_empty(chatd: Daemon) -> None:
    for _ in range(3):  # join, leave, rejoin the same name: a fresh room each time
        a = Client(chatd.port, "/relay/ephemeral")
        a.send("x")
        assert a.recv() == "x"
        a.close()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/relay/", 404),
        ("/relay", 404),
        ("/relay/a/b", 404),
        ("/relay/bad%20name", 400),
        ("/relay/" + "n" * 65, 400),
        ("/relay/%2e%2e", 400),
        ("/nowhere", 404),
    ],
)
def test_bad_room_paths_refused_before_upgrade(chatd: Daemon, path: str, status: int) -> None:
    with pytest.raises(HandshakeError) as e:
        Client(chatd.port, path)
    assert e.value.status == status


def test_plain_get_on_relay_is_426(chatd: Daemon) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{chatd.port}/relay/x", timeout=5)
    assert e.value.code == 426
    assert e.value.headers["Upgrade"] == "websocket"
