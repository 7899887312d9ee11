"""chatd.client (the Python client) against the real daemon on a loopback port.

Each scenario is an asyncio coroutine run with ``asyncio.run`` inside a plain
test function; every wait is bounded (``asyncio.wait_for`` or an event
stream's ``next(timeout)``). Daemons are this module's own, stopped by pid;
a restart is a second Daemon on the same port and in the same directory
(the same history database).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from chatd.client import ChatdError, Client, ClientClosed, Event, Events
from tools.daemon import REPO, Daemon, child_env

SECRET = "s3cret-" * 6
WAIT = 20.0  # the bound of any single wait


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(coro)`` in a thread of its own, bounded: the suite's main thread may
    have an event loop running already (Playwright's sync API, in the browser tests)."""
    out: dict[str, Any] = {}

    def main() -> None:
        try:
            out["result"] = asyncio.run(asyncio.wait_for(coro, 120))
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=main, name="asyncio scenario", daemon=True)
    t.start()
    t.join(150)
    assert not t.is_alive(), "the scenario did not end"
    if "error" in out:
        raise out["error"]
    return out.get("result")


async def until(stream: Events, check: Callable[[Event], bool], timeout: float = WAIT) -> Event:
    """The next event of ``stream`` that passes ``check`` (other events are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        ev = await stream.next(max(0.01, deadline - time.monotonic()))
        if check(ev):
            return ev


async def texts(stream: Events, n: int) -> list[tuple[int, str]]:
    """The next ``n`` messages of ``stream``: (id, text)."""
    out = []
    for _ in range(n):
        m = await until(stream, lambda e: e["type"] == "message")
        out.append((m["id"], m["text"]))
    return out


class Restartable:
    """A daemon that can be stopped and started again on the same port and database."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.cwd, self.args = str(tmp), args
        self.d: Daemon | None = Daemon(*args, "--ping-interval", "0", "--port", "0", cwd=self.cwd)
        self.port = self.d.port

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.d is not None:
            self.d.stop(sig)
            assert "Unhandled" not in self.d.log(), self.d.log()
            self.d = None

    def start(self, cwd: str | None = None) -> Daemon:
        """Start again on the same port; in ``cwd`` (another database), or the same one."""
        self.cwd = cwd or self.cwd
        args = (*self.args, "--ping-interval", "0", "--port", str(self.port))
        self.d = Daemon(*args, cwd=self.cwd)
        return self.d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Restartable]:
    s = Restartable(tmp_path)
    yield s
    s.stop()


def test_send_receive_history_edit_react_typing_read_between_two_clients(server) -> None:
    async def scenario() -> None:
        alice = await Client(url(server.port), nick="alice").connect(WAIT)
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        events = bob.events()
        # callbacks, plain and async, for one type or all
        presence: list[str] = []
        everything: list[str] = []
        came = asyncio.Event()

        async def on_any(ev: Event) -> None:
            everything.append(ev["type"])
            if ev["type"] == "presence":
                came.set()

        alice.on("presence", lambda ev: presence.append(f"{ev['nick']} {ev['event']}"))
        alice.on("*", on_any)
        joined = await asyncio.wait_for(alice.join("tea"), WAIT)
        assert joined["members"] == ["alice"] and joined["history"] == []
        joined = await asyncio.wait_for(bob.join("tea"), WAIT)
        assert joined["members"] == ["alice", "bob"]
        await asyncio.wait_for(came.wait(), WAIT)
        assert presence == ["bob join"] and everything == ["joined", "presence"]
        m = await asyncio.wait_for(alice.send("tea", "hello bob"), WAIT)
        assert (m["id"], m["from"], m["text"]) == (1, "alice", "hello bob")
        got = await until(events, lambda e: e["type"] == "message")
        assert (got["id"], got["text"]) == (1, "hello bob")
        await alice.typing("tea")
        t = await until(events, lambda e: e["type"] == "typing")
        assert t["name"] == "alice"
        await asyncio.wait_for(bob.send("tea", "hi alice"), WAIT)
        # joined while the room was empty: its epoch comes with the next joined
        assert bob.last_id("tea") == 2 and bob.epoch("tea") is None
        e = await asyncio.wait_for(alice.edit("tea", 1, "hello, bob"), WAIT)
        assert (e["kind"], e["target"], e["text"]) == ("edit", 1, "hello, bob")
        r = await asyncio.wait_for(bob.react("tea", 1, "👍"), WAIT)
        assert (r["kind"], r["emoji"]) == ("react", "👍")
        await asyncio.wait_for(bob.unreact("tea", 1, "👍"), WAIT)
        with pytest.raises(ChatdError) as err:
            await asyncio.wait_for(bob.delete("tea", 1), WAIT)  # alice's message
        assert err.value.code == "forbidden"
        d = await asyncio.wait_for(alice.delete("tea", 1), WAIT)
        assert d["kind"] == "delete"
        page = await asyncio.wait_for(bob.history("tea", before=3, limit=10), WAIT)
        assert [(x["id"], x.get("deleted", False)) for x in page["messages"]] == [
            (1, True),
            (2, False),
        ]
        await bob.read("tea", 2)
        rd = await until(events, lambda e: e["type"] == "read" and e["name"] == "bob")
        assert rd["id"] == 2
        assert bob.last_id("tea") == 6  # 2 messages, an edit, a react, an unreact, a delete
        left = await asyncio.wait_for(alice.leave("tea"), WAIT)
        assert left["type"] == "left"
        p = await until(events, lambda e: e["type"] == "presence" and e["event"] == "leave")
        assert p["nick"] == "alice"
        with pytest.raises(ChatdError) as err:
            await asyncio.wait_for(alice.send("tea", "not in it"), WAIT)
        assert err.value.code == "not_joined"
        await alice.close()
        await bob.close()
        assert alice.state == bob.state == "closed"
        with pytest.raises(ClientClosed):
            await alice.send("tea", "closed")

    run(scenario())


def test_a_join_with_pages_is_merged_and_duplicates_are_filtered(server) -> None:
    async def scenario() -> None:
        alice = await Client(url(server.port), nick="alice").connect(WAIT)
        await asyncio.wait_for(alice.join("big"), WAIT)
        for i in range(20):  # 20 x 8 KiB: more than one 64 KiB page
            await asyncio.wait_for(alice.send("big", f"{i:02d}" + "x" * 8190), WAIT)
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        events = bob.events(["message"])
        joined = await asyncio.wait_for(bob.join("big"), WAIT)
        assert [m["id"] for m in joined["history"]] == list(range(1, 21))
        assert "more" not in joined and bob.last_id("big") == 20
        # A message seen already (the same id in the same epoch) is not passed on.
        m = await asyncio.wait_for(alice.send("big", "21"), WAIT)
        assert (await events.next(WAIT))["id"] == 21
        bob._dispatch(dict(m))  # the same frame again, as a replay or a retry's answer could
        bob._dispatch({**m, "id": 5})
        await asyncio.wait_for(alice.send("big", "22"), WAIT)
        assert (await events.next(WAIT))["id"] == 22
        # Joining again (a resynchronisation) replays nothing seen.
        again = await asyncio.wait_for(bob.join("big"), WAIT)
        assert again["recovered"] is True and again["history"] == []
        await asyncio.wait_for(alice.send("big", "23"), WAIT)
        assert (await events.next(WAIT))["id"] == 23
        await alice.close()
        await bob.close()

    run(scenario())


class Gated(Client):
    """A client whose reconnects wait for ``gate`` (so a test can post meanwhile)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()

    async def _connection(self) -> tuple[bool, int | None, str]:
        await self.gate.wait()
        return await super()._connection()


def test_the_daemon_restarts_and_the_client_recovers_what_was_sent_meanwhile(server) -> None:
    async def scenario() -> None:
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        await asyncio.wait_for(bob.join("tea"), WAIT)
        await asyncio.wait_for(bob.send("tea", "before 0"), WAIT)  # the room's epoch begins
        alice = await Gated(url(server.port), nick="alice", backoff_max=1.0).connect(WAIT)
        events = alice.events()
        joined = await asyncio.wait_for(alice.join("tea"), WAIT)
        assert [m["text"] for m in joined["history"]] == ["before 0"]
        epoch = alice.epoch("tea")
        assert epoch is not None and epoch == joined["epoch"]
        for i in range(1, 3):
            await asyncio.wait_for(bob.send("tea", f"before {i}"), WAIT)
        assert await texts(events, 2) == [(2, "before 1"), (3, "before 2")]
        alice.gate.clear()
        await bob.close()
        server.stop()
        await until(events, lambda e: e["type"] == "state" and e["state"] == "reconnecting")
        server.start()
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        await asyncio.wait_for(bob.join("tea"), WAIT)
        for i in range(5):
            await asyncio.wait_for(bob.send("tea", f"meanwhile {i}"), WAIT)
        t0 = time.monotonic()
        alice.gate.set()
        rejoined = await until(events, lambda e: e["type"] == "joined")
        assert rejoined["rejoin"] is True and rejoined["recovered"] is True
        assert rejoined["epoch"] == epoch and "reset" not in rejoined
        got = await texts(events, 5)
        took = time.monotonic() - t0
        assert got == [(4 + i, f"meanwhile {i}") for i in range(5)]
        await asyncio.wait_for(bob.send("tea", "live"), WAIT)
        assert await texts(events, 1) == [(9, "live")]  # nothing twice, nothing skipped
        assert alice.connections == 2
        print(f"\nreconnect (gate open) to the first recovered message: {took * 1000:.0f} ms")
        await alice.close()
        await bob.close()

    run(scenario())


def test_a_daemon_that_lost_its_history_resets_the_room(server, tmp_path) -> None:
    async def scenario() -> None:
        alice = await Client(url(server.port), nick="alice", backoff_max=1.0).connect(WAIT)
        await asyncio.wait_for(alice.join("tea"), WAIT)
        for i in range(3):
            await asyncio.wait_for(alice.send("tea", f"old {i}"), WAIT)
        await asyncio.wait_for(alice.join("tea"), WAIT)  # learns the epoch
        old_epoch = alice.epoch("tea")
        assert old_epoch is not None and alice.last_id("tea") == 3
        events = alice.events()
        server.stop()
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        server.start(str(fresh))  # a new, empty database: ids start again at 1
        reset = await until(events, lambda e: e["type"] in ("reset", "joined"))
        assert reset["type"] == "reset" and reset["room"] == "tea"  # forget the room's ids
        rejoined = await until(events, lambda e: e["type"] == "joined")
        assert rejoined["rejoin"] is True and rejoined["reset"] is True
        assert rejoined["recovered"] is False and rejoined["reason"] == "epoch"
        assert alice.last_id("tea") == 0 and alice.epoch("tea") is None  # empty: no epoch yet
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        await asyncio.wait_for(bob.join("tea"), WAIT)
        await asyncio.wait_for(bob.send("tea", "new 1"), WAIT)
        # id 1 again, in another epoch: not taken for a duplicate
        assert await texts(events, 1) == [(1, "new 1")]
        await asyncio.wait_for(bob.send("tea", "new 2"), WAIT)
        assert await texts(events, 1) == [(2, "new 2")]
        await alice.close()
        await bob.close()

    run(scenario())


def test_a_dropped_connection_is_back_with_the_defaults_and_recovers(server) -> None:
    async def scenario() -> None:
        alice = await Client(url(server.port), nick="alice").connect(WAIT)  # default backoff
        events = alice.events()
        await asyncio.wait_for(alice.join("tea"), WAIT)
        bob = await Client(url(server.port), nick="bob").connect(WAIT)
        await asyncio.wait_for(bob.join("tea"), WAIT)
        await asyncio.wait_for(bob.send("tea", "one"), WAIT)
        assert await texts(events, 1) == [(1, "one")]
        ws = alice._ws
        assert ws is not None
        dropped = time.monotonic()
        ws.transport.abort()  # the network went away
        drop = await until(events, lambda e: e["type"] == "state" and e["state"] == "waiting")
        assert drop["code"] == 1006
        await asyncio.wait_for(bob.send("tea", "two"), WAIT)  # while alice is away
        assert await texts(events, 1) == [(2, "two")]
        took = time.monotonic() - dropped
        assert alice.connections == 2
        await asyncio.wait_for(bob.send("tea", "three"), WAIT)
        assert await texts(events, 1) == [(3, "three")]
        print(f"\ndrop to the first recovered message (default backoff): {took * 1000:.0f} ms")
        await alice.close()
        await bob.close()

    run(scenario())


class DropsAcks(Client):
    """A client that loses the answer to its next send (as when the connection drops
    between the server storing a message and its acknowledgement arriving)."""

    drop_next_ack = False

    def _dispatch(self, f: Event) -> None:
        if self.drop_next_ack and f.get("type") == "message" and f.get("ref") in self._pending:
            self.drop_next_ack = False
            ws = self._ws
            assert ws is not None
            ws.transport.abort()  # the connection is gone before the answer was read
            return
        super()._dispatch(f)


def test_an_unacknowledged_send_is_retried_and_stored_once(server) -> None:
    async def scenario() -> None:
        alice = await DropsAcks(url(server.port), nick="alice", backoff_max=1.0).connect(WAIT)
        mine = alice.events(["message"])
        await asyncio.wait_for(alice.join("tea"), WAIT)
        bob = await Client(url(server.port), nick="bob", backoff_max=1.0).connect(WAIT)
        theirs = bob.events(["message"])
        await asyncio.wait_for(bob.join("tea"), WAIT)

        # 1. Stored, answer lost: the retry (same cid) is answered with the stored message;
        # alice also gets it in her re-join's replay, and sees it once.
        alice.drop_next_ack = True
        m = await asyncio.wait_for(alice.send("tea", "once"), WAIT)
        assert (m["id"], m["text"]) == (1, "once")
        assert alice.connections == 2
        assert await texts(mine, 1) == [(1, "once")]
        assert await texts(theirs, 1) == [(1, "once")]

        # 2. The daemon killed right after a send: whether it stored it or not, the send
        # is answered once it is back, and the room has it once.
        t0 = time.monotonic()
        sending = asyncio.ensure_future(alice.send("tea", "through a crash"))
        await asyncio.sleep(0)  # the frame is written
        server.stop(signal.SIGKILL)
        killed = time.monotonic()
        server.start()
        started = time.monotonic()
        m = await asyncio.wait_for(sending, WAIT)
        acked = time.monotonic()
        assert (m["id"], m["text"]) == (2, "through a crash")
        assert await texts(theirs, 1) == [(2, "through a crash")]
        got = time.monotonic()
        await asyncio.wait_for(bob.send("tea", "after"), WAIT)
        assert await texts(theirs, 1) == [(3, "after")]
        assert await texts(mine, 2) == [(2, "through a crash"), (3, "after")]
        page = await asyncio.wait_for(bob.history("tea"), WAIT)
        assert [(x["id"], x["text"]) for x in page["messages"]] == [
            (1, "once"),
            (2, "through a crash"),
            (3, "after"),
        ]
        print(
            f"\nkill -9 to restart {1000 * (killed - t0):.0f} ms; daemon start "
            f"{1000 * (started - killed):.0f} ms; listening to the retried send answered "
            f"{1000 * (acked - started):.0f} ms, to the other member's recovered copy "
            f"{1000 * (got - started):.0f} ms"
        )
        await alice.close()
        await bob.close()

    run(scenario())


def token(exp: float, sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "exp": int(exp), "rooms": {"*": "rw"}}, SECRET, "HS256")


def test_a_token_client_refreshes_and_outlives_its_first_token(tmp_path) -> None:
    # Tokens 20 s past exp are still accepted (60 s of clock difference is forgiven),
    # but the server closes such a connection 25 s after exp: in about 5 s.
    server = Restartable(tmp_path, "--auth", "token", "--jwt-key", SECRET)
    refreshed: list[float] = []

    async def fresh() -> str:
        refreshed.append(time.time())
        return token(time.time() + 600)

    async def scenario() -> None:
        old = token(time.time() - 20)
        keeper = Client(url(server.port), token=old, token_refresh=fresh, refresh_margin=30)
        await keeper.connect(WAIT)
        plain = await Client(url(server.port), token=old, backoff_max=1.0).connect(WAIT)
        assert keeper.user == plain.user == "alice"
        ends = plain.events(["state"])
        await asyncio.wait_for(keeper.join("tea"), WAIT)
        closed = await until(ends, lambda e: e["state"] == "closed", timeout=40)
        assert "4001" in closed["reason"]
        # The one with a refresh callback is still on its first connection, past the
        # deadline, and works.
        assert keeper.state == "connected" and keeper.connections == 1 and refreshed
        assert keeper.exp is not None and keeper.exp > time.time() + 500
        m = await asyncio.wait_for(keeper.send("tea", "still here"), WAIT)
        assert m["user"] == "alice"
        await keeper.close()

    try:
        run(scenario())
    finally:
        server.stop()


def test_a_refused_token_is_replaced_through_the_callback(tmp_path) -> None:
    server = Restartable(tmp_path, "--auth", "token", "--jwt-key", SECRET)

    async def scenario() -> None:
        c = Client(
            url(server.port),
            token=token(time.time() - 3600),  # expired: hello is refused, then 4001
            token_refresh=lambda: token(time.time() + 600),
            backoff_max=1.0,
        )
        await c.connect(WAIT)
        assert c.connections == 1 and c.user == "alice"
        await c.close()
        nick = Client(url(server.port), nick="bob", reconnect=True)
        with pytest.raises(ClientClosed):
            await nick.connect(WAIT)  # no token where one is needed, and no way to get one
        assert "unauthorized" in (nick.close_reason or "")

    try:
        run(scenario())
    finally:
        server.stop()


def test_the_example_bot_answers(server) -> None:
    argv = [sys.executable, str(REPO / "examples" / "bot.py"), "--url", url(server.port)]
    bot = subprocess.Popen(
        [*argv, "--nick", "timebot", "--room", "lobby", "--ready"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in bot.stdout or ()], daemon=True
        ).start()
        line = ""
        while line.strip() != "ready":
            line = lines.get(timeout=WAIT)

        async def scenario() -> None:
            c = await Client(url(server.port), nick="carol").connect(WAIT)
            events = c.events(["message"])
            await asyncio.wait_for(c.join("lobby"), WAIT)
            await asyncio.wait_for(c.send("lobby", "!echo hello there"), WAIT)
            reply = await until(events, lambda e: e["from"] == "timebot")
            assert reply["text"] == "hello there"
            await asyncio.wait_for(c.send("lobby", "!time"), WAIT)
            reply = await until(events, lambda e: e["from"] == "timebot")
            assert reply["text"].endswith(" UTC") and reply["text"][:4].isdigit()
            await asyncio.wait_for(c.send("lobby", "just talk"), WAIT)
            await asyncio.wait_for(c.send("lobby", "!help"), WAIT)
            reply = await until(events, lambda e: e["from"] == "timebot")
            assert reply["text"].startswith("commands:")  # nothing answered "just talk"
            await c.close()

        run(scenario())
    finally:
        bot.send_signal(signal.SIGTERM)
        try:
            bot.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            os.kill(bot.pid, signal.SIGKILL)
            bot.wait(timeout=5)
    out = ""
    with contextlib.suppress(queue.Empty):
        while True:
            out += lines.get(timeout=1)
    assert bot.returncode == 0, out
    assert "closed: closed by the client" in out, out
