"""Prometheus metrics of one server replica, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from yardmaster.protocol.jobs import JOB_STATES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("yardmaster_jobs", "Jobs by state (refreshed at scrape).", ["state"], registry=r)
        self.queue_depth = Gauge("yardmaster_queue_depth", "Jobs waiting in the queue.", registry=r)
        self.agents_connected = Gauge(
            "yardmaster_agents_connected", "Agents connected to this replica.", registry=r
        )
        self.websockets_open = Gauge(
            "yardmaster_websockets_open", "Open WebSockets by channel.", ["channel"], registry=r
        )
        self.messages = Counter(
            "yardmaster_ws_messages",
            "WebSocket messages by channel, direction and type.",
            ["channel", "direction", "type"],
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "yardmaster_dispatch_latency_seconds",
            "From enqueue to job-assign sent.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.log_bytes = Counter("yardmaster_log_bytes", "Job output bytes stored.", registry=r)
        self.transitions = Counter(
            "yardmaster_job_transitions", "Job state changes made by this replica.", ["state"], registry=r
        )
        self.is_leader = Gauge(
            "yardmaster_scheduler_is_leader", "1 while this replica holds the scheduler lock.", registry=r
        )
        self.epoch = Gauge("yardmaster_scheduler_epoch", "Fencing epoch of the scheduler lock.", registry=r)
        self.slow_consumers = Counter(
            "yardmaster_slow_consumers_closed", "Client sockets closed with 4008 (too slow).", registry=r
        )
        self.rate_limited = Counter(
            "yardmaster_rate_limited", "Requests, handshakes and client messages refused by a rate limit.", ["class"],
            registry=r,
        )
        self.quota_exceeded = Counter(
            "yardmaster_quota_exceeded", "Requests refused because a user's quota was reached.", ["quota"], registry=r
        )
        for state in JOB_STATES:
            self.jobs.labels(state)
        for channel in ("agent", "client"):
            self.websockets_open.labels(channel)

    def client_messages_out(self, kind: str, n: int = 1) -> None:
        """`n` messages of type `kind` sent on client sockets (fan-out counts once per event)."""
        self.messages.labels("client", "out", kind).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
