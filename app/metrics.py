"""Prometheus metrics, in a registry owned by one running service.

The metrics added for operations use vLLM's naming (`memoir:<name>`); the older `memoir_*` names
stay as they were. Which edit fired is not a label (one series per edit would grow without
bound): per-edit fire counts are kept here, since start-up, and shown on GET /edits/{id}.
"""

from __future__ import annotations

from collections import Counter as Tally
import math
import time
from typing import Callable

from memoir_core.memory import Decision
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
        self.compaction_seconds = Histogram(
            "memoir_compaction_seconds",
            "Time to record a whole state in the memory log (blob put and row) and prune behind it",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
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
        self.match_ratio = Histogram(
            "memoir:match_ratio",
            "Best stored-mask overlap ratio per generation request (requests with edits stored)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.edit_fires = Counter("memoir:edit_fires", "Generation requests answered by an edit's memory", registry=r)
        self.db_errors = Counter("memoir:db_errors", "Errors raised by the database or its driver", registry=r)
        self.checkpoint_age = Gauge(
            "memoir:checkpoint_age_seconds",
            "Seconds since the newest checkpoint was written (NaN: none yet)",
            registry=r,
        )
        self.checkpoint_write_failures = Counter(
            "memoir:checkpoint_write_failures",
            "Checkpoint files that could not be written (full disk, quota, I/O error)",
            registry=r,
        )
        self.checkpoint_writes_failing = Gauge(
            "memoir:checkpoint_writes_failing",
            "1 while checkpoint writes fail (since the last one that succeeded), 0 otherwise",
            registry=r,
        )
        self.replay_done = Gauge(
            "memoir:startup_replay_edits_done", "Edits replayed so far during start-up", registry=r
        )
        self.replay_needed = Gauge(
            "memoir:startup_replay_edits_needed", "Edits the start-up replay has to retrain", registry=r
        )
        self.leader = Gauge("memoir:leader", "1 while this replica leads (trains edits), 0 while it follows", registry=r)
        self.log_position = Gauge("memoir:memory_log_position", "Memory-log position of the served memory", registry=r)
        self.lag_changes = Gauge(
            "memoir:replica_lag_changes", "Memory-log changes recorded but not yet applied here", registry=r
        )
        self.lag_seconds = Gauge("memoir:replica_lag_seconds", "Age of the oldest change not yet applied here", registry=r)
        self.fires_by_edit: Tally[str] = Tally()

    def watch_checkpoints(self, last_written: Callable[[], float | None], failing: Callable[[], bool]) -> None:
        """The checkpoint age and whether writes fail are read at each scrape: `last_written` (a
        time.time() value) and `failing`."""
        self.checkpoint_age.set_function(lambda: math.nan if (at := last_written()) is None else time.time() - at)
        self.checkpoint_writes_failing.set_function(lambda: 1.0 if failing() else 0.0)

    def role_changed(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)

    def observe_lag(self, changes: int, seconds: float) -> None:
        self.lag_changes.set(changes)
        self.lag_seconds.set(seconds)

    def replay_progress(self, done: int, needed: int) -> None:
        self.replay_done.set(done)
        self.replay_needed.set(needed)

    def observe_generation(self, endpoint: str, seconds: float, decision: Decision | None, tokens: int) -> None:
        fired = decision is not None and decision.active
        self.generate_seconds.labels(endpoint).observe(seconds)
        self.generate_requests.labels("fired" if fired else "off").inc()
        self.generated_tokens.inc(tokens)
        if decision is not None and decision.match is not None:
            self.match_ratio.observe(decision.match.ratio)
        if fired:
            self.edit_fires.inc()
            self.fires_by_edit[decision.match.key] += 1

    def render(self, counts: dict[str, int] | None) -> bytes:
        """counts: edits by status, or None when the database cannot say (the gauges keep their values)."""
        if counts is not None:
            for status in EditStatus:
                self.edits.labels(status.value).set(counts.get(status.value, 0))
            self.queue_depth.set(counts.get(EditStatus.QUEUED.value, 0))
        return generate_latest(self.registry)
