"""A bounded loopback load (bench/load.py, smaller, on the tiny model): no 5xx, every edit applied once, in order."""

from __future__ import annotations

from bench.load import check_edits, run_load


def test_mixed_concurrent_load(make_server):
    server = make_server(env={"MEMOIR_MODEL_NAME": "tiny", "MEMOIR_RATE_LIMIT_PER_MINUTE": "0"})
    log, seconds = run_load(server.url, clients=8, requests=12, model="tiny")
    assert len(log.statuses) == 96
    assert set(log.statuses) <= {200, 202}, log.statuses
    assert log.accepted and set(log.latencies) == {"generate", "chat", "edit", "poll"}
    check_edits(server, log.accepted)
    assert server.client.get("/ready").status_code == 200
    assert seconds < 600
