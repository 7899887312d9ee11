"""What an idle connection keeps alive: objects and allocations per connection.

    python -m bench.memprobe [--conns 2000] [--path /relay/bench] [--proto chatd.v1]

Runs chatd's site in this process (no twistd), opens ``--conns`` idle
connections with the load generator, and prints, per connection, the
Python objects by type that appeared and the allocation sites
(tracemalloc) that hold the most memory. RSS per connection is what
``bench.run`` measures; this says what it is made of.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import subprocess
import sys
import threading
import tracemalloc

from bench.run import LOADGEN, V1_IDLE_SETUP, build_loadgen


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--path", default="/relay/bench")
    ap.add_argument("--proto", default="")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    build_loadgen()

    from twisted.internet import reactor

    from chatd.config import Settings
    from chatd.history import History
    from chatd.hub import InMemoryHub
    from chatd.ops import Health
    from chatd.stats import Stats
    from chatd.web import make_web

    settings = Settings(ping_interval=0, compression=False, history_size=0, join_history=0)
    stats = Stats()
    hub = InMemoryHub(History(":memory:", 0, "normal"), join_history=0, stats=stats)
    web = make_web(settings, hub, stats, Health())
    port = reactor.listenTCP(0, web.site, backlog=4096, interface="127.0.0.1")
    setup = V1_IDLE_SETUP if a.proto else ""
    argv = [str(LOADGEN), "idle", "--port", str(port.getHost().port), "--path", a.path]
    argv += ["--proto", a.proto, "-n", str(a.conns), "--hold", "1", "--setup", setup]
    argv += ["--timeout", "60", "--linger", "60"]
    result: dict[str, object] = {}

    def measure() -> None:
        gc.collect()
        snap = tracemalloc.take_snapshot()
        counts = type_counts()
        result["snap"], result["counts"] = snap, counts
        from chatd.protocols.base import Connection

        conn = next(o for o in gc.get_objects() if isinstance(o, Connection))
        result["attrs"] = sorted(
            ((k, type(v).__name__, sys.getsizeof(v)) for k, v in vars(conn).items()),
            key=lambda x: -x[2],
        )
        result["dict"] = (len(vars(conn)), sys.getsizeof(vars(conn)))
        t = conn.transport
        result["tdict"] = (type(t).__name__, len(vars(t)), sys.getsizeof(vars(t)))

    done = threading.Event()

    def run_gen() -> None:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "result":
                result["gen"] = ev
                reactor.callFromThread(lambda: (measure(), done.set()))
                done.wait(120)
                break
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        reactor.callFromThread(reactor.stop)

    def start() -> None:
        gc.collect()
        result["counts0"] = type_counts()
        tracemalloc.start(8)
        result["snap0"] = tracemalloc.take_snapshot()
        threading.Thread(target=run_gen, daemon=True).start()

    reactor.callWhenRunning(start)
    reactor.run()
    n = a.conns
    print("generator:", result.get("gen"), file=sys.stderr)
    c0, c1 = result["counts0"], result["counts"]
    diff = {k: (c1[k] - c0.get(k, 0)) / n for k in c1}
    print("objects per connection:")
    for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[: a.top]:
        if v >= 0.5:
            print(f"  {v:6.2f}  {k}")
    print(
        "one connection's __dict__ (entries, bytes):", result["dict"], "transport:", result["tdict"]
    )
    print("  " + ", ".join(f"{k}:{t}:{b}" for k, t, b in result["attrs"]))
    snap, snap0 = result["snap"], result["snap0"]
    total = sum(s.size_diff for s in snap.compare_to(snap0, "filename"))
    print(f"\npython allocations: {total / n:.0f} B per connection; by line allocated:")
    for s in snap.compare_to(snap0, "lineno")[: a.top]:
        f = s.traceback[0]
        where = f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
        print(f"  {s.size_diff / n:7.0f} B  {s.count_diff / n:5.2f} blocks  {where}")
    print("\nby call path (most recent call first):")
    for s in snap.compare_to(snap0, "traceback")[: a.top // 2]:
        frames = s.traceback.format(most_recent_first=True)[::2]
        short = [x.strip().split("site-packages/")[-1].replace('File "', "") for x in frames]
        print(f"  {s.size_diff / n:7.0f} B  " + " < ".join(short[:5]))


if __name__ == "__main__":
    main()
