"""What operators poll: ``/healthz`` and ``/metrics`` (Prometheus text format).

The numbers come from ``chatd.stats.Stats`` and the hub at scrape time, so
collecting them costs the message path nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

from chatd import __version__
from chatd.hub import Hub
from chatd.stats import Stats


class Health:
    """The daemon's state as /healthz reports it."""

    def __init__(self) -> None:
        self.started = time.time()
        self.stopping = False
        self.problems: dict[str, str] = {}  # name -> why; any problem: "degraded"

    def status(self) -> str:
        if self.stopping:
            return "stopping"
        return "degraded" if self.problems else "ok"


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, health: Health, stats: Stats, hub: Hub) -> None:
        super().__init__()
        self.health, self.stats, self.hub = health, stats, hub

    def render_GET(self, request: Request) -> bytes:
        status = self.health.status()
        request.setResponseCode(200 if status == "ok" else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "status": status,
            "version": __version__,
            "uptime_s": round(time.time() - self.health.started, 1),
            "connections": sum(self.stats.connections.values()),
            "rooms": sum(self.hub.room_counts().values()),
        }
        if self.health.problems:
            body["problems"] = self.health.problems
        return json.dumps(body).encode() + b"\n"


class Collector:
    """Reads Stats and the hub when Prometheus scrapes."""

    def __init__(self, stats: Stats, hub: Hub, health: Health) -> None:
        self.stats, self.hub, self.health = stats, hub, health

    def collect(self) -> Iterator[Metric]:
        s = self.stats

        def labelled(
            family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, int]
        ) -> Metric:
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        def counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> Metric:
            return labelled(CounterMetricFamily(name, doc, labels=[label]), values)

        yield labelled(
            GaugeMetricFamily(
                "chatd_connections", "Open connections (WebSocket, or sse).", labels=["kind"]
            ),
            s.connections,
        )
        yield counter(
            "chatd_connections_opened", "WebSocket connections opened.", "kind", s.connections_total
        )
        yield counter(
            "chatd_messages_received", "Messages received from clients.", "kind", s.messages_in
        )
        yield counter(
            "chatd_received_bytes", "Payload bytes received from clients.", "kind", s.bytes_in
        )
        yield counter(
            "chatd_messages_sent",
            "Messages sent to clients (one per recipient).",
            "room_kind",
            s.deliveries,
        )
        yield counter(
            "chatd_sent_bytes", "Payload bytes sent to clients.", "room_kind", s.bytes_out
        )
        yield counter(
            "chatd_auth_refused", "Connection tokens refused, by reason.", "reason", s.auth_refused
        )
        yield counter(
            "chatd_rate_limited", "Messages refused by the rate limit.", "kind", s.rate_limited
        )
        yield counter(
            "chatd_slow_consumers_dropped",
            "Clients dropped for not reading (backlog, overload) or failed writes.",
            "reason",
            s.dropped,
        )
        yield counter(
            "chatd_closes", "Closed WebSocket connections by close code.", "code", s.close_codes
        )
        yield counter(
            "chatd_api_requests", "Push API requests by HTTP status.", "status", s.api_requests
        )
        yield counter(
            "chatd_connections_refused",
            "Connections dropped at accept: pending (--max-pending: the one waiting "
            "longest for its request head), per_ip (--max-connections-per-ip: the new one).",
            "reason",
            {"pending": 0, "per_ip": 0, **s.refused},
        )
        yield CounterMetricFamily(
            "chatd_request_head_timeouts",
            "Connections dropped for not sending a whole request head within --handshake-timeout.",
            s.head_timeouts,
        )
        pending = GaugeMetricFamily(
            "chatd_connections_pending", "Connections waiting for a request head."
        )
        pending.add_metric([], s.pending)
        yield pending
        # Counted, not listed: anyone can scrape, so a scrape costs the same
        # with ten rooms or a hundred thousand.
        yield labelled(
            GaugeMetricFamily("chatd_rooms", "Rooms with members.", labels=["kind"]),
            self.hub.room_counts(),
        )
        h = s.history_commit
        yield HistogramMetricFamily(
            "chatd_history_commit_seconds",
            "Time to commit a batch of chat messages to the history database.",
            buckets=h.cumulative(),
            sum_value=h.total,
        )
        if s.redis_up is not None:
            redis = GaugeMetricFamily("chatd_redis_up", "1 while this node is connected to Redis.")
            redis.add_metric([], s.redis_up)
            yield redis
            yield CounterMetricFamily(
                "chatd_redis_reconnects",
                "Times the Redis connection came back.",
                s.redis_reconnects,
            )
            yield counter(
                "chatd_cluster_events",
                "Events received from Redis: m message, j/l presence, k join marker, "
                "gap message read back after an outage, reset room with a new history epoch.",
                "kind",
                s.cluster_events,
            )
            yield CounterMetricFamily(
                "chatd_cluster_reaped_members",
                "Members of dead nodes removed by this node.",
                s.cluster_reaped,
            )
        if s.webhook_queue is not None:
            queue = GaugeMetricFamily(
                "chatd_webhook_queue", "Webhook events queued or being sent (--webhook-queue)."
            )
            queue.add_metric([], s.webhook_queue)
            yield queue
            types = dict.fromkeys(("user.online", "user.offline", "message.created"), 0)
            yield counter(
                "chatd_webhook_sent",
                "Webhook events the back end took (2xx), by type.",
                "type",
                {**types, **s.webhook_sent},
            )
            yield counter(
                "chatd_webhook_failed",
                "Webhook events given up on (retries exhausted, or a 4xx), by type.",
                "type",
                {**types, **s.webhook_failed},
            )
            yield CounterMetricFamily(
                "chatd_webhook_dropped",
                "Webhook events dropped because the queue was full (a slow or dead back end).",
                s.webhook_dropped,
            )
        up = GaugeMetricFamily("chatd_up", "1 when healthy, 0 when degraded or stopping.")
        up.add_metric([], 1 if self.health.status() == "ok" else 0)
        yield up


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, collector: Collector) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self.registry)


def ops_children(health: Health, stats: Stats, hub: Hub) -> dict[bytes, Resource]:
    return {
        b"healthz": HealthResource(health, stats, hub),
        b"metrics": MetricsResource(Collector(stats, hub, health)),
    }


__all__ = ["Health", "ops_children"]
