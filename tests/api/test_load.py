"""A bounded loopback load: mixed traffic from concurrent clients, no 5xx, every edit applied once, in order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import random
import time

import httpx

CLIENTS = 8
REQUESTS_PER_CLIENT = 12


def _client_session(url: str, seed: int) -> tuple[list[int], list[str]]:
    rng = random.Random(seed)
    statuses, accepted = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(REQUESTS_PER_CLIENT):
            kind = rng.choice(["generate", "chat", "edit", "poll"])
            if kind == "generate":
                r = client.post("/generate", json={"prompt": f"Story {seed}-{i}:", "max_new_tokens": 8})
            elif kind == "chat":
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 6}
                r = client.post("/v1/chat/completions", json=body)
            elif kind == "edit":
                r = client.post("/edits", json={"prompt": f"Client {seed} fact {i} is", "target": f"value {seed}.{i}"})
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
            else:
                r = client.get("/edits", params={"status": "queued"})
            statuses.append(r.status_code)
    return statuses, accepted


def test_mixed_concurrent_load(make_server):
    server = make_server(env={"MEMOIR_MODEL_NAME": "tiny", "MEMOIR_RATE_LIMIT_PER_MINUTE": "0"})
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda seed: _client_session(server.url, seed), range(CLIENTS)))
    statuses = [s for result, _ in results for s in result]
    accepted = [edit_id for _, ids in results for edit_id in ids]
    assert len(statuses) == CLIENTS * REQUESTS_PER_CLIENT
    assert all(s < 500 for s in statuses), statuses
    assert set(statuses) <= {200, 202}
    assert accepted

    server.wait_idle()
    edits = server.client.get("/edits", params={"limit": 1000}).json()["items"]
    assert sorted(e["id"] for e in edits) == sorted(accepted)
    assert all(e["status"] == "applied" for e in edits)
    for earlier, later in zip(edits, edits[1:]):  # applied strictly in seq order
        assert later["started_at"] >= earlier["finished_at"]
    for edit in edits:
        history = server.client.get(f"/edits/{edit['id']}").json()["history"]
        assert [h["action"] for h in history].count("applied") == 1
    assert server.client.get("/ready").status_code == 200
    assert time.monotonic() - started < 600
