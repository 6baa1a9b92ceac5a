"""Fault injection on real servers and a real PostgreSQL: a database that goes away (a loopback
proxy between the server and PostgreSQL, cut for seconds) and kill -9 at random points of a
bounded mixed load.

Each test asserts the service's promises: every accepted edit is applied exactly once, in seq
order; a restart rebuilds exactly the memory that was served; while the database is gone the
endpoints that need it answer 503 with Retry-After (never 500) and generation keeps serving; the
server is ready again once the database is back, without help.
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from tests.proxy import CuttableProxy
from tests.server import Server, create_postgres_database, drop_postgres_database, until

pytestmark = pytest.mark.postgres

FACTS = [(f"The secret code of vault number {i} in the old bank is", f"code {100 + 7 * i}") for i in range(40)]
# seconds per edit on the tiny model, so that a cut lands mid-training
SLOW_EDITS = {"MEMOIR_EDIT_MAX_ITERATIONS": "100", "MEMOIR_CHECKPOINT_EVERY": "1"}


@pytest.fixture
def proxied_database():
    """A fresh PostgreSQL database, and its URL through a proxy the test can cut."""
    url = create_postgres_database()
    with CuttableProxy(5432) as proxy:
        yield proxy, url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    drop_postgres_database(url)


def edits(server: Server) -> list[dict]:
    response = server.client.get("/edits", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def served(server: Server) -> dict:
    return server.client.get("/state").json()


def assert_database_gone(server: Server) -> None:
    """503 + Retry-After where the database is needed; generation still served from memory."""
    until(lambda: server.client.get("/ready").status_code == 503, "/ready stayed 200 without the database", 30)
    known = served(server)["keys"] or ["00000000-0000-0000-0000-000000000000"]
    for response in (
        server.client.post("/edits", json={"prompt": "While the database is away the sky is", "target": "grey"}),
        server.client.get("/edits"),
        server.client.get(f"/edits/{known[0]}"),
        server.client.delete(f"/edits/{known[0]}"),
        server.client.get("/edits/export"),  # never a 200 that reads as an empty log
        server.client.get("/ready"),
    ):
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
    assert server.client.get("/metrics").status_code == 200
    assert server.generate("The capital of France is", max_new_tokens=3)["completion_tokens"] > 0
    model = server.client.get("/v1/models").json()["data"][0]["id"]
    completion = server.client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3})
    assert completion.status_code == 200, completion.text


def assert_back(server: Server) -> None:
    until(lambda: server.client.get("/ready").status_code == 200, "not ready again after the database returned")


def assert_log_is_memory(server: Server, accepted: list[str], retracted: set[str] = frozenset()) -> None:
    """Once idle: each accepted edit applied exactly once, in seq order, and the memory holds
    exactly the applied edits in that order."""
    server.wait_idle()
    log = edits(server)
    by_id = {e["id"]: e for e in log}
    seqs = [by_id[edit_id]["seq"] for edit_id in accepted]
    assert seqs == sorted(seqs)
    for edit_id in accepted:
        assert by_id[edit_id]["status"] == ("retracted" if edit_id in retracted else "applied"), by_id[edit_id]
        actions = [h["action"] for h in server.client.get(f"/edits/{edit_id}").json()["history"]]
        assert actions.count("applied") == 1, actions
    assert "While the database is away the sky is" not in [e["prompt"] for e in log]  # a 503 changed nothing
    assert served(server)["keys"] == [e["id"] for e in log if e["status"] == "applied"]


def assert_restart_rebuilds(server: Server) -> dict:
    before = served(server)
    server.kill9()
    server.start()
    after = served(server)
    for field in ("keys", "weights_sha256", "masks_sha256"):
        assert after[field] == before[field], field
    return after


def test_outage_while_an_edit_trains(make_server, proxied_database):
    proxy, url = proxied_database
    server = make_server("train", env=SLOW_EDITS, database_url=url)
    accepted = [server.submit(*fact)["id"] for fact in FACTS[:2]]
    until(lambda: edits(server)[0]["status"] == "running", "the first edit never started")
    proxy.cut()
    # the edit in training is published while its record waits for the database; nothing after it runs
    until(lambda: served(server)["keys"], "the edit trained during the outage was never published")
    assert_database_gone(server)
    time.sleep(3)
    assert served(server)["keys"] == accepted[:1]
    proxy.restore()
    assert_back(server)
    assert_log_is_memory(server, accepted)
    assert_restart_rebuilds(server)


def test_outage_during_submissions(make_server, proxied_database):
    proxy, url = proxied_database
    server = make_server("submit", env={"MEMOIR_EDIT_MAX_ITERATIONS": "5"}, database_url=url)
    facts = FACTS[:20]
    accepted: list[str] = []
    answers: list[int] = []
    problems: list[str] = []

    def client():  # retries each fact with its own Idempotency-Key until it is accepted
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for i, (prompt, target) in enumerate(facts):
                while True:
                    response = http.post(
                        "/edits", json={"prompt": prompt, "target": target}, headers={"Idempotency-Key": f"fact-{i}"}
                    )
                    answers.append(response.status_code)
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                        break
                    if response.status_code != 503 or "Retry-After" not in response.headers:
                        problems.append(f"{response.status_code} {response.text}")
                        return
                    time.sleep(0.2)

    submitter = threading.Thread(target=client)
    submitter.start()
    until(lambda: len(accepted) >= 5, "the first submissions were not accepted")
    proxy.cut()
    until(lambda: answers.count(503) >= 3, "submissions during the outage were not refused")
    assert_database_gone(server)
    time.sleep(3)
    proxy.restore()
    submitter.join(300)
    assert not problems, problems
    assert len(accepted) == len(facts) and len(set(accepted)) == len(facts)
    assert_back(server)
    assert_log_is_memory(server, accepted)
    # each fact is in the log once, in order: a 503 whose commit did land was replayed by its key
    assert [e["target"] for e in edits(server)] == [target for _, target in facts]
    assert_restart_rebuilds(server)


def test_outage_during_a_retraction_and_checkpoint_writes(make_server, proxied_database):
    proxy, url = proxied_database
    env = {"MEMOIR_CHECKPOINT_EVERY": "1", "MEMOIR_EDIT_MAX_ITERATIONS": "40"}
    server = make_server("retract", env=env, database_url=url)
    accepted = [server.submit(*fact)["id"] for fact in FACTS[:4]]
    server.wait_idle()
    # retracting the first edit retrains the three after it; the database goes during that
    assert server.client.delete(f"/edits/{accepted[0]}").status_code == 202
    time.sleep(1.0)
    proxy.cut()
    until(lambda: served(server)["keys"] == accepted[1:], "the retraction was never published")
    assert_database_gone(server)
    proxy.restore()
    assert_back(server)
    assert_log_is_memory(server, accepted, retracted={accepted[0]})
    # then a flapping database while edits train and checkpoints are written after each
    rng = random.Random(23)
    accepted += [server.submit(*fact)["id"] for fact in FACTS[4:7]]
    for _ in range(3):
        time.sleep(rng.uniform(0.2, 2.0))
        proxy.cut()
        time.sleep(rng.uniform(1.0, 3.0))
        proxy.restore()
    assert_back(server)
    assert_log_is_memory(server, accepted, retracted={accepted[0]})
    checkpoints = sorted((server.state_dir / "checkpoints").glob("ckpt-*.safetensors"))
    assert checkpoints  # the restart below starts from one
    assert_restart_rebuilds(server)


def test_kill_9_at_random_points_of_a_mixed_load(make_server):
    url = create_postgres_database()
    try:
        server = make_server("crash", env={"MEMOIR_EDIT_MAX_ITERATIONS": "20"}, database_url=url)
        rng = random.Random(2323)
        facts = iter(FACTS)
        accepted: list[str] = []
        retracted: set[str] = set()
        cancelled: set[str] = set()
        server_errors: list[str] = []  # answers other than expected (200 for good, 422 for hostile)

        hostile = [  # bad requests in the load: each must be refused alone, with a 4xx
            {"prompt": "Story:", "max_new_tokens": 8, "temperature": 0.7, "seed": 99999999999999999999999},
            {"prompt": "Story\x00:", "max_new_tokens": 8},
        ]

        def generate(http: httpx.Client, i: int) -> None:
            body = hostile[i - 3] if i >= 3 else {"prompt": f"Story number {i}:", "max_new_tokens": 8}
            try:
                response = http.post("/generate", json=body)
            except httpx.TransportError:  # killed mid-request
                return
            if response.status_code != (200 if i < 3 else 422):
                server_errors.append(f"{response.status_code} {response.text}")

        for round_ in range(3):
            with httpx.Client(base_url=server.url, timeout=60) as http:
                readers = [threading.Thread(target=generate, args=(http, i)) for i in range(5)]
                for reader in readers:
                    reader.start()
                accepted += [server.submit(*next(facts))["id"] for _ in range(3)]
                batch = server.client.post("/edits", json={"edits": [dict(zip(("prompt", "target"), next(facts)))]})
                assert batch.status_code == 202
                accepted += [e["id"] for e in batch.json()["edits"]]
                deleted = server.client.delete(f"/edits/{accepted[-1]}")
                if deleted.status_code == 200:
                    cancelled.add(accepted[-1])
                applied = [e["id"] for e in edits(server) if e["status"] == "applied"]
                if round_ % 2 and applied:
                    assert server.client.delete(f"/edits/{applied[0]}").status_code == 202
                    retracted.add(applied[0])
                time.sleep(rng.uniform(0.0, 3.0))
                at_kill = served(server)
                server.kill9()
                for reader in readers:
                    reader.join(60)
            server.start()
            server.wait_idle()
            final = served(server)["keys"]
            kept = [key for key in at_kill["keys"] if key not in retracted]
            assert final[: len(kept)] == kept  # what was served is still there, in the same order
        assert not server_errors, server_errors
        live = [edit_id for edit_id in accepted if edit_id not in cancelled]
        assert_log_is_memory(server, live, retracted)
        expected = assert_restart_rebuilds(server)
        surviving = [(e["prompt"], e["target"]) for e in edits(server) if e["status"] == "applied"]
        server.stop()
    finally:
        drop_postgres_database(url)

    # an uninterrupted server given the surviving edits in order builds the same memory
    reference = make_server("reference", env={"MEMOIR_EDIT_MAX_ITERATIONS": "20"})
    for fact in surviving:
        reference.submit(*fact)
    reference.wait_idle()
    assert served(reference)["weights_sha256"] == expected["weights_sha256"]


def test_black_holed_database(make_server, proxied_database):
    """The database stops answering without closing anything (the proxy drops every byte): no
    request and no worker step hangs. Each call that needs the database fails as unavailable
    within MEMOIR_DATABASE_TIMEOUT_S (a few times it at most: a ping, then a fresh connection),
    so it answers 503 with Retry-After; once the database answers again the worker resumes."""
    proxy, url = proxied_database
    timeout_s = 2
    env = {"MEMOIR_EDIT_MAX_ITERATIONS": "5", "MEMOIR_DATABASE_TIMEOUT_S": str(timeout_s)}
    server = make_server("blackhole", env=env, database_url=url)
    accepted = [server.submit(*FACTS[0])["id"]]
    server.wait_edit(accepted[0])
    accepted.append(server.submit(*FACTS[1])["id"])  # accepted just before: trained, recorded after
    proxy.blackhole()

    with httpx.Client(base_url=server.url, timeout=120) as http:  # its own, fresh connections
        for method, path, body in (
            ("POST", "/edits", {"prompt": "While the database is away the sky is", "target": "grey"}),
            ("GET", "/edits", None),
            ("GET", f"/edits/{accepted[0]}", None),
        ):
            started = time.monotonic()
            response = http.request(method, path, json=body)
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            assert took < 30, f"{method} {path} took {took:.1f} s"  # bounded: it did not hang
        started = time.monotonic()
        until(lambda: http.get("/ready").status_code == 503, "/ready stayed 200 with the database black-holed", 30)
        assert time.monotonic() - started < 30
        # generation is served from memory meanwhile
        assert server.generate("The capital of France is", max_new_tokens=3)["completion_tokens"] > 0

    time.sleep(timeout_s * 2)  # the worker's database calls time out and are retried meanwhile
    proxy.restore()
    assert_back(server)
    accepted.append(server.submit(*FACTS[2])["id"])  # and one after
    server.wait_idle(120)  # the worker resumed by itself
    assert_log_is_memory(server, accepted)  # each applied exactly once, in order, the 503 wrote nothing
    assert_restart_rebuilds(server)
