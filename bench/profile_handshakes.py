"""Where a chatd handshake's CPU goes: the handshake load under py-spy or cProfile.

    python -m bench.profile_handshakes [--path /relay/bench] [--proto chatd.v1]
        [--rounds 3] [--conns 5000] [--profiler py-spy|cprofile] [--top 30] [--deflate]

Starts chatd as ``bench.run`` does (pinned to CPU 0, the generator on CPU 1),
opens ``--conns`` connections ``--rounds`` times (each round's connections
are closed before the next, so closing is profiled too), and prints the
handshake rate of each round and the functions that took the most CPU,
inclusive and exclusive. py-spy (``pip install py-spy``) samples without
slowing the server much; cProfile (twistd --profile) counts calls exactly
but makes everything slower. ``--deflate``: the clients offer
permessage-deflate as Chromium does, and chatd runs with compression on
(as the "browsers (deflate)" column of ``bench.run``).
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import (
    CHATD_COMMON,
    GEN_CPU,
    LOADGEN,
    SERVER_CPU,
    _child_setup,
    build_loadgen,
    proc_cpu_s,
)
from tools.daemon import Daemon, twistd


def run_rounds(port: int, pid: int, a: argparse.Namespace) -> list[str]:
    out = []
    for i in range(a.rounds):
        argv = [str(LOADGEN), "handshakes", "--port", str(port), "--path", a.path]
        argv += ["--proto", a.proto, "-n", str(a.conns), "--inflight", "200", "--timeout", "120"]
        if a.deflate:
            argv += ["--deflate", "1"]
        cpu0 = proc_cpu_s(pid)
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=200, preexec_fn=_child_setup(GEN_CPU)
        )
        line = next((x for x in r.stdout.splitlines() if '"result"' in x), r.stdout[-300:])
        out.append(f"round {i}: {line} server cpu {proc_cpu_s(pid) - cpu0:.2f}s")
        time.sleep(1.0)  # the closes are handled before the next round
    return out


# (category, frames that put a sample in it), first match wins: what a handshake's CPU is spent on
CATEGORIES = [
    ("logging (2 lines per connection)", ("chatd/logs.py", "twisted/logger/")),
    ("accept (Twisted's Port)", ("Port.doRead",)),
    (
        "close (socket close, Autobahn and chatd teardown)",
        ("readConnectionLost", "connectionLost", "_closeSocket"),
    ),
    ("chatd onOpen (link, producer, rooms)", ("Connection.onOpen",)),
    ("sending the 101", ("Connection.sendData",)),
    ("FrontDoor routing (parse once)", ("Upgrades.route",)),
    (
        "Autobahn handshake (checks, onConnect, 101 text)",
        ("processHandshake", "succeedHandshake", "_take_handshake"),
    ),
    ("protocol setup (Autobahn connectionMade)", ("makeConnection", "hand_over")),
    ("epoll, reads, dispatch: the rest of the reactor", ("ReactorBase.mainLoop",)),
    ("unattributed (stacks py-spy could not read whole)", ("",)),
]


def categorize_raw(path: Path) -> str:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for name, marks in CATEGORIES:
            if any(m in stack for m in marks):
                counts[name] += int(n)
                break
    return "\n".join(f"{counts[name] / total:6.1%}  {name}" for name, _ in CATEGORIES)


def summarize_raw(path: Path, top: int) -> str:
    """py-spy's raw (collapsed) stacks: inclusive and self sample shares per function."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
            for f in stack.split(";")
            if " (" in f
        ]
        total += count
        for f in set(frames):
            incl[f] += count
        if frames:
            self_[frames[-1]] += count
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    lines += ["", "self:"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in self_.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/relay/bench")
    ap.add_argument("--proto", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--profiler", choices=("py-spy", "cprofile", "none"), default="py-spy")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--log-format", default="text")
    ap.add_argument("--tree", default="", help="run the chatd of another checkout (PYTHONPATH)")
    ap.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    a = ap.parse_args()
    build_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="chatd-prof-"))
    prof = tmp / "chatd.prof"
    argv = [twistd(), "-n", "--pidfile="]
    if a.profiler == "cprofile":
        argv += ["--profile", str(prof), "--profiler", "cprofile", "--savestats"]
    common = [x for x in CHATD_COMMON if not (a.deflate and x == "--no-compression")]
    argv += ["chatd", *common, "--history-size", "0", "--log-format", a.log_format]
    argv += ["--port", "0"]
    if SERVER_CPU is not None:
        argv = ["taskset", "-c", str(SERVER_CPU), *argv]
    d = Daemon(argv=argv, timeout=60, cwd=str(tmp), env={"PYTHONPATH": a.tree} if a.tree else None)
    cpu_start = proc_cpu_s(d.pid)
    spy = None
    raw = tmp / "spy.txt"
    if a.profiler == "py-spy":
        exe = (
            os.environ.get("PY_SPY")
            or shutil.which("py-spy")
            or str(Path(sys.executable).parent / "py-spy")
        )
        spy = subprocess.Popen(
            [
                exe,
                "record",
                "--nonblocking",
                "-p",
                str(d.pid),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    try:
        rounds = run_rounds(d.port, d.pid, a)
        time.sleep(1.0)  # the last round's closes
        cpu = proc_cpu_s(d.pid) - cpu_start
        n = a.rounds * a.conns
        rounds.append(f"server CPU per connection (open + close): {cpu / n * 1e6:.0f} us")
    finally:
        if spy is not None:
            os.kill(spy.pid, signal.SIGINT)
            spy.wait(30)
        d.stop(signal.SIGTERM)
    print("\n".join(rounds))
    if a.profiler == "py-spy" and raw.exists():
        print(categorize_raw(raw))
        print(summarize_raw(raw, a.top))
    elif a.profiler == "cprofile" and prof.exists():
        st = pstats.Stats(str(prof))
        st.sort_stats("cumulative").print_stats(a.top)
        st.sort_stats("tottime").print_stats(a.top)
    print(f"(profile files in {tmp})")


if __name__ == "__main__":
    main()
