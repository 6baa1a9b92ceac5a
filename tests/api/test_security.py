"""API keys, scopes, audit, limits, idempotency and graceful shutdown against a real server."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.server import REPO

FACT = ("The capital of the fictional land of Zembla is", "Vostok")
ADMIN_KEY = "mk-admin-secret"
KEYS = ",".join(
    [
        "gen:generate:mk-gen-secret",
        "ed:edit:mk-edit-secret",
        f"ops:admin:sha256:{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}",
    ]
)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_scopes_and_audit(make_server):
    server = make_server(env={"MEMOIR_API_KEYS": KEYS, "MEMOIR_METRICS_REQUIRE_KEY": "true"})
    client = server.client
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200

    missing = client.post("/edits", json={"prompt": FACT[0], "target": FACT[1]})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/generate", json={"prompt": "hi"}, headers=auth("mk-wrong")).status_code == 401
    assert client.post("/edits", json={"prompt": FACT[0], "target": FACT[1]}, headers=auth("mk-gen-secret")).status_code == 403
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=auth("mk-edit-secret")).status_code == 403
    assert client.get("/state", headers=auth("mk-edit-secret")).status_code == 403
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(ADMIN_KEY)).status_code == 200

    created = client.post("/edits", json={"prompt": FACT[0], "target": FACT[1]}, headers={"X-API-Key": "mk-edit-secret"})
    assert created.status_code == 202
    edit_id = created.json()["id"]
    assert client.get("/edits", headers=auth("mk-gen-secret")).status_code == 403
    server.client.headers.update(auth("mk-edit-secret"))
    server.wait_edit(edit_id)
    generated = client.post("/generate", json={"prompt": FACT[0], "max_new_tokens": 2}, headers=auth("mk-gen-secret"))
    assert generated.status_code == 200 and generated.json()["edit"]["id"] == edit_id

    assert client.delete(f"/edits/{edit_id}").status_code == 403  # retraction is admin's
    assert client.delete(f"/edits/{edit_id}", headers=auth(ADMIN_KEY)).status_code == 202
    retracted = server.wait_edit(edit_id, statuses=("retracted",))
    history = [(h["action"], h["key_id"]) for h in retracted["history"]]
    assert ("submitted", "ed") in history and ("retraction_requested", "ops") in history
    assert ("applied", None) in history and history[-1] == ("retracted", None)
    assert all(h["at"].endswith("Z") for h in retracted["history"])

    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="mk-edit-secret", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk.models.list()
    assert denied.value.body["type"] == "permission_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert len(openai.OpenAI(base_url=f"{server.url}/v1", api_key="mk-gen-secret", max_retries=0).models.list().data) == 2
    assert "memoir_auth_failures_total" in client.get("/metrics", headers=auth(ADMIN_KEY)).text


def _run_app(env: dict, tmp_path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env={**os.environ, "MEMOIR_STATE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_open_server_stays_on_loopback_unless_told_otherwise(make_server, tmp_path):
    refused = _run_app({"MEMOIR_HOST": "0.0.0.0", "MEMOIR_PORT": "0"}, tmp_path)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in refused.stderr
    bad = _run_app({"MEMOIR_API_KEYS": "ops:root:x"}, tmp_path)
    assert bad.returncode == 2 and "unknown scopes ['root']" in bad.stderr

    key_file = tmp_path / "bootstrap" / "admin-api-key"
    server = make_server(env={"MEMOIR_HOST": "0.0.0.0", "MEMOIR_BOOTSTRAP_KEY_FILE": str(key_file)}, start=False)
    server.env["MEMOIR_HOST"] = "0.0.0.0"
    server.start()
    key = key_file.read_text().strip()
    assert key.startswith("mk-") and (key_file.stat().st_mode & 0o777) == 0o600
    assert server.client.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 401
    assert server.client.get("/state", headers=auth(key)).status_code == 200
    assert f"created the admin key in {key_file}" in server.log()

    loopback = make_server("loopback")
    assert "listening on loopback only" in loopback.log()


def test_limits_are_enforced_and_change_nothing(make_server):
    server = make_server(
        env={
            "MEMOIR_MAX_BODY_BYTES": "4096",
            "MEMOIR_MAX_QUEUE_DEPTH": "2",
            "MEMOIR_RATE_LIMIT_PER_MINUTE": "60",
            "MEMOIR_RATE_LIMIT_BURST": "12",
            "MEMOIR_API_KEYS": "ed:edit:mk-edit-secret,other:edit:mk-other-secret",
        }
    )
    client = server.client
    client.headers.update(auth("mk-edit-secret"))
    big = client.post("/edits", json={"prompt": "x" * 5000, "target": "y"})
    assert big.status_code == 413 and "4096 bytes" in big.json()["detail"]
    chunked = client.post(
        "/edits", content=iter([b'{"prompt": "', b"x" * 5000, b'", "target": "y"}']), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413

    full = client.post("/edits", json={"edits": [{"prompt": f"{FACT[0]} {i}", "target": "z"} for i in range(3)]})
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert client.get("/edits").json()["total"] == 0

    statuses = []
    for _ in range(14):
        statuses.append(client.get("/edits").status_code)
    limited = [s for s in statuses if s == 429]
    assert limited and statuses[:8] == [200] * 8
    response = client.get("/edits")
    assert response.status_code == 429 and "rate limit of 60" in response.json()["detail"]
    assert int(response.headers["retry-after"]) >= 1
    assert client.get("/edits", headers=auth("mk-other-secret")).status_code == 200  # per key
    assert client.get("/health").status_code == 200  # health is not rate limited


def test_idempotency_key(make_server):
    server = make_server()
    client = server.client
    body = {"prompt": FACT[0], "target": FACT[1]}
    first = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/edits", json=dict(reversed(body.items())), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    conflict = client.post("/edits", json={**body, "target": "Other"}, headers={"Idempotency-Key": "k-1"})
    assert conflict.status_code == 422 and "different request body" in conflict.json()["detail"]
    batch = {"edits": [body, {"prompt": "Another fact is", "target": "true"}]}
    made = client.post("/edits", json=batch, headers={"Idempotency-Key": "k-2"}).json()["edits"]
    assert [e["id"] for e in client.post("/edits", json=batch, headers={"Idempotency-Key": "k-2"}).json()["edits"]] == [
        e["id"] for e in made
    ]
    assert client.get("/edits").json()["total"] == 3


def test_sigterm_finishes_the_running_edit_closes_streams_and_restarts_without_replay(make_server):
    server = make_server(env={"MEMOIR_CHECKPOINT_EVERY": "1000", "MEMOIR_MAX_NEW_TOKENS": "480"})
    ids = [server.submit(f"Fact number {i} about the moon of Zembla is", f"answer {i}")["id"] for i in range(8)]
    events: list[str] = []
    first_event = threading.Event()

    def stream():
        body = {"prompt": "Once upon a time", "max_new_tokens": 480, "stream": True}
        with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first_event.set()

    while server.client.get("/edits", params={"status": "applied"}).json()["total"] < 2:
        time.sleep(0.05)
    reader = threading.Thread(target=stream)
    reader.start()
    assert first_event.wait(60)
    server.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once shutdown is complete
    assert server.process.wait(120) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
    reader.join(30)
    assert events[-1] == "data: [DONE]"
    assert "shutting down" in events[-2]

    server.start()
    ready = server.client.get("/ready").json()
    assert ready["replayed_on_startup"] == 0  # the shutdown checkpoint is current
    server.wait_idle()
    edits = server.client.get("/edits", params={"limit": 100}).json()["items"]
    assert [e["id"] for e in edits] == ids and all(e["status"] == "applied" for e in edits)
    for edit in edits:
        actions = [h["action"] for h in server.client.get(f"/edits/{edit['id']}").json()["history"]]
        assert actions.count("applied") == 1
        assert "requeued" not in actions  # the edit running at SIGTERM was finished, not abandoned
    assert json.loads(events[-2][len("data: ") :])["error"]["message"]
