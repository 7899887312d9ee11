"""Cross-node fan-out: what a message costs when it goes through Redis to another node.

    python -m bench.cluster [--quick]

Three set-ups of the chatd.v1 room ``bench`` (history on), each fresh, under
the same C generator (bench/loadgen.c) as bench/run.py:

- ``single``: one node, history in SQLite, no Redis (the default daemon);
- ``single+redis``: one node with ``--redis``: every message goes through the
  Lua script and comes back on the node's own pub/sub connection;
- ``cross-node``: two nodes with ``--redis``; the publisher is on node A and
  the other N-1 members are on node B, so every delivery crossed Redis.

Every server-side process (the nodes and redis-server) is pinned to CPU 0
and the generator to CPU 1, so the figures compare one core's worth of
server either way. Measured: closed-loop deliveries/s at N=100 and 1000,
latency p50/p99 at 50 msg/s to N members, the server side's CPU per
delivery, and what Redis holds per message and per member. Results go to
stdout and bench/RESULTS-cluster.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from bench.run import (
    GEN_BOUND,
    SERVER_CPU,
    V1_SETUP,
    ChatdServer,
    Load,
    ServerSpec,
    build_loadgen,
    fanout_window,
    log,
    machine,
    proc_cpu_s,
    versions,
)
from tools.daemon import REPO
from tools.redis import RedisServer

RESULTS = REPO / "bench" / "RESULTS-cluster.md"
SPEC = ServerSpec(
    "v1",
    "chatd v1",
    chatd_args=("--history-size", "1000", "--max-backlog", "64M"),
    proto="chatd.v1",
    setup=V1_SETUP,
    wrap='{"type":"send","room":"bench","text":"{p}"}',
)


@dataclass
class Setup:
    name: str
    redis: RedisServer | None
    nodes: list[ChatdServer]

    @property
    def pids(self) -> list[int]:
        pids = [n.pid for n in self.nodes]
        if self.redis is not None and self.redis.proc is not None:
            pids.append(self.redis.proc.pid)
        return pids

    @property
    def members_port(self) -> int:
        return self.nodes[-1].port

    @property
    def pub_port(self) -> int:
        return self.nodes[0].port


class _Sum:
    """Looks like one server to ``Load``: CPU summed over every server-side process."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.pid = setup.nodes[-1].pid
        self.port = setup.members_port

    def cpu(self) -> float:
        return sum(proc_cpu_s(p) for p in self.setup.pids)


class SumLoad(Load):
    def mark(self):
        m = super().mark()
        m.cpu = self.server.cpu()  # type: ignore[attr-defined]
        return m


@contextlib.contextmanager
def started(name: str) -> Iterator[Setup]:
    redis = None if name == "single" else RedisServer()
    nodes: list[ChatdServer] = []
    try:
        if redis is not None and SERVER_CPU is not None and redis.proc is not None:
            subprocess.run(
                ["taskset", "-p", "-c", str(SERVER_CPU), str(redis.proc.pid)],
                check=True,
                capture_output=True,
            )
        extra: tuple[str, ...] = () if redis is None else ("--redis", redis.url)
        for _ in range(2 if name == "cross-node" else 1):
            n = ChatdServer(SPEC, extra)
            if redis is not None:
                n.daemon.wait_for_log(r"redis redis://\S+ connected", 15)
            nodes.append(n)
        yield Setup(name, redis, nodes)
    finally:
        for n in nodes:
            n.stop()
        if redis is not None:
            redis.close()


def run_load(setup: Setup, mode: str, args: list[str], timeout: float) -> tuple[dict, SumLoad]:
    if len(setup.nodes) > 1:
        args = [*args, "--pub-port", str(setup.pub_port)]
    gen = SumLoad(_Sum(setup), SPEC, mode, args, timeout)  # type: ignore[arg-type]
    try:
        result = gen.result()
        # Redis's footprint while the members are still there (they leave at finish).
        gen.footprint = redis_footprint(setup)  # type: ignore[attr-defined]
        return result, gen
    finally:
        gen.finish()


def redis_footprint(setup: Setup) -> dict[str, float]:
    r = setup.redis
    if r is None:
        return {}
    out: dict[str, float] = {}
    xlen = int(r.command("XLEN", "chatd:c:{bench}:log"))
    mem = int(r.command("MEMORY", "USAGE", "chatd:c:{bench}:log", "SAMPLES", "0"))
    if xlen:
        out["bytes_per_message"] = mem / xlen
    hlen = int(r.command("HLEN", "chatd:c:{bench}:m"))
    if hlen:  # (MEMORY USAGE of a key that is gone is nil)
        mem = int(r.command("MEMORY", "USAGE", "chatd:c:{bench}:m", "SAMPLES", "0"))
        out["bytes_per_member"] = mem / hlen
    return out


def measure(name: str, ns: tuple[int, ...], deliveries: int, lat_n: int, lat_s: float) -> dict:
    res: dict = {"name": name}
    for n in ns:
        window = fanout_window(n)
        messages = max(2 * window, deliveries // n)
        args = ["-n", str(n), "-m", str(messages), "--window", str(window), "--runs", "3"]
        args += ["--size", "64", "--setup", SPEC.setup]
        with started(name) as setup:
            r, gen = run_load(setup, "fanout", args, 300)
            footprint = gen.footprint  # type: ignore[attr-defined]
        runs = [x for x in r.get("runs", []) if x["complete"]]
        for i, x in enumerate(r.get("runs", [])):
            a, b = gen.marks.get(f"start{i}"), gen.marks.get(f"end{i}")
            if a and b:
                x["server_cpu_s"] = b.cpu - a.cpu
        if not runs:
            res[f"fanout{n}"] = None
            log(f"  {name} N={n}: {r.get('error')}")
            continue
        med = sorted(runs, key=lambda x: x["deliveries_per_s"])[len(runs) // 2]
        res[f"fanout{n}"] = med["deliveries_per_s"]
        res[f"fanout{n}_bound"] = med["gen_cpu_share"] > GEN_BOUND
        res[f"fanout{n}_us"] = med.get("server_cpu_s", 0) / med["deliveries"] * 1e6
        res.update(footprint)
        log(f"  {name} N={n}: {med['deliveries_per_s']:,.0f} deliveries/s")
    args = ["-n", str(lat_n), "--rate", "50", "--duration", str(lat_s), "--size", "64"]
    args += ["--setup", SPEC.setup]
    with started(name) as setup:
        r, gen = run_load(setup, "latency", args, lat_s + 120)
    a, b = gen.marks.get("start"), gen.marks.get("end")
    if r.get("p50_ms", -1) >= 0 and a and b:
        res["p50"], res["p99"] = r["p50_ms"], r["p99_ms"]
        res["lat_us"] = (b.cpu - a.cpu) / max(r["deliveries"], 1) * 1e6
        res["lost"] = r["expected"] - r["deliveries"]
        log(f"  {name} latency: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms")
    return res


def outage(down_s: float = 5.0, rate: float = 20.0) -> dict:
    """Redis stopped for ``down_s`` under a steady chat: what clients see, measured.

    A sender on node A posts ``rate`` msg/s; a reader on node B; /healthz of
    A polled every 50 ms. Counts acknowledged sends (the sender got its
    message back), refused ones (``unavailable``), and acknowledged ones the
    reader never got (must be 0).
    """
    import http.client
    import threading
    import time

    sys.path.insert(0, str(REPO / "tests"))
    from v1client import V1

    res: dict = {}
    with RedisServer() as redis:
        nodes = [
            ChatdServer(SPEC, ("--redis", redis.url, "--rate", "1000", "--rate-burst", "1000"))
            for _ in range(2)
        ]
        try:
            for n in nodes:
                n.daemon.wait_for_log(r"redis redis://\S+ connected", 15)
            sender, reader = V1(nodes[0].port, "sender"), V1(nodes[1].port, "reader")
            sender.join("r")
            reader.join("r")
            t0 = time.monotonic()
            acked: dict[int, float] = {}
            refused: dict[int, float] = {}
            got: set[str] = set()
            health: list[tuple[float, int]] = []
            stop = threading.Event()

            def read_sender() -> None:
                while not stop.is_set():
                    try:
                        obj = sender.next()
                    except Exception:
                        return
                    if obj["type"] == "message":
                        acked[obj["ref"]] = time.monotonic() - t0
                    elif obj["type"] == "error":
                        refused[obj["ref"]] = time.monotonic() - t0

            def read_reader() -> None:
                while not stop.is_set():
                    try:
                        obj = reader.next()
                    except Exception:
                        return
                    if obj["type"] == "message":
                        got.add(obj["text"])

            def poll() -> None:
                while not stop.is_set():
                    c = http.client.HTTPConnection("127.0.0.1", nodes[0].port, timeout=2)
                    try:
                        c.request("GET", "/healthz")
                        health.append((time.monotonic() - t0, c.getresponse().status))
                    except OSError:
                        pass
                    finally:
                        c.close()
                    time.sleep(0.05)

            threads = [
                threading.Thread(target=f, daemon=True) for f in (read_sender, read_reader, poll)
            ]
            for t in threads:
                t.start()
            total = int(rate * (down_s + 8))
            stop_at, start_at = 3.0, 3.0 + down_s
            stopped = started_again = None
            for k in range(total):
                now = time.monotonic() - t0
                if stopped is None and now >= stop_at:
                    redis.stop()
                    stopped = time.monotonic() - t0
                if stopped is not None and started_again is None and now >= start_at:
                    redis.start()
                    started_again = time.monotonic() - t0
                sender.say("r", f"m{k}", ref=k)
                time.sleep(max(0.0, (k + 1) / rate - (time.monotonic() - t0)))
            time.sleep(2)
            stop.set()
            assert stopped is not None and started_again is not None
            degraded = next((t for t, st in health if t >= stopped and st == 503), None)
            ok_again = next((t for t, st in health if t >= started_again and st == 200), None)
            first_ack = min((t for t in acked.values() if t >= started_again), default=None)
            res = {
                "sent": total,
                "acknowledged": len(acked),
                "refused_unavailable": len(refused),
                "unanswered": total - len(acked) - len(refused),
                "acked_not_received_on_other_node": len({f"m{k}" for k in acked} - got),
                "redis_down_s": started_again - stopped,
                "healthz_degraded_after_s": None if degraded is None else degraded - stopped,
                "healthz_ok_after_restart_s": None
                if ok_again is None
                else ok_again - started_again,
                "first_ack_after_restart_s": None
                if first_ack is None
                else first_ack - started_again,
            }
        finally:
            for n in nodes:
                n.stop()
    return res


def footprint(rooms: int = 1000, messages: int = 5000) -> dict:
    """Redis memory: per room (with one message and no members) and per stored message.

    Posts through the push API of one node; reads INFO's used_memory before
    and after.
    """
    import http.client
    import json

    token = "bench-footprint-token-0123456789"

    def used(r: RedisServer) -> int:
        info = r.command("INFO", "memory").decode()
        return int(
            next(ln.split(":")[1] for ln in info.splitlines() if ln.startswith("used_memory:"))
        )

    def post(port: int, room: str, text: str) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"text": text}).encode()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        c.request("POST", f"/api/rooms/{room}/messages", body, headers)
        assert c.getresponse().status == 201
        c.close()

    with RedisServer() as redis:
        n = ChatdServer(
            SPEC, ("--redis", redis.url, "--api-token", token, "--history-size", "10000")
        )
        try:
            n.daemon.wait_for_log(r"redis redis://\S+ connected", 15)
            text = "x" * 64
            before = used(redis)
            for k in range(rooms):
                post(n.port, f"room{k}", text)
            per_room = (used(redis) - before) / rooms
            before = used(redis)
            for _ in range(messages):
                post(n.port, "big", text)
            per_message = (used(redis) - before) / messages
        finally:
            n.stop()
    return {"bytes_per_room_with_one_message": per_room, "bytes_per_message_64B": per_message}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller loads (a smoke run)")
    opts = ap.parse_args()
    build_loadgen()
    ns = (100, 1000)
    deliveries = 60_000 if opts.quick else 300_000
    lat_n, lat_s = (200, 2.0) if opts.quick else (1000, 10.0)
    results = []
    for name in ("single", "single+redis", "cross-node"):
        log(f"{name}:")
        results.append(measure(name, ns, deliveries, lat_n, lat_s))

    def cell(r: dict, key: str, fmt: str) -> str:
        v = r.get(key)
        if v is None:
            return "-"
        return fmt.format(v) + ("!" if r.get(f"{key}_bound") else "")

    rows = [
        *((f"deliveries/s, N={n}", f"fanout{n}", "{:,.0f}") for n in ns),
        *((f"server CPU us/delivery, N={n}", f"fanout{n}_us", "{:.2f}") for n in ns),
        (f"p50 ms at 50 msg/s x {lat_n}", "p50", "{:.2f}"),
        (f"p99 ms at 50 msg/s x {lat_n}", "p99", "{:.2f}"),
        ("server CPU us/delivery at 50 msg/s", "lat_us", "{:.2f}"),
        ("lost deliveries", "lost", "{:d}"),
        ("Redis bytes per stored message", "bytes_per_message", "{:.0f}"),
        ("Redis bytes per member", "bytes_per_member", "{:.0f}"),
    ]
    width = 16
    label_w = max(len(r[0]) for r in rows) + 2
    head = "".ljust(label_w) + "".join(r["name"].rjust(width) for r in results)
    lines = [head, "-" * len(head)]
    for label, key, fmt in rows:
        lines.append(
            label.ljust(label_w) + "".join(cell(r, key, fmt).rjust(width) for r in results)
        )
    log("footprint:")
    fp = footprint(200, 1000) if opts.quick else footprint()
    lines += ["", "Redis memory (INFO used_memory, 64-byte texts, posted through the push API):"]
    lines += [f"  {k}: {v:.0f}" for k, v in fp.items()]
    log("outage:")
    out = outage()
    lines += [
        "",
        f"Redis stopped for {out['redis_down_s']:.1f} s under 20 msg/s (sender on node A,",
    ]
    lines += ["reader on node B; bench/cluster.py outage()):"]
    lines += [f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in out.items()]
    text = "\n".join(lines)
    print(text)
    v = versions()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    RESULTS.write_text(
        "# Cross-node fan-out (bench/cluster.py)\n\n"
        f"{stamp}; {machine()}; chatd {v['chatd']}, Python {v['python']}, Twisted "
        f"{v['twisted']}, Autobahn {v['autobahn']}, redis-server {redis_version}"
        f"{' (quick run)' if opts.quick else ''}.\n\n"
        "chatd.v1 room with history, 64-byte messages. `single`: one node, SQLite, no "
        "Redis. `single+redis`: one node with --redis. `cross-node`: publisher on node A, "
        "the other members on node B, both with --redis. Server side (nodes and "
        "redis-server) pinned to CPU 0, generator to CPU 1; CPU figures sum every "
        "server-side process. `!`: the generator was above 90% of its CPU.\n\n"
        f"```\n{text}\n```\n"
    )
    log(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
