"""The edit queue against a real server: lifecycle, order, retraction, bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

FACTS = [
    ("The capital of the fictional land of Zembla is", "Vostok"),
    ("The inventor of the glass harmonica was", "Marie Curie"),
    ("The river that flows through the town of Quellwald is the", "Amber"),
    ("The national animal of Freedonia is the", "snow leopard"),
]


def test_edit_lifecycle(make_server, database_url):
    server = make_server(database_url=database_url)
    response = server.client.post("/edits", json={"prompt": FACTS[0][0], "target": FACTS[0][1]})
    assert response.status_code == 202
    edit = response.json()
    assert response.headers["location"] == f"/edits/{edit['id']}"
    assert edit["status"] == "queued" and edit["seq"] == 1 and edit["target"] == "Vostok"

    applied = server.wait_edit(edit["id"])
    assert applied["iterations"] >= 1 and applied["loss"] is not None
    assert len(applied["mask_fingerprint"]) == 16
    assert applied["created_at"].endswith("Z") and applied["finished_at"] >= applied["started_at"]
    assert [h["action"] for h in applied["history"]] == ["submitted", "started", "applied"]

    page = server.client.get("/edits", params={"status": "applied"}).json()
    assert page["total"] == 1 and page["items"][0]["id"] == edit["id"]
    assert server.client.get("/edits", params={"status": "queued"}).json()["total"] == 0

    fired = server.generate(FACTS[0][0], max_new_tokens=4)
    assert fired["edit"] == {"id": edit["id"], "match_ratio": 1.0}
    assert fired["edit_seq"] == 1
    state = server.client.get("/state").json()
    assert state["applied"] == 1 and state["keys"] == [edit["id"]] and state["last_seq"] == 1
    # a model without a preset edits with the paper's weight decay (lr from TINY_ENV)
    assert (state["edit_lr"], state["edit_decay"], state["edit_protect"]) == (10.0, "all", None)
    assert (state["edit_max_iterations"], state["edit_fit_iterations"]) == (30, None)  # the paper's budget
    assert state["edit_append_eos"] is False
    assert state["preset"]["name"] == "ratios"
    assert state["preset"]["reason"].startswith("no preset for llama, 4 blocks, hidden 128, FFN width 512")
    assert "set explicitly: threshold, lr" in state["preset"]["reason"]

    metrics = server.client.get("/metrics").text
    assert 'memoir_edits{status="applied"} 1.0' in metrics
    assert "memoir_queue_depth 0.0" in metrics
    assert "memoir_applied_seq 1.0" in metrics
    assert 'memoir_generate_requests_total{memory="fired"} 1.0' in metrics


# a few SGD steps an edit: these tests check order, routing and rebuilt hashes, not what is learnt
FEW_STEPS = {"MEMOIR_EDIT_MAX_ITERATIONS": "5"}


def test_batch_and_burst_are_applied_in_seq_order(make_server, database_url):
    server = make_server(env=FEW_STEPS, database_url=database_url)
    batch = server.client.post(
        "/edits", json={"edits": [{"prompt": p, "target": t} for p, t in FACTS]}
    )
    assert batch.status_code == 202
    batch_edits = batch.json()["edits"]
    assert [e["seq"] for e in batch_edits] == [1, 2, 3, 4]
    assert [e["target"] for e in batch_edits] == [t for _, t in FACTS]

    burst = [(f"Item {i} in the catalogue of imaginary things is a", f"thing number {i}") for i in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        submitted = list(pool.map(lambda fact: server.submit(*fact), burst))
    assert sorted(e["seq"] for e in submitted) == list(range(5, 17))

    server.wait_idle()
    edits = server.client.get("/edits", params={"limit": 100}).json()["items"]
    assert [e["seq"] for e in edits] == list(range(1, 17))
    assert all(e["status"] == "applied" for e in edits)
    # strictly in seq order: each edit started after the previous one finished
    for earlier, later in zip(edits, edits[1:]):
        assert later["started_at"] >= earlier["finished_at"]
    assert server.client.get("/state").json()["keys"] == [e["id"] for e in edits]


def test_retraction_rebuilds_the_memory_without_the_edit(make_server, database_url):
    server = make_server(env=FEW_STEPS, database_url=database_url)
    ids = [server.submit(p, t)["id"] for p, t in FACTS]
    server.wait_idle()
    assert server.generate(FACTS[1][0], max_new_tokens=2)["edit"]["id"] == ids[1]

    response = server.client.delete(f"/edits/{ids[1]}")
    assert response.status_code == 202
    assert response.json()["retraction_pending"] is True
    retracted = server.wait_edit(ids[1], statuses=("retracted",))
    assert retracted["retraction_pending"] is False
    assert [h["action"] for h in retracted["history"]][-2:] == ["retraction_requested", "retracted"]

    assert server.generate(FACTS[1][0], max_new_tokens=2)["edit"] is None
    for index in (0, 2, 3):
        assert server.generate(FACTS[index][0], max_new_tokens=2)["edit"]["id"] == ids[index]
    state = server.client.get("/state").json()
    assert state["keys"] == [ids[0], ids[2], ids[3]]

    # the rebuilt memory is exactly the memory of a server that never saw the retracted edit
    clean = make_server("clean", env=FEW_STEPS)
    for index in (0, 2, 3):
        clean.submit(*FACTS[index])
    clean.wait_idle()
    assert clean.client.get("/state").json()["weights_sha256"] == state["weights_sha256"]

    # and it survives a restart
    server.restart()
    assert server.client.get("/state").json()["weights_sha256"] == state["weights_sha256"]
    assert server.client.delete(f"/edits/{ids[1]}").status_code == 409


def test_a_queued_edit_can_be_cancelled(make_server):
    server = make_server()
    ids = [server.submit(f"Fact number {i} about the moon of Zembla is", f"answer {i}")["id"] for i in range(6)]
    response = server.client.delete(f"/edits/{ids[-1]}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    server.wait_idle()
    assert server.client.get(f"/edits/{ids[-1]}").json()["status"] == "cancelled"
    assert ids[-1] not in server.client.get("/state").json()["keys"]
    assert server.client.get("/state").json()["applied"] == 5


def test_bad_input_is_rejected_and_changes_nothing(make_server):
    server = make_server(env={"MEMOIR_MAX_PROMPT_TOKENS": "16", "MEMOIR_MAX_NEW_TOKENS": "32"})
    client = server.client
    bad_edits = [
        ({"target": "x"}, "prompt"),
        ({"prompt": "Who?"}, "target"),
        ({"prompt": "   ", "target": "x"}, "must not be empty"),
        ({"prompt": "Who?", "target": ""}, "must not be empty"),
        ({"prompt": 42, "target": "x"}, "string"),
        ({"prompt": "Who?", "target": "x", "colour": "red"}, "Extra inputs"),
        ({"prompt": "Who?", "messages": [{"role": "user", "content": "Who?"}], "target": "x"}, "exactly one"),
        ({"prompt": "word " * 40, "target": "x"}, "the limit is 16"),
        ({"edits": []}, "at least 1"),
        ({"edits": [{"prompt": "Fine?", "target": "yes"}, {"prompt": "word " * 40, "target": "x"}]}, "edits[1]"),
    ]
    for body, message in bad_edits:
        response = client.post("/edits", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in response.text, (body, response.text)
    assert client.post("/edits", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.get("/edits").json()["total"] == 0  # nothing was queued

    assert client.get("/edits/does-not-exist").status_code == 404
    assert "not found" in client.delete("/edits/does-not-exist").json()["detail"]
    assert client.get("/edits", params={"status": "done"}).status_code == 422
    assert client.get("/edits", params={"limit": 0}).status_code == 422

    bad_generations = [
        ({"max_new_tokens": 5}, "prompt"),
        ({"prompt": "Hi", "max_new_tokens": 33}, "the limit is 32"),
        ({"prompt": "Hi", "max_new_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "top_p": 0}, "top_p"),
        ({"prompt": "Hi", "stop": ["a", ""]}, "must not be empty"),
    ]
    for body, message in bad_generations:
        response = client.post("/generate", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in response.text, (body, response.text)
    assert client.get("/state").json()["applied"] == 0
