"""A bounded loopback load: mixed traffic from concurrent clients against a real server.

    python -m bench.load --clients 8 --requests 25 --out runs/bench/load.json

Each client sends a random mix of /generate, /v1/chat/completions, POST /edits and status polls,
back to back. Afterwards every accepted edit must be applied exactly once and in seq order, no
response may be a 5xx, and the server must still be ready. tests/api/test_load.py runs the same
load, smaller, on a tiny model.
"""

from __future__ import annotations

import argparse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
import random
import tempfile
import time

import httpx

from bench.common import percentile, table, write_json


@dataclass
class ClientLog:
    statuses: list[int] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)


def client_session(url: str, seed: int, requests: int, model: str, max_tokens: int) -> ClientLog:
    rng = random.Random(seed)
    log = ClientLog()
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(requests):
            kind = rng.choice(["generate", "chat", "edit", "poll"])
            started = time.monotonic()
            if kind == "generate":
                response = client.post("/generate", json={"prompt": f"Story {seed}-{i}:", "max_new_tokens": max_tokens})
            elif kind == "chat":
                body = {"model": model, "messages": [{"role": "user", "content": f"Say hello number {i}"}], "max_tokens": max_tokens}
                response = client.post("/v1/chat/completions", json=body)
            elif kind == "edit":
                body = {"prompt": f"The code of locker {seed}-{i} is", "target": f"{1000 * seed + i}"}
                response = client.post("/edits", json=body)
                if response.status_code == 202:
                    log.accepted.append(response.json()["id"])
            else:
                response = client.get("/edits", params={"status": "queued"})
            log.latencies.setdefault(kind, []).append(time.monotonic() - started)
            log.statuses.append(response.status_code)
    return log


def run_load(url: str, clients: int, requests: int, model: str, max_tokens: int = 8) -> tuple[ClientLog, float]:
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        logs = list(pool.map(lambda seed: client_session(url, seed, requests, model, max_tokens), range(clients)))
    merged = ClientLog()
    for log in logs:
        merged.statuses += log.statuses
        merged.accepted += log.accepted
        for kind, values in log.latencies.items():
            merged.latencies.setdefault(kind, []).extend(values)
    return merged, time.monotonic() - started


def check_edits(server, accepted: list[str]) -> list[dict]:
    """Every accepted edit applied exactly once, in seq order; returns the edits."""
    server.wait_idle()
    edits = server.client.get("/edits", params={"limit": 1000}).json()["items"]
    assert sorted(e["id"] for e in edits) == sorted(accepted)
    assert all(e["status"] == "applied" for e in edits)
    for earlier, later in zip(edits, edits[1:]):
        assert later["started_at"] >= earlier["finished_at"]
    for edit in edits:
        history = server.client.get(f"/edits/{edit['id']}").json()["history"]
        assert [h["action"] for h in history].count("applied") == 1
    return edits


def main() -> None:
    from tests.server import Server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    server = Server(Path(tempfile.mkdtemp(prefix="memoir-load-")), {"MEMOIR_DEVICE": "cpu"}).start()
    try:
        model = server.client.get("/v1/models").json()["data"][0]["id"]
        log, seconds = run_load(server.url, args.clients, args.requests, model, args.max_tokens)
        drained_started = time.monotonic()
        check_edits(server, log.accepted)
        drain = time.monotonic() - drained_started
        ready = server.client.get("/ready").status_code
    finally:
        server.stop()
    counts = Counter(log.statuses)
    assert all(status < 500 for status in counts), counts
    rows = [[kind, len(values), percentile(values, 0.5), percentile(values, 0.99)] for kind, values in sorted(log.latencies.items())]
    print(table(["request", "count", "p50 s", "p99 s"], rows))
    summary = {
        "clients": args.clients,
        "requests": len(log.statuses),
        "seconds": seconds,
        "requests_per_s": len(log.statuses) / seconds,
        "status_counts": dict(counts),
        "edits_accepted": len(log.accepted),
        "seconds_to_apply_remaining_edits": drain,
        "ready_after": ready,
        "latency": {kind: {"p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99)} for kind, v in log.latencies.items()},
    }
    print(f"{summary['requests']} requests from {args.clients} clients in {seconds:.1f}s ({summary['requests_per_s']:.2f}/s), "
          f"statuses {dict(counts)}, {len(log.accepted)} edits applied in order, ready={ready}")
    write_json(args.out, {"benchmark": "load", **summary})


if __name__ == "__main__":
    main()
