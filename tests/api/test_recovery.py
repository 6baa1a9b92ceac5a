"""Crash recovery: kill -9 mid-queue, restart, and get exactly the memory of an uninterrupted run."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx

from tests.conftest import build_tiny

FACTS = [(f"The secret code of vault number {i} in the old bank is", f"code {100 + 7 * i}") for i in range(10)]


def _events(server, edit_id: str) -> list[str]:
    return [h["action"] for h in server.client.get(f"/edits/{edit_id}").json()["history"]]


def test_kill_9_with_edits_queued_and_running_loses_nothing(make_server, database_url):
    reference = make_server("reference")
    for fact in FACTS:
        reference.submit(*fact)
    reference.wait_idle()
    expected = reference.client.get("/state").json()
    reference.stop()

    server = make_server("crashing", database_url=database_url)
    accepted = [server.submit(*fact)["id"] for fact in FACTS]
    # wait until some edits are applied (a checkpoint exists) and one is being trained
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        edits = server.client.get("/edits", params={"limit": 100}).json()["items"]
        statuses = [e["status"] for e in edits]
        if statuses.count("applied") >= 4 and "running" in statuses and "queued" in statuses:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"never saw applied + running + queued edits: {statuses}")
    running = next(e["id"] for e in edits if e["status"] == "running")
    server.kill9()

    server.start()
    server.wait_idle()
    after = server.client.get("/edits", params={"limit": 100}).json()["items"]
    assert [e["id"] for e in after] == accepted
    assert all(e["status"] == "applied" for e in after)
    for edit_id in accepted:
        assert _events(server, edit_id).count("applied") == 1
    assert "requeued" in _events(server, running)
    rebuilt = server.client.get("/state").json()
    assert rebuilt["keys"] == accepted
    assert rebuilt["weights_sha256"] == expected["weights_sha256"]
    assert rebuilt["masks_sha256"] == expected["masks_sha256"]

    # a clean restart loads the newest checkpoint and replays the rest to the same memory
    server.restart()
    assert server.client.get("/state").json()["weights_sha256"] == expected["weights_sha256"]


def test_a_corrupt_checkpoint_is_skipped(make_server):
    server = make_server()
    for fact in FACTS[:7]:
        server.submit(*fact)
    server.wait_idle()
    expected = server.client.get("/state").json()
    server.stop()
    checkpoints = sorted((server.state_dir / "checkpoints").glob("ckpt-*.safetensors"))
    # after edits 3 and 6 (MEMOIR_CHECKPOINT_EVERY=3), and the final one written at shutdown (edit 7)
    assert [int(c.name.split("-")[1]) for c in checkpoints] == [3, 6, 7]
    checkpoints[-1].write_bytes(checkpoints[-1].read_bytes()[:-10] + b"0123456789")
    server.start()
    assert server.client.get("/state").json()["weights_sha256"] == expected["weights_sha256"]
    assert "checkpoint" in server.log() and "not usable" in server.log()


def test_a_checkpoint_corrupted_under_load_is_rejected_and_the_memory_rebuilt_from_an_older_one(make_server):
    """The newest checkpoint is corrupted on disk while edits are still being submitted and trained
    and generation requests run; then the process is killed (a clean stop would write a newer,
    good checkpoint). The restart must reject the corrupt file (marked invalid, with a
    `checkpoint_rejected` event) and reach the served memory from the checkpoint before it plus
    the memory log's deltas."""
    facts = FACTS + [(f"The secret code of vault number {i} in the old bank is", f"code {100 + 7 * i}") for i in (10,)]
    server = make_server(env={"MEMOIR_CHECKPOINT_EVERY": "4"})  # checkpoints at 4 and 8 of 11 edits
    database = server.state_dir / "memoir.db"
    stop, answers, submitted = threading.Event(), [], []

    def submit() -> None:  # one edit in flight at a time, so submissions go on for the whole run
        for fact in facts:
            edit_id = server.submit(*fact)["id"]
            submitted.append(edit_id)
            while not stop.is_set() and server.client.get(f"/edits/{edit_id}").json()["status"] == "queued":
                time.sleep(0.02)

    def generate() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                answers.append(client.post("/generate", json={"prompt": facts[0][0], "max_new_tokens": 4}).status_code)

    threads = [threading.Thread(target=submit), threading.Thread(target=generate)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 300
        while not (rows := _valid_checkpoints(database, "seq = 8")):
            assert time.monotonic() < deadline, "no checkpoint at seq 8"
            time.sleep(0.02)
        newest = rows[0][0]
        data = bytearray(open(newest, "rb").read())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
        with open(newest, "r+b") as handle:  # in place, as a disk or a stray writer would
            handle.write(data)
        applied_when_corrupted = server.client.get("/state").json()["applied"]
        threads[0].join(300)
        server.wait_idle()
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert applied_when_corrupted < len(facts) and len(submitted) == len(facts)
    assert answers and set(answers) == {200}
    expected = server.client.get("/state").json()
    assert expected["keys"] == submitted
    assert [seq for _, seq in _valid_checkpoints(database)] == [8, 4]  # 11 is not a multiple of 4
    server.kill9()

    server.start()
    rebuilt = server.client.get("/state").json()
    assert rebuilt["keys"] == submitted
    assert rebuilt["weights_sha256"] == expected["weights_sha256"]
    assert rebuilt["masks_sha256"] == expected["masks_sha256"]
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT detail FROM events WHERE action = 'checkpoint_rejected'").fetchall()
    rejected = [json.loads(detail) for (detail,) in rows]
    assert [r["path"] for r in rejected] == [newest] and "sha256" in rejected[0]["reason"]
    assert [seq for _, seq in _valid_checkpoints(database)] == [4]  # not tried again at the next start
    assert server.log().count("(0 retrained)") == 2  # both starts: a checkpoint plus deltas


def _valid_checkpoints(database, where: str = "1") -> list[tuple[str, int]]:
    """(path, seq) of the valid checkpoint rows, newest first."""
    with sqlite3.connect(database) as connection:
        query = f"SELECT path, seq FROM checkpoints WHERE valid AND {where} ORDER BY seq DESC"
        return connection.execute(query).fetchall()


def test_a_calibrated_tau_follows_the_memory_and_survives_a_restart(make_server):
    server = make_server(env={"MEMOIR_THRESHOLD": "calibrate"})
    before = server.client.get("/state").json()
    assert before["threshold_calibrated"] is True
    edits = [server.submit(*fact) for fact in FACTS[:3]]
    server.wait_idle()
    after = server.client.get("/state").json()
    assert after["applied"] == 3 and 0.0 < after["threshold"] < 1.0
    fired = server.generate(FACTS[1][0], max_new_tokens=2)["edit"]
    assert fired is not None and fired["id"] == edits[1]["id"] and fired["match_ratio"] >= after["threshold"]
    server.restart()
    assert server.client.get("/state").json()["threshold"] == after["threshold"]


def test_key_protection_survives_a_restart_that_replays_edits(make_server):
    """With MEMOIR_EDIT_PROTECT, an edit replayed after a restart is steered by the stored keys of
    the edits before it, so the checkpoint it starts from must carry them: dropping the newest
    checkpoint forces a replay from the older one, which must rebuild the same memory."""
    server = make_server(env={"MEMOIR_EDIT_PROTECT": "0.1"})
    for fact in FACTS[:4]:
        server.submit(*fact)
    server.wait_idle()
    expected = server.client.get("/state").json()
    assert expected["edit_protect"] == 0.1 and expected["applied"] == 4
    server.stop()
    checkpoints = sorted((server.state_dir / "checkpoints").glob("ckpt-*.safetensors"))
    assert [int(c.name.split("-")[1]) for c in checkpoints] == [3, 4]
    checkpoints[-1].unlink()
    server.start()
    rebuilt = server.client.get("/state").json()
    assert rebuilt["applied"] == 4
    assert rebuilt["weights_sha256"] == expected["weights_sha256"]


def test_another_model_on_the_same_database_retrains_the_log_once(make_server, database_url, tmp_path, tokenizer):
    """The memory log and checkpoints belong to the model (and state format) that wrote them: a
    server on other weights retrains the applied edits, records that memory as a whole state, and
    its next restart starts from it without retraining."""
    server = make_server(database_url=database_url)
    for fact in FACTS[:4]:
        server.submit(*fact)
    server.wait_idle()
    old = server.client.get("/state").json()
    server.stop()

    other = tmp_path / "other-model"
    build_tiny("llama", tokenizer, seed=1).model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    server.env["MEMOIR_MODEL"] = str(other)
    server.start()
    new = server.client.get("/state").json()
    assert new["applied"] == 4 and new["weights_sha256"] != old["weights_sha256"]
    assert "memory log does not fit" in server.log() and "(4 retrained)" in server.log()
    assert server.generate(FACTS[3][0], max_new_tokens=4)["edit"]["id"] is not None

    server.restart()
    assert server.client.get("/state").json()["weights_sha256"] == new["weights_sha256"]
    assert server.log().count("(0 retrained)") == 2  # the first start and this one
