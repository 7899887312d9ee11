"""What chatd counts, as plain numbers: cheap to update on any path.

The protocols and the hub add to these; ``chatd.ops`` turns them into
the Prometheus text format only when scraped, so the hot path pays an
integer addition, never a lock or a label lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter


class Histogram:
    """Cumulative buckets, as Prometheus has them (upper bounds in seconds)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Stats:
    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()  # open now, by kind
        self.connections_total: Counter[str] = Counter()  # opened, by kind
        self.messages_in: Counter[str] = Counter()  # by kind
        self.bytes_in: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()  # frames sent, by room kind
        self.bytes_out: Counter[str] = Counter()  # payload bytes sent, by room kind
        self.rate_limited: Counter[str] = Counter()  # by kind
        self.dropped: Counter[str] = Counter()  # by reason: backlog, overload, error
        self.close_codes: Counter[str] = Counter()  # by code, as a string
        self.api_requests: Counter[str] = Counter()  # by status code
        self.refused: Counter[str] = Counter()  # connections dropped at accept, by reason
        self.head_timeouts = 0  # connections dropped for a request head not sent in time
        self.pending = 0  # connections waiting for a request head now
        self.history_commit = Histogram(
            (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
        )
        # Cluster nodes only (--redis): None means not a cluster member.
        self.redis_up: int | None = None
        self.cluster_events: Counter[str] = Counter()  # from Redis, by kind (m j l k gap reset)
        self.cluster_reaped = 0  # members of dead nodes this node removed
        self.redis_reconnects = 0
        self.auth_refused: Counter[str] = (
            Counter()
        )  # tokens refused, by reason  # times the Redis connection came back
        # Webhooks only (--webhook-url): None means they are off.
        self.webhook_queue: int | None = None  # events queued or being sent now
        self.webhook_sent: Counter[str] = Counter()  # taken by the back end, by type
        self.webhook_failed: Counter[str] = Counter()  # given up on, by type
        self.webhook_dropped = 0  # not queued: the queue was full
