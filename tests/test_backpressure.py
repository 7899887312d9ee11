"""A client that stops reading is dropped (1008) while everyone else gets everything."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from wsclient import BINARY, Client

from tools.daemon import Daemon

MESSAGES = 1024  # 64 MiB in all: far more than the bound, bounded in count
SIZE = 64 * 1024
AHEAD = 4  # the publisher runs at most this many messages ahead of its slowest reader


class Readers:
    """Reader threads, one per member that keeps up, each counting what it has read.

    The publisher paces itself by them (``wait_behind``): a reader that keeps up is
    then never more than ``AHEAD`` messages behind, however loaded the machine is
    (a Python thread may be descheduled for a long time), so only the client that
    never reads can run into the daemon's backlog bound.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def start(self, name: str, count: int, read_one: Callable[[], bool]) -> None:
        """Read until ``read_one()`` returned True ``count`` times (it raises on a close)."""
        self.counts[name] = 0

        def run() -> None:
            try:
                n = 0
                while n < count:
                    if read_one():
                        n += 1
                        with self.cond:
                            self.counts[name] = n
                            self.cond.notify_all()
            except BaseException as e:  # reported by wait_behind / join
                with self.cond:
                    self.errors.append(f"{name}: {e!r}")
                    self.cond.notify_all()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def wait_behind(self, sent: int, ahead: int = AHEAD, timeout: float = 60.0) -> None:
        """Block until every reader has read at least ``sent - ahead`` messages."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.errors or min(self.counts.values()) >= sent - ahead, timeout
            )
            assert not self.errors, self.errors
            assert ok, f"readers stuck at {self.counts} after {sent} sent"

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in self.threads), f"readers stuck at {self.counts}"


class CloseWatch:
    """Reads a silent client's close frame as soon as the daemon has said it drops it.

    The client must not read before (it is the one that never reads); but once
    dropped, the daemon waits only 5 s (its close handshake timeout) for the close
    reply before it aborts the connection, and with it the close frame still
    queued behind the backlog. On a loaded machine the rest of a test can take
    longer than that, so the close is read here, at once, not at the end.
    """

    def __init__(self, d: Daemon, c: Client, code: int, timeout: float = 120.0) -> None:
        self.result: list[object] = []

        def run() -> None:
            try:
                # autobahn logs "failing WebSocket connection (code=...)" when it sends the close
                d.wait_for_log(rf"code={code}\b", timeout)
                self.result.append(c.expect_close())
            except BaseException as e:
                self.result.append(e)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def code(self, timeout: float = 150.0) -> int | None:
        """The close code the client read."""
        self.thread.join(timeout)
        assert not self.thread.is_alive() and self.result, "no close read"
        if isinstance(self.result[0], BaseException):
            raise self.result[0]
        return self.result[0]  # type: ignore[return-value]


class PeakRss:
    """Samples a daemon's RSS every 10 ms in a thread until stopped."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.baseline = self.peak = d.rss_kib()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.01):
            self.peak = max(self.peak, self.d.rss_kib())

    def stop(self) -> float:
        """Stop sampling; the growth over the baseline in MiB."""
        self.stopped.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return (self.peak - self.baseline) / 1024


def test_slow_consumer_dropped_memory_flat_others_lose_nothing(daemon) -> None:
    d: Daemon = daemon("--max-backlog", "4M", "--ping-interval", "0")
    slow = Client(d.port, "/relay/flood", rcvbuf=4096)  # joins, never reads
    healthy = Client(d.port, "/relay/flood")
    publisher = Client(d.port, "/relay/flood")
    closed = CloseWatch(d, slow, 1008)
    rss = PeakRss(d)
    got: list[bytes] = []

    def read_healthy() -> bool:
        op, payload = healthy.recv_message()
        assert op == BINARY
        got.append(payload[:8])
        return True

    readers = Readers()
    readers.start("healthy", MESSAGES, read_healthy)
    # The publisher is a member too: it must keep reading its own echoes.
    readers.start("publisher", MESSAGES, lambda: publisher.recv_message()[0] == BINARY)
    for i in range(MESSAGES):
        readers.wait_behind(i)  # paced by its readers, never by the slow one
        publisher.send(i.to_bytes(8, "big") + b"\0" * (SIZE - 8))
    readers.join()
    growth_mib = rss.stop()

    assert [int.from_bytes(g, "big") for g in got] == list(range(MESSAGES))  # nothing lost
    assert closed.code() == 1008
    print(
        f"daemon RSS: baseline {rss.baseline} KiB, peak {rss.peak} KiB, growth {growth_mib:.1f} MiB"
    )
    # Unbounded, the silent client would pin ~64 MiB; bounded, a few MiB of buffers.
    assert growth_mib < 24, growth_mib
    healthy.close()
    publisher.close()
