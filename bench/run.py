"""Fan-out benchmark: chatd against peer WebSocket servers, side by side.

    python -m bench.run [--quick] [--only NAME,...]

Why: the issue "a fan-out path that beats every peer" needs the same load,
from the same generator, against chatd (relay room, plain chat, chatd.v1
chat with history) and against the plain broadcast server of Autobahn
(per-client and prepared), Python ``websockets`` and Node ``ws``.

Each server runs pinned to CPU 0 and the C generator (bench/loadgen.c, built
into bench/.build/) to CPU 1, every test on a fresh server. Measured:

- fan-out: deliveries/s (members x messages / s), closed loop, 64-byte text;
- latency: p50/p99 at 50 msg/s to many members, and server CPU per delivery;
- idle memory: server RSS growth per open connection;
- handshakes/s: connections opened as fast as the server takes them;
- slow consumers: 10 of 100 members never read; server memory growth, loss
  for the healthy 90, and whether the non-readers were dropped.

The column "browsers (deflate)" is chatd v1 with every client offering
permessage-deflate as Chromium does (``permessage-deflate;
client_max_window_bits``), on chatd's default (no context takeover: one
deflated frame per message, shared). bench/deflate.py compares plain,
deflate and deflate with context takeover in more detail (memory after
traffic, bytes on the wire).

A cell marked ``!`` had the generator above 90% of its CPU (GEN-BOUND): the
server may be faster than shown. Results go to stdout and bench/RESULTS.md
(raw JSON in bench/.build/results.json). ``--only`` takes server keys
(relay, plain, v1, v1-deflate, ab-send, ab-prepared, websockets, node) and/or test keys
(fanout, latency, idle, handshakes, slow).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import chatd
from tools.daemon import REPO, Daemon, child_env, twistd

BENCH = REPO / "bench"
BUILD = BENCH / ".build"
PEERS = BENCH / "peers"
LOADGEN = BUILD / "loadgen"
RESULTS = BENCH / "RESULTS.md"
TWO_CPUS = (os.cpu_count() or 1) >= 2
SERVER_CPU, GEN_CPU = (0, 1) if TWO_CPUS else (None, None)
GEN_BOUND = 0.9  # generator CPU share above which a number is the generator's, not the server's

V1_SETUP = '{"type":"hello","nick":"n{i}"}\n{"type":"join","room":"bench"}'
V1_IDLE_SETUP = '{"type":"hello","nick":"n{i}"}\n{"type":"join","room":"idle{g}"}'
V1_WRAP = '{"type":"send","room":"bench","text":"{p}"}'
CHATD_COMMON = [
    "--ping-interval",
    "0",
    "--listen-backlog",
    "4096",
    "--rate",
    "1000000",  # (the highest --rate and --rate-burst accept)
    "--rate-burst",
    "1000000",
    "--join-history",
    "0",
    "--no-compression",
]


# -- configuration ------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """Sizes of every test; --quick shrinks them to a smoke run."""

    fanout_ns: tuple[int, ...]
    fanout_deliveries: int  # per run: messages = deliveries / members
    fanout_runs: int
    fanout_timeout: float
    lat_members: int
    lat_rate: float
    lat_seconds: float
    idle_conns: int
    idle_hold: float
    idle_timeout: float
    hs_conns: int
    slow_members: int
    slow_readers_off: int
    slow_seconds: float
    slow_size: int
    size: int = 64


FULL = Params(
    fanout_ns=(100, 1000, 5000),
    fanout_deliveries=400_000,
    fanout_runs=3,
    fanout_timeout=300,
    lat_members=1000,
    lat_rate=50,
    lat_seconds=10,
    idle_conns=10_000,
    idle_hold=3,
    idle_timeout=240,
    hs_conns=5000,
    slow_members=100,
    slow_readers_off=10,
    slow_seconds=10,
    slow_size=1024,
)
QUICK = Params(
    fanout_ns=(100, 1000),
    fanout_deliveries=60_000,
    fanout_runs=1,
    fanout_timeout=90,
    lat_members=200,
    lat_rate=50,
    lat_seconds=2,
    idle_conns=1000,
    idle_hold=1,
    idle_timeout=60,
    hs_conns=1000,
    slow_members=100,
    slow_readers_off=10,
    slow_seconds=3,
    slow_size=4096,  # bigger, so the short run still fills the socket buffers
)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how a client talks to it."""

    key: str
    title: str  # column header
    chatd_args: tuple[str, ...] | None = None  # a chatd; else ``argv`` is a peer
    argv: tuple[str, ...] = ()
    path: str = "/"
    proto: str = ""
    setup: str = ""
    idle_setup: str = ""
    wrap: str = "{p}"
    needs: str = ""  # "node" or "websockets": skipped when missing
    tree: str = ""  # a chatd from another checkout (BENCH_BASELINE), for before/after
    # loadgen --deflate: 1 offers permessage-deflate as Chromium does and reads each
    # compressed message on its own; 2 keeps an inflater per connection (context
    # takeover). A chatd then runs with compression on.
    deflate: int = 0


def servers_chatd() -> list[ServerSpec]:
    return [
        ServerSpec(
            "relay",
            "chatd relay",
            chatd_args=("--history-size", "0"),
            path="/relay/bench",
        ),
        ServerSpec("plain", "chatd plain", chatd_args=("--history-size", "0")),
        ServerSpec(
            "v1",
            "chatd v1+hist",
            chatd_args=("--history-size", "1000"),
            proto="chatd.v1",
            setup=V1_SETUP,
            idle_setup=V1_IDLE_SETUP,
            wrap=V1_WRAP,
        ),
        # The v1 chat as browsers use it: every client offers permessage-deflate.
        ServerSpec(
            "v1-deflate",
            "browsers (deflate)",
            chatd_args=("--history-size", "1000"),
            proto="chatd.v1",
            setup=V1_SETUP,
            idle_setup=V1_IDLE_SETUP,
            wrap=V1_WRAP,
            deflate=1,
        ),
    ]


def servers() -> list[ServerSpec]:
    py = sys.executable
    return [
        *servers_chatd(),
        *baseline_servers(),
        ServerSpec("ab-send", "AB send", argv=(py, str(PEERS / "autobahn_server.py"), "send")),
        ServerSpec(
            "ab-prepared", "AB prepared", argv=(py, str(PEERS / "autobahn_server.py"), "prepared")
        ),
        ServerSpec(
            "websockets",
            "websockets",
            argv=(py, str(PEERS / "py_websockets_server.py")),
            needs="websockets",
        ),
        ServerSpec(
            "node",
            "node ws",
            argv=("node", str(PEERS / "node_ws_server.js")),
            needs="node",
        ),
    ]


def baseline_servers() -> list[ServerSpec]:
    """With BENCH_BASELINE=<another checkout of chatd>: its relay, plain and v1 as well
    (keys relay-base, plain-base, v1-base), so a change is measured against its
    base in the same run, on the same machine state."""
    tree = os.environ.get("BENCH_BASELINE", "")
    if not tree:
        return []
    from dataclasses import replace

    return [
        replace(s, key=f"{s.key}-base", title=f"{s.title} base", tree=tree) for s in servers_chatd()
    ]


TESTS = ("fanout", "latency", "idle", "handshakes", "slow")


# -- processes ----------------------------------------------------------------


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """A preexec_fn: pin to ``cpu`` and take the hard limit of open files."""

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server(Protocol):
    pid: int
    port: int

    def stop(self) -> None: ...
    def log(self) -> str: ...


class ChatdServer:
    """chatd through tools.daemon, under ``taskset`` (it execs, so the pid is chatd's)."""

    def __init__(self, spec: ServerSpec, extra: tuple[str, ...]) -> None:
        common = [a for a in CHATD_COMMON if not (spec.deflate and a == "--no-compression")]
        argv = [twistd(), "-n", "--pidfile=", "chatd", *common]
        argv += [*spec.chatd_args, *extra, "--port", "0"]
        if SERVER_CPU is not None:
            argv = ["taskset", "-c", str(SERVER_CPU), *argv]
        env = {"PYTHONPATH": spec.tree} if spec.tree else None
        self.daemon = Daemon(argv=argv, timeout=60, env=env)
        self.pid, self.port = self.daemon.pid, self.daemon.port

    def stop(self) -> None:
        # SIGKILL: a graceful drain of thousands of clients is not what is measured
        self.daemon.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.daemon.log()


class PeerServer:
    """A peer broadcast server that prints ``listening on <port>``."""

    def __init__(self, spec: ServerSpec, timeout: float = 30) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*spec.argv, "0"],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_child_setup(SERVER_CPU),
        )
        self.pid = self.proc.pid
        found: queue.Queue[int | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        try:
            port = found.get(timeout=timeout)
        except queue.Empty:
            port = None
        if port is None:
            self.stop()
            raise RuntimeError(f"{spec.title} did not start:\n{self.log()}")
        self.port = port

    def _pump(self, found: queue.Queue[int | None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on (\d+)", line)
            if m:
                found.put(int(m.group(1)))
        found.put(None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return "\n".join(self.lines[-20:])


@contextlib.contextmanager
def running(spec: ServerSpec, extra: tuple[str, ...] = ()) -> Iterator[Server]:
    server: Server = ChatdServer(spec, extra) if spec.chatd_args is not None else PeerServer(spec)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Mark:
    """The server's state when the generator reported an event."""

    wall: float
    cpu: float
    rss: int


class Load:
    """One loadgen run against a server; the server's CPU and RSS are read at its events.

    The generator keeps its connections after the result until ``finish()``
    (``--linger``), so memory is read with them open, and the server is
    stopped before thousands of clients leave at once (for chatd.v1 every
    leave would be a presence frame to everyone still there).
    """

    def __init__(
        self, server: Server, spec: ServerSpec, mode: str, args: list[str], timeout: float
    ) -> None:
        self.server = server
        argv = [str(LOADGEN), mode, "--port", str(server.port), "--path", spec.path]
        argv += ["--proto", spec.proto, "--wrap", spec.wrap, *args, "--timeout", str(timeout)]
        argv += ["--linger", "120"]
        if spec.deflate:
            argv += ["--deflate", str(spec.deflate)]
        self.timeout = timeout + 30
        self.marks: dict[str, Mark] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.rss_before = self.peak_rss = proc_rss_kib(server.pid)
        self.noise: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_child_setup(GEN_CPU),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def mark(self) -> Mark:
        pid = self.server.pid
        return Mark(time.perf_counter(), proc_cpu_s(pid), proc_rss_kib(pid))

    def result(self) -> dict[str, Any]:
        """Events until the result line; the server's peak RSS is sampled meanwhile."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.peak_rss = max(self.peak_rss, proc_rss_kib(self.server.pid))
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("loadgen exited without a result: " + " | ".join(self.noise))
            try:
                ev = json.loads(line)
            except ValueError:
                self.noise.append(line.strip())
                continue
            name = ev.get("event", "")
            key = f"{name}{ev['run']}" if "run" in ev else name
            self.marks[key] = self.mark()
            self.events[key] = ev
            if name == "result":
                return ev
        raise TimeoutError("loadgen gave no result in time")

    def finish(self) -> None:
        """Let the generator go (it closes its connections) and reap it."""
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@contextlib.contextmanager
def load(
    spec: ServerSpec, mode: str, args: list[str], timeout: float, extra: tuple[str, ...] = ()
) -> Iterator[tuple[Load, Server]]:
    """A fresh server and a generator on it; the server is stopped before the clients go."""
    gen: Load | None = None
    try:
        with running(spec, extra) as server:
            gen = Load(server, spec, mode, args, timeout)
            yield gen, server
    finally:
        if gen is not None:
            gen.finish()


# -- tests ----------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    gen_bound: bool = False


@dataclass
class Outcome:
    cells: dict[str, Cell] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def failure_text(error: str | None) -> str:
    return "timeout" if error and "timeout" in error else "error"


def fanout_window(n: int) -> int:
    """Messages in flight: enough that every socket gets batches, capped so N=5000 stays bounded."""
    return max(8, min(64, 100_000 // n))


def measure_fanout(spec: ServerSpec, p: Params, out: Outcome) -> None:
    for n in p.fanout_ns:
        window = fanout_window(n)
        messages = max(2 * window, p.fanout_deliveries // n)
        args = ["-n", str(n), "-m", str(messages), "--window", str(window)]
        args += ["--size", str(p.size), "--runs", str(p.fanout_runs), "--setup", spec.setup]
        with load(spec, "fanout", args, p.fanout_timeout, ("--max-backlog", "64M")) as (gen, _):
            res = gen.result()
        runs = res.get("runs", [])
        for i, r in enumerate(runs):
            a, b = gen.marks.get(f"start{i}"), gen.marks.get(f"end{i}")
            if a and b and b.wall > a.wall:
                r["server_cpu_share"] = (b.cpu - a.cpu) / (b.wall - a.wall)
        out.raw[f"fanout{n}"] = {**res, "ready": gen.events.get("ready")}
        ok = sorted((r for r in runs if r["complete"]), key=lambda r: r["deliveries_per_s"])
        if not ok:
            out.cells[f"fanout{n}"] = Cell(failure_text(res.get("error") or "timeout"))
            out.cells[f"fanout{n}cpu"] = Cell("-")
            continue
        med = ok[len(ok) // 2]
        bound = med["gen_cpu_share"] > GEN_BOUND
        out.cells[f"fanout{n}"] = Cell(f"{med['deliveries_per_s']:,.0f}", bound)
        srv = med.get("server_cpu_share", float("nan"))
        out.cells[f"fanout{n}cpu"] = Cell(f"{srv:.0%}/{med['gen_cpu_share']:.0%}", bound)
        rate, gshare = med["deliveries_per_s"], med["gen_cpu_share"]
        log(f"  fanout N={n}: {rate:,.0f} deliveries/s, cpu server/gen {srv:.0%}/{gshare:.0%}")


def measure_latency(spec: ServerSpec, p: Params, out: Outcome) -> None:
    args = ["-n", str(p.lat_members), "--rate", str(p.lat_rate), "--duration", str(p.lat_seconds)]
    args += ["--size", str(p.size), "--setup", spec.setup]
    with load(spec, "latency", args, p.lat_seconds + 120, ("--max-backlog", "64M")) as (gen, _):
        res = gen.result()
    out.raw["latency"] = res
    a, b = gen.marks.get("start"), gen.marks.get("end")
    if "p50_ms" not in res or res["p50_ms"] < 0 or not a or not b:
        for k in ("p50", "p99", "us"):
            out.cells[k] = Cell(failure_text(res.get("error")))
        return
    bound = res["gen_cpu_share"] > GEN_BOUND
    lost = res["expected"] - res["deliveries"]
    suffix = f" ({lost} lost)" if lost else ""
    us = (b.cpu - a.cpu) / max(res["deliveries"], 1) * 1e6
    res["server_us_per_delivery"] = us
    out.cells["p50"] = Cell(f"{res['p50_ms']:.2f}{suffix}", bound)
    out.cells["p99"] = Cell(f"{res['p99_ms']:.2f}", bound)
    out.cells["us"] = Cell(f"{us:.2f}", bound)
    log(f"  latency p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms, {us:.2f} us/delivery")


def measure_idle(spec: ServerSpec, p: Params, out: Outcome) -> None:
    args = ["-n", str(p.idle_conns), "--hold", str(p.idle_hold)]
    args += ["--setup", spec.idle_setup or spec.setup]
    with load(spec, "idle", args, p.idle_timeout) as (gen, server):
        res = gen.result()
        after = proc_rss_kib(server.pid)  # the generator still holds its connections
    before = gen.rss_before
    out.raw["idle"] = {**res, "rss_before_kib": before, "rss_after_kib": after}
    if res.get("error") or not res.get("open"):
        out.cells["idle"] = Cell(failure_text(res.get("error")) + f" ({res.get('open', 0)})")
        return
    per = (after - before) / res["open"]
    out.cells["idle"] = Cell(f"{per:.1f}")
    log(f"  idle: {per:.1f} KiB/connection ({before} -> {after} KiB)")


def measure_handshakes(spec: ServerSpec, p: Params, out: Outcome) -> None:
    args = ["-n", str(p.hs_conns), "--inflight", "200"]
    with load(spec, "handshakes", args, 120) as (gen, _):
        res = gen.result()
    out.raw["handshakes"] = res
    if res.get("error"):
        out.cells["hs"] = Cell(failure_text(res["error"]) + f" ({res.get('open', 0)})")
        return
    out.cells["hs"] = Cell(f"{res['handshakes_per_s']:,.0f}", res["gen_cpu_share"] > GEN_BOUND)
    log(f"  handshakes: {res['handshakes_per_s']:,.0f}/s")


def measure_slow(spec: ServerSpec, p: Params, out: Outcome) -> None:
    args = ["-n", str(p.slow_members), "--slow", str(p.slow_readers_off)]
    args += ["--duration", str(p.slow_seconds), "--size", str(p.slow_size), "--window", "32"]
    args += ["--setup", spec.setup]
    # chatd on its default --max-backlog (4 MiB): its protection is what is measured.
    # --grace: chatd sends close 1008 and waits 5 s for the reply before it aborts.
    args += ["--grace", "6"]
    with load(spec, "slow", args, p.slow_seconds + 90) as (gen, _):
        res = gen.result()
    out.raw["slow"] = res
    start = gen.marks.get("start")
    if res.get("error") or not start:
        for k in ("slow_mem", "slow_loss", "slow_drop", "slow_rate"):
            out.cells[k] = Cell(failure_text(res.get("error")))
        return
    growth = (gen.peak_rss - start.rss) / 1024
    res["rss_growth_mib"] = growth
    bound = res["gen_cpu_share"] > GEN_BOUND
    out.cells["slow_mem"] = Cell(f"{growth:.1f}")
    loss = f"{res['healthy_loss']:.2%}"
    if res["healthy_disconnected"]:
        loss += f" ({res['healthy_disconnected']} cut)"
    out.cells["slow_loss"] = Cell(loss)
    drop = f"{res['slow_disconnected']}/{res['slow']}"
    if res["slow_disconnected"]:
        drop += f" at {res['last_drop_s']:.1f}s"
    out.cells["slow_drop"] = Cell(drop)
    out.cells["slow_rate"] = Cell(f"{res['messages_per_s']:,.0f}", bound)
    log(
        f"  slow: +{growth:.1f} MiB, healthy loss {res['healthy_loss']:.2%}, "
        f"non-readers dropped {res['slow_disconnected']}/{res['slow']}"
    )


RUNNERS: dict[str, Callable[[ServerSpec, Params, Outcome], None]] = {
    "fanout": measure_fanout,
    "latency": measure_latency,
    "idle": measure_idle,
    "handshakes": measure_handshakes,
    "slow": measure_slow,
}


def rows(p: Params) -> list[tuple[str, str, str]]:
    """(test, cell key, row label) in table order."""
    out: list[tuple[str, str, str]] = []
    for n in p.fanout_ns:
        label = f"fan-out N={n:,} deliveries/s (W={fanout_window(n)})"
        out.append(("fanout", f"fanout{n}", label))
        out.append(("fanout", f"fanout{n}cpu", "  CPU server/generator"))
    lat = f"{p.lat_rate:g} msg/s x {p.lat_members:,}"
    out += [
        ("latency", "p50", f"latency p50 ms ({lat})"),
        ("latency", "p99", "latency p99 ms"),
        ("latency", "us", "server CPU us/delivery"),
        ("idle", "idle", f"idle KiB/conn ({p.idle_conns:,} conns)"),
        ("handshakes", "hs", f"handshakes/s ({p.hs_conns:,} conns)"),
    ]
    slow = (
        f"{p.slow_readers_off}/{p.slow_members} not reading, {p.slow_size} B, {p.slow_seconds:g} s"
    )
    out += [
        ("slow", "slow_mem", f"slow: server MiB growth ({slow})"),
        ("slow", "slow_loss", "slow: healthy-member loss"),
        ("slow", "slow_drop", "slow: non-readers dropped"),
        ("slow", "slow_rate", "slow: messages/s sent"),
    ]
    return out


# -- setup and report -------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_loadgen() -> None:
    """Compile the generator when it is missing or older than its source."""
    src = BENCH / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    BUILD.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-o", str(LOADGEN.relative_to(REPO)), str(src.relative_to(REPO)), "-lz"]
    log("building: " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)


def ensure_websockets() -> bool:
    """Install PyPI ``websockets`` into this venv if missing (a bench-only dependency)."""
    try:
        import websockets  # noqa: F401
    except ImportError:
        log("installing websockets into the venv")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        if subprocess.run([*cmd, "websockets"]).returncode != 0:
            return False
        importlib.invalidate_caches()
    return True


def ensure_node_ws() -> bool:
    """Install npm ``ws`` into bench/peers/node_modules when node and npm exist."""
    if not shutil.which("node") or not shutil.which("npm"):
        return False
    if (PEERS / "node_modules" / "ws" / "package.json").exists():
        return True
    log("installing ws into bench/peers/node_modules")
    cmd = ["npm", "install", "--prefix", "bench/peers", "--no-save", "--no-package-lock"]
    cmd += ["--no-audit", "--no-fund", "--loglevel=error", "ws"]
    return subprocess.run(cmd, cwd=REPO).returncode == 0


def versions() -> dict[str, str]:
    v = {"chatd": chatd.__version__, "python": platform.python_version()}
    for dist in ("twisted", "autobahn", "websockets"):
        try:
            v[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v[dist] = "missing"
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
        v["node"] = node.stdout.strip() or "missing"
    except (OSError, subprocess.TimeoutExpired):
        v["node"] = "missing"
    ws = PEERS / "node_modules" / "ws" / "package.json"
    v["ws"] = json.loads(ws.read_text())["version"] if ws.exists() else "missing"
    return v


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}"


def table(p: Params, specs: list[ServerSpec], results: dict[str, Outcome], tests: set[str]) -> str:
    widths = [max(14, len(s.title) + 2) for s in specs]
    label_w = max(len(label) for _, _, label in rows(p)) + 2
    head = "".ljust(label_w) + "".join(s.title.rjust(w) for s, w in zip(specs, widths, strict=True))
    lines = [head, "-" * len(head)]
    for test, key, label in rows(p):
        if test not in tests:
            continue
        cells = [results[s.key].cells.get(key, Cell("-")) for s in specs]
        text = "".join(
            (c.text + ("!" if c.gen_bound else "")).rjust(w)
            for c, w in zip(cells, widths, strict=True)
        )
        flag = "  GEN-BOUND" if any(c.gen_bound for c in cells) else ""
        lines.append(label.ljust(label_w) + text + flag)
    return "\n".join(lines)


def legend(p: Params) -> str:
    return (
        f"fan-out: {p.size}-byte text, one publisher, closed loop, "
        f"{'median of ' + str(p.fanout_runs) if p.fanout_runs > 1 else 'one run'}; "
        "W = messages in flight; CPU = share of one core during the run.\n"
        "! = GEN-BOUND: the generator used > 90% of its core, so the server may be faster.\n"
        "chatd: relay room /relay/bench; plain chat on / (history off); chatd.v1 with history "
        "(1000, SQLite); fan-out and latency with --max-backlog 64M, slow test on the default "
        "4 MiB.\n"
        "slow: 'at' = seconds from the start of sending to the last drop (chatd sends close "
        "1008 past its backlog limit, then waits 5 s for the reply before it aborts).\n"
        "chatd.v1 idle connections: hello + join, rooms of 100 (one room of thousands would be "
        "a presence storm).\n"
        "browsers (deflate) = chatd v1 with clients offering permessage-deflate as Chromium "
        "does.\n"
        "AB = Autobahn|Python on Twisted: sendMessage per client / prepareMessage once."
    )


def write_results(text: str, p: Params, quick: bool, v: dict[str, str]) -> None:
    vs = ", ".join(f"{k} {val}" for k, val in v.items())
    RESULTS.write_text(
        "# chatd fan-out benchmark: newest run\n\n"
        f"Made by `python -m bench.run{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.\n\n"
        f"- versions: {vs}\n"
        f"- machine: {machine()}\n"
        f"- pinning: {'server on CPU 0, generator on CPU 1' if TWO_CPUS else 'none (one CPU)'}\n\n"
        "```\n" + text + "\n```\n\n" + legend(p) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N, few messages: a smoke run")
    ap.add_argument("--only", default="", help="server and/or test keys, comma-separated")
    a = ap.parse_args()
    p = QUICK if a.quick else FULL
    specs = servers()
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    unknown = only - {s.key for s in specs} - set(TESTS)
    if unknown:
        ap.error(f"unknown --only names: {', '.join(sorted(unknown))}")
    if only & {s.key for s in specs}:
        specs = [s for s in specs if s.key in only]
    tests = set(TESTS) & only or set(TESTS)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # chatd inherits it
    build_loadgen()
    have = {"websockets": ensure_websockets(), "node": ensure_node_ws(), "": True}
    v = versions()
    log(f"chatd fan-out benchmark{' (quick)' if a.quick else ''}: {machine()}")
    started = time.monotonic()
    results: dict[str, Outcome] = {}
    for spec in specs:
        out = results[spec.key] = Outcome()
        if not have[spec.needs]:
            log(f"[{spec.title}] skipped: {spec.needs} is missing")
            for _, key, _ in rows(p):
                out.cells[key] = Cell("n/a")
            continue
        for test in TESTS:
            if test not in tests:
                continue
            log(f"[{spec.title}] {test}")
            t0 = time.monotonic()
            try:
                RUNNERS[test](spec, p, out)
                log(f"  ({time.monotonic() - t0:.0f} s)")
            except Exception as e:  # one failing cell must not lose the table
                log(f"  {test} failed: {e}")
                out.raw[f"{test}_error"] = str(e)
                for t, key, _ in rows(p):
                    if t == test and key not in out.cells:
                        out.cells[key] = Cell("error")
    text = table(p, specs, results, tests)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(text)
    print()
    print(legend(p))
    write_results(text, p, a.quick, v)
    BUILD.mkdir(exist_ok=True)
    raw = {s: o.raw for s, o in results.items()}
    (BUILD / "results.json").write_text(json.dumps({"versions": v, "results": raw}, indent=1))
    log(f"wrote {RESULTS.relative_to(REPO)} and {(BUILD / 'results.json').relative_to(REPO)}")


if __name__ == "__main__":
    main()
