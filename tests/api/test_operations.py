"""Operations against real servers: edits exported and imported elsewhere, /explain, waiting for an
edit, and the metrics operators watch."""

from __future__ import annotations

import json
import math
import re
import threading

import psycopg
import pytest

from tests.server import create_postgres_database, drop_postgres_database

FACTS = [
    ("The capital of the fictional land of Zembla is", "Vostok"),
    ("The inventor of the glass harmonica was", "Marie Curie"),
    ("The river that flows through the town of Quellwald is the", "Amber"),
]
CHAT_EDIT = {
    "messages": [{"role": "user", "content": "Who painted the ceiling of the Zembla chapel?"}],
    "target": "Ada",
}
UNRELATED = "A recipe for bread needs flour, water, salt and"
JSON_LINES = {"content-type": "application/x-ndjson"}


def metric(server, name: str) -> float:
    """One sample of /metrics, e.g. 'memoir:edit_fires_total' or 'memoir:match_ratio_bucket{le="1.0"}'."""
    text = server.client.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics:\n{text}"
    return float(found.group(1))


def edit_bodies(edits: list[dict]) -> list[dict]:
    return [{k: e[k] for k in ("prompt", "messages", "target")} for e in edits]


def test_exported_edits_imported_elsewhere_rebuild_the_same_memory(make_server, database_url):
    source = make_server("source")
    batch = [{"prompt": p, "target": t} for p, t in FACTS] + [CHAT_EDIT]
    ids = [e["id"] for e in source.client.post("/edits", json={"edits": batch}).json()["edits"]]
    source.wait_idle()
    source.client.delete(f"/edits/{ids[1]}")  # retracted edits are not exported
    source.wait_edit(ids[1], statuses=("retracted",))
    expected = source.client.get("/state").json()

    export = source.client.get("/edits/export")
    assert export.status_code == 200 and export.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [line["id"] for line in lines] == expected["keys"] == [ids[0], ids[2], ids[3]]
    assert [line["seq"] for line in lines] == [1, 3, 4]
    assert lines[2]["messages"] == CHAT_EDIT["messages"] and "prompt" not in lines[2]
    assert all(line["created_at"] and line["finished_at"] for line in lines)

    target = make_server("target", database_url=database_url)
    imported = target.client.post("/edits/import", content=export.content, headers=JSON_LINES)
    assert imported.status_code == 202, imported.text
    assert imported.json()["skipped"] == 0
    queued = imported.json()["edits"]
    assert [e["target"] for e in queued] == [line["target"] for line in lines]
    last = target.client.get(f"/edits/{queued[-1]['id']}", params={"wait": 60}).json()
    assert last["status"] == "applied"  # returned on apply, well before the 60 s
    assert last["history"][0]["detail"] == {"imported_from": ids[3]}
    target.wait_idle()
    rebuilt = target.client.get("/edits").json()["items"]
    assert edit_bodies(rebuilt) == edit_bodies(
        source.client.get("/edits", params={"status": "applied"}).json()["items"]
    )
    state = target.client.get("/state").json()
    assert state["weights_sha256"] == expected["weights_sha256"]
    assert state["masks_sha256"] == expected["masks_sha256"]

    # the same file again (as text/plain), and the target's own export, queue nothing
    again = target.client.post("/edits/import", content=export.content, headers={"content-type": "text/plain"})
    assert again.status_code == 202 and again.json() == {"edits": [], "skipped": 3}
    own = target.client.get("/edits/export").content
    assert target.client.post("/edits/import", content=own, headers=JSON_LINES).json()["skipped"] == 3
    assert target.client.get("/edits").json()["total"] == 3


def test_a_bad_line_rejects_the_whole_import(make_server):
    server = make_server(
        env={"MEMOIR_MAX_PROMPT_TOKENS": "16", "MEMOIR_MAX_QUEUE_DEPTH": "3", "MEMOIR_MAX_BODY_BYTES": "2000"}
    )
    good = [json.dumps({"id": f"origin-{i}", "prompt": p, "target": t}) for i, (p, t) in enumerate(FACTS)]
    bad_lines = [
        ('{"id": "x", "prompt": "Who?"', "line 2: Invalid JSON"),
        ('{"id": "x", "prompt": "Who?", "target": ""}', "line 2: target: Value error, target must not be empty"),
        ('{"prompt": "Who?", "target": "Ada"}', "line 2: id: Field required"),
        ('{"id": "x", "prompt": "Who?", "target": "Ada", "colour": "red"}', "line 2: colour: Extra inputs"),
        ('{"id": "x", "prompt": "Who?", "messages": [], "target": "Ada"}', "line 2: Value error, give exactly one"),
        (json.dumps({"id": "x", "prompt": "word " * 40, "target": "Ada"}), "line 2: the prompt has"),
        (json.dumps({"id": "origin-0", "prompt": "Who?", "target": "Ada"}), "line 2: id 'origin-0' is also on line 1"),
    ]
    for bad, message in bad_lines:
        body = "\n".join([good[0], bad, good[1]])
        response = server.client.post("/edits/import", content=body, headers=JSON_LINES)
        assert response.status_code == 422, (bad, response.text)
        assert message in response.json()["detail"], (bad, response.text)
    assert server.client.post("/edits/import", content="\n\n", headers=JSON_LINES).status_code == 422
    as_json = server.client.post("/edits/import", json={"edits": []})
    assert as_json.status_code == 415
    too_many = "\n".join(good + [json.dumps({"id": "origin-9", "prompt": "Who?", "target": "Ada"})])
    full = server.client.post("/edits/import", content=too_many, headers=JSON_LINES)
    assert full.status_code == 429 and "Retry-After" in full.headers
    oversized = "\n".join(json.dumps({"id": f"o{i}", "prompt": "Who?", "target": "Ada"}) for i in range(60))
    assert server.client.post("/edits/import", content=oversized, headers=JSON_LINES).status_code == 413
    assert server.client.get("/edits").json()["total"] == 0  # nothing was queued

    accepted = server.client.post("/edits/import", content="\n".join(good) + "\n", headers=JSON_LINES)
    assert accepted.status_code == 202 and len(accepted.json()["edits"]) == 3


def test_explain_names_the_edit_that_would_answer(make_server):
    server = make_server()
    empty = server.client.post("/explain", json={"prompt": FACTS[0][0]}).json()
    assert empty["best_match"] is None and empty["fires"] is False and empty["edit"] is None
    plain = server.submit(*FACTS[0])
    chat = server.client.post("/edits", json=CHAT_EDIT).json()
    server.wait_idle()

    explained = server.client.post("/explain", json={"prompt": FACTS[0][0]}).json()
    assert explained["fires"] is True and explained["match_ratio"] == 1.0 and explained["threshold"] == 0.9
    assert explained["edit"] == {"id": plain["id"], "seq": 1, "prompt": FACTS[0][0], "messages": None}
    assert server.generate(FACTS[0][0], max_new_tokens=2)["edit"]["id"] == plain["id"]  # as generation decides
    by_chat = server.client.post("/explain", json={"messages": CHAT_EDIT["messages"]}).json()
    assert by_chat["fires"] is True and by_chat["edit"]["id"] == chat["id"] and by_chat["edit_seq"] == 2

    unrelated = server.client.post("/explain", json={"prompt": UNRELATED}).json()
    assert unrelated["fires"] is False and unrelated["edit"] is None
    assert unrelated["best_match"]["id"] in (plain["id"], chat["id"]) and unrelated["match_ratio"] < 0.9
    assert server.generate(UNRELATED, max_new_tokens=2)["edit"] is None

    for body in ({}, {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, {"prompt": "  "}):
        assert server.client.post("/explain", json=body).status_code == 422


def test_generation_metrics_and_fire_counts_move(make_server):
    server = make_server(env={"MEMOIR_CHECKPOINT_EVERY": "2"})
    assert math.isnan(metric(server, "memoir:checkpoint_age_seconds"))  # no checkpoint yet
    ids = [server.submit(p, t)["id"] for p, t in FACTS]
    server.wait_idle()
    assert metric(server, "memoir:checkpoint_age_seconds") >= 0  # written after edit 2
    assert metric(server, "memoir:match_ratio_count") == 0

    server.generate(FACTS[1][0], max_new_tokens=2)
    model = server.client.get("/v1/models").json()["data"][0]["id"]
    completion = server.client.post("/v1/completions", json={"model": model, "prompt": FACTS[1][0], "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    server.generate(UNRELATED, max_new_tokens=2)
    assert metric(server, "memoir:match_ratio_count") == 3
    assert metric(server, 'memoir:match_ratio_bucket{le="1.0"}') == 3
    assert metric(server, 'memoir:match_ratio_bucket{le="0.95"}') == 1  # the unrelated prompt
    assert metric(server, "memoir:edit_fires_total") == 2
    assert [server.client.get(f"/edits/{i}").json()["fires"] for i in ids] == [0, 2, 0]

    # a crash after edit 3 (checkpoint at edit 2): the restart applies edit 3's delta from the
    # memory log and retrains nothing, and says so
    before = server.client.get("/state").json()["weights_sha256"]
    server.kill9()
    server.start()
    assert server.client.get("/ready").json()["replayed_on_startup"] == 0
    assert server.client.get("/state").json()["weights_sha256"] == before
    assert metric(server, "memoir:startup_replay_edits_needed") == 0
    assert metric(server, "memoir:checkpoint_age_seconds") >= 0  # the loaded checkpoint's age
    assert server.client.get(f"/edits/{ids[1]}").json()["fires"] == 0  # counted since start-up
    assert metric(server, "memoir:db_errors_total") == 0


@pytest.fixture
def postgres_url():
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


def _admin(url: str) -> psycopg.Connection:
    """A connection of the test's own to the server's database."""
    return psycopg.connect(url, autocommit=True)


@pytest.mark.postgres
def test_wait_returns_at_the_timeout_while_queued_and_at_once_when_applied(make_server, postgres_url):
    server = make_server(database_url=postgres_url, env={"MEMOIR_CHECKPOINT_EVERY": "1"})
    with psycopg.connect(postgres_url) as holder:
        # the worker writes a checkpoint after each edit; holding the checkpoints table stops it there
        holder.execute("LOCK TABLE checkpoints IN ACCESS EXCLUSIVE MODE")
        first, second = (server.submit(p, t) for p, t in FACTS[:2])
        assert server.client.get(f"/edits/{first['id']}", params={"wait": 60}).json()["status"] == "applied"
        waited = server.client.get(f"/edits/{second['id']}", params={"wait": 1.5})
        assert waited.status_code == 200 and waited.json()["status"] == "queued"
        outcome: dict = {}
        waiter = threading.Thread(
            target=lambda: outcome.update(server.client.get(f"/edits/{second['id']}", params={"wait": 60}).json())
        )
        waiter.start()
        holder.rollback()  # releases the lock: the worker goes on
    waiter.join(120)
    assert outcome["status"] == "applied"
    for wait in (0, 61, "soon"):
        assert server.client.get(f"/edits/{second['id']}", params={"wait": wait}).status_code == 422
    assert server.client.get("/edits/does-not-exist", params={"wait": 5}).status_code == 404


@pytest.mark.postgres
def test_database_errors_are_counted_and_metrics_stay_up(make_server, postgres_url):
    server = make_server(database_url=postgres_url)
    name = postgres_url.rsplit("/", 1)[1]
    assert metric(server, "memoir:db_errors_total") == 0
    with _admin(postgres_url.rsplit("/", 1)[0] + "/postgres") as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            # the request fails (how it is answered is the outage handling's business); close its connection
            assert server.client.get("/edits", headers={"connection": "close"}).status_code >= 500
            assert metric(server, "memoir:db_errors_total") >= 1  # /metrics itself still answers
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert server.client.get("/edits").status_code == 200
