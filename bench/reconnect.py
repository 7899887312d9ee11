"""A restart under thousands of clients: how long until all are back, and the memory peak.

    python -m bench.reconnect [-n 2000] [--only plain,deflate]

Why: issue #13 ("deployments restart under thousands of clients", and every
browser offers permessage-deflate). Before chatd shared one deflated frame
per message, 2,000 deflate-offering clients reconnecting after a restart took
the daemon to 291 MB. For each kind (clients without compression; clients
offering permessage-deflate as Chromium does), this starts chatd, connects
``n`` clients to a relay room (python ``websockets``, one asyncio process,
each reconnecting as the page does: 0.5 s doubling to 10 s, times 0.5-1
jitter), sends one message to the room so every connection has used its
compression path, stops chatd with SIGTERM (clients are closed with 1001),
starts a new chatd on the same port, and measures:

- ``down_s``: from the SIGTERM until the new chatd listens (the old one's
  shutdown and the new one's start-up: no client can connect meanwhile);
- ``back_s``: from the new chatd listening until every client is connected
  again (bounded: 120 s). The clients' back-off is part of it: a client
  refused while chatd was down waits its next delay (up to 1 s after two
  refusals) before it tries again, so a fraction of a second to a second
  or two of ``back_s`` is the clients waiting, not chatd working;
- ``back_mib``: the new chatd's highest RSS until all are back (sampled
  every 20 ms); ``peak_mib``: its highest from listening until one more
  message went to all of them (what a first message costs shows here);
  ``after_mib``: its RSS then.

With BENCH_BASELINE=<another checkout of chatd> (as for bench.run) each kind
also runs on that chatd ("<kind> base"). For the deflate kind, every
client must have negotiated permessage-deflate after the restart, or the row
fails. Results go to stdout and to
bench/RESULTS-reconnect.md. The clients share the machine with chatd (two
cores here), so ``back_s`` includes their own handshake work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import threading
import time
from typing import Any

import websockets

from bench.run import REPO, machine
from tools.daemon import Daemon, twistd

RESULTS = REPO / "bench" / "RESULTS-reconnect.md"
BASELINE = os.environ.get("BENCH_BASELINE", "")
KINDS = {"plain": None, "deflate": "deflate"}
WAIT = 120.0  # seconds anything may take


class Sampler(threading.Thread):
    """The highest RSS of ``pid`` while it runs, every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)


def start(port: int, tree: str) -> Daemon:
    argv = [twistd(), "-n", "--pidfile=", "chatd", "--ping-interval", "0"]
    argv += ["--listen-backlog", "4096", "--port", str(port)]
    env = {"PYTHONPATH": tree} if tree else None
    return Daemon(argv=argv, timeout=60, env=env)


class Clients:
    """``n`` relay clients that stay connected, reconnecting as the page does."""

    def __init__(self, url: str, n: int, compression: str | None) -> None:
        self.url, self.n, self.compression = url, n, compression
        self.connected: set[int] = set()
        self.compressing: set[int] = set()  # connected with permessage-deflate negotiated
        self.received = 0
        self.done = False
        self.changed = asyncio.Event()

    async def one(self, i: int) -> None:
        delay = 0.5
        while not self.done:
            try:
                async with websockets.connect(
                    self.url,
                    compression=self.compression,
                    open_timeout=30,
                    ping_interval=None,
                    max_size=None,
                ) as ws:
                    self.connected.add(i)
                    if ws.response is not None and ws.response.headers.get(
                        "Sec-WebSocket-Extensions", ""
                    ).startswith("permessage-deflate"):
                        self.compressing.add(i)
                    self.changed.set()
                    delay = 0.5
                    async for _ in ws:
                        self.received += 1
                        self.changed.set()
            except (TimeoutError, OSError, websockets.exceptions.WebSocketException):
                pass
            self.connected.discard(i)
            self.compressing.discard(i)
            self.changed.set()
            if self.done:
                return
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 10.0)

    async def until(self, check: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {WAIT} s ({len(self.connected)} connected)")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


async def post(port: int, n_expected: int, clients: Clients) -> None:
    """One message to the room; waits until every client got it."""
    before = clients.received
    async with websockets.connect(f"ws://127.0.0.1:{port}/relay/bench", compression=None) as ws:
        await ws.send("x" * 200)
        await clients.until(lambda: clients.received - before >= n_expected, "the message")


async def measure(kind: str, n: int, tree: str) -> dict[str, float]:
    first = await asyncio.to_thread(start, 0, tree)
    port = first.port
    clients = Clients(f"ws://127.0.0.1:{port}/relay/bench", n, KINDS[kind])
    tasks = []
    for i in range(n):  # opened in batches, as a page load would spread them
        tasks.append(asyncio.create_task(clients.one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    second: Daemon | None = None
    try:
        await clients.until(lambda: len(clients.connected) == n, "all connected")
        await post(port, n, clients)
        before_mib = first.rss_kib() / 1024
        stopping = time.monotonic()
        await asyncio.to_thread(first.stop)
        await clients.until(lambda: not clients.connected, "all dropped")
        second = await asyncio.to_thread(start, port, tree)
        listening = time.monotonic()
        down_s = listening - stopping
        sampler = Sampler(second.pid)
        sampler.start()
        await clients.until(lambda: len(clients.connected) == n, "all back")
        back_s = time.monotonic() - listening
        back_mib = sampler.peak / 1024
        compressing = len(clients.compressing)
        if compressing != (n if KINDS[kind] else 0):
            raise RuntimeError(f"{compressing} of {n} connections negotiated permessage-deflate")
        await post(port, n, clients)
        sampler.running = False
        after_mib = second.rss_kib() / 1024
        return {
            "before_mib": before_mib,
            "down_s": down_s,
            "back_s": back_s,
            "back_mib": back_mib,
            "peak_mib": max(sampler.peak / 1024, after_mib),
            "after_mib": after_mib,
        }
    finally:
        clients.done = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in (first, second):
            if d is not None:
                await asyncio.to_thread(d.stop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="clients (default 2000)")
    ap.add_argument("--only", default="", help="kinds, comma-separated (plain,deflate)")
    args = ap.parse_args()
    kinds = [k for k in KINDS if not args.only or k in args.only.split(",")]
    runs = [(k, "") for k in kinds] + ([(k, BASELINE) for k in kinds] if BASELINE else [])
    rows = []
    for kind, tree in runs:
        name = f"{kind} base" if tree else kind
        print(f"{name}: {args.n} clients ...", flush=True)
        try:
            r = asyncio.run(measure(kind, args.n, tree))
        except Exception as e:  # a row that failed says so; the others still run
            print(f"  failed: {e}")
            rows.append(f"| {name} | failed: {e} | | | | | |")
            continue
        print(
            f"  down {r['down_s']:.1f} s, back in {r['back_s']:.1f} s; "
            f"RSS before {r['before_mib']:.0f} MiB, until all back {r['back_mib']:.0f} MiB, "
            f"peak {r['peak_mib']:.0f} MiB, after {r['after_mib']:.0f} MiB"
        )
        rows.append(
            f"| {name} | {r['down_s']:.1f} | {r['back_s']:.1f} | {r['before_mib']:.0f} "
            f"| {r['back_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['after_mib']:.0f} |"
        )
    text = (
        f"# A restart under {args.n} clients (python -m bench.reconnect)\n\n"
        f"{machine()}; {time.strftime('%Y-%m-%d')}. Relay room, one message before the "
        "restart and one after; clients reconnect as the page does. All rows come from "
        "this one run, one after the other, on a machine shared with other work; the "
        "clients and chatd share its cores.\n\n"
        "| clients | down (s) | all back after (s) | RSS before restart (MiB) | RSS peak "
        "until all back (MiB) | RSS peak with the message after (MiB) | after (MiB) |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
