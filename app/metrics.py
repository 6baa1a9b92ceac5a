"""Prometheus metrics, in a registry owned by one running service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .db.models import EditStatus


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.edits = Gauge("memoir_edits", "Edits in the log by status", ["status"], registry=r)
        self.queue_depth = Gauge("memoir_queue_depth", "Edits waiting to be applied", registry=r)
        self.memory_edits = Gauge("memoir_memory_edits", "Edits currently in the memory", registry=r)
        self.applied_seq = Gauge("memoir_applied_seq", "seq of the last edit in the memory", registry=r)
        self.edit_seconds = Histogram(
            "memoir_edit_seconds",
            "Time to train one edit",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.generate_seconds = Histogram(
            "memoir_generate_seconds",
            "Generation request latency",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.generate_requests = Counter(
            "memoir_generate_requests", "Generation requests by memory outcome", ["memory"], registry=r
        )
        self.generated_tokens = Counter("memoir_generated_tokens", "Tokens generated", registry=r)
        self.auth_failures = Counter("memoir_auth_failures", "Requests refused by API-key checks", ["status"], registry=r)
        self.rate_limited = Counter("memoir_rate_limited", "Requests refused by the rate limit", registry=r)

    def observe_generation(self, endpoint: str, seconds: float, fired: bool, tokens: int) -> None:
        self.generate_seconds.labels(endpoint).observe(seconds)
        self.generate_requests.labels("fired" if fired else "off").inc()
        self.generated_tokens.inc(tokens)

    def render(self, counts: dict[str, int] | None) -> bytes:
        """counts: edits per status; None (database unreachable) keeps the last ones."""
        if counts is not None:
            for status in EditStatus:
                self.edits.labels(status.value).set(counts.get(status.value, 0))
            self.queue_depth.set(counts.get(EditStatus.QUEUED.value, 0))
        return generate_latest(self.registry)
