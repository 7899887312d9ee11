"""A client that stops reading is dropped (1008) while everyone else gets everything."""

from __future__ import annotations

import threading
import time

from wsclient import BINARY, Client

from tools.daemon import Daemon

MESSAGES = 1024  # 64 MiB in all: far more than the bound, bounded in count
SIZE = 64 * 1024


def test_slow_consumer_dropped_memory_flat_others_lose_nothing(daemon) -> None:
    d: Daemon = daemon("--max-backlog", "4M", "--ping-interval", "0")
    slow = Client(d.port, "/relay/flood", rcvbuf=4096)  # joins, never reads
    healthy = Client(d.port, "/relay/flood")
    publisher = Client(d.port, "/relay/flood")
    baseline = d.rss_kib()
    peak = [baseline]
    got: list[bytes] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], d.rss_kib())
            time.sleep(0.01)

    def read() -> None:
        for _ in range(MESSAGES):
            op, payload = healthy.recv_message()
            assert op == BINARY
            got.append(payload[:8])
        done.set()

    threads = [threading.Thread(target=sample), threading.Thread(target=read)]
    for t in threads:
        t.start()
    drainer = threading.Thread(target=lambda: [publisher.recv_message() for _ in range(MESSAGES)])
    drainer.start()  # the publisher is a member too: it must keep reading its own echoes
    for i in range(MESSAGES):
        publisher.send(i.to_bytes(8, "big") + b"\0" * (SIZE - 8))
    for t in (*threads, drainer):
        t.join(60)
    done.set()

    assert [int.from_bytes(g, "big") for g in got] == list(range(MESSAGES))  # nothing lost
    d.wait_for_log(r"code=1008", timeout=20)
    assert slow.expect_close() == 1008
    growth_mib = (peak[0] - baseline) / 1024
    print(f"daemon RSS: baseline {baseline} KiB, peak {peak[0]} KiB, growth {growth_mib:.1f} MiB")
    # Unbounded, the silent client would pin ~64 MiB; bounded, a few MiB of buffers.
    assert growth_mib < 24, growth_mib
    healthy.close()
    publisher.close()
