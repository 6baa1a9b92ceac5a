"""Edits with paraphrases over a real server on the tiny model: every frame of every phrasing keys
the edit, a retraction removes them all, a restart keeps them; bad paraphrases change nothing."""

from __future__ import annotations

QUESTION = "What is the capital of the fictional land of Zembla?"
PARAPHRASES = ["Which city is Zembla's capital?", [{"role": "user", "content": "Name the capital city of Zembla."}]]
ASKED = [
    {"prompt": QUESTION},
    {"messages": [{"role": "user", "content": QUESTION}]},
    {"prompt": PARAPHRASES[0]},
    {"messages": [{"role": "user", "content": PARAPHRASES[0]}]},
    {"prompt": PARAPHRASES[1][0]["content"]},
    {"messages": PARAPHRASES[1]},
]


def explained(server, asked: dict) -> dict:
    response = server.client.post("/explain", json=asked)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_phrasing_in_every_frame_fires_the_edit_until_it_is_retracted(make_server):
    server = make_server(env={"MEMOIR_CHECKPOINT_EVERY": "1"})
    other = server.submit("Who invented the glass harmonica?", "Marie Curie")
    response = server.client.post("/edits", json={"prompt": QUESTION, "target": "Vostok", "paraphrases": PARAPHRASES})
    assert response.status_code == 202, response.text
    edit = response.json()
    assert edit["paraphrases"] == PARAPHRASES
    server.wait_edit(edit["id"])
    assert server.client.get(f"/edits/{edit['id']}").json()["paraphrases"] == PARAPHRASES
    for asked in ASKED:
        answer = explained(server, asked)
        assert answer["fires"] and answer["edit"]["id"] == edit["id"] and answer["match_ratio"] == 1.0, asked
    state = server.client.get("/state").json()
    assert state["keys"] == [other["id"], edit["id"]]

    server.restart()  # rebuilt from the checkpoint: the same masks, every key still there
    assert server.client.get("/state").json()["masks_sha256"] == state["masks_sha256"]
    assert all(explained(server, asked)["edit"]["id"] == edit["id"] for asked in ASKED)

    assert server.client.delete(f"/edits/{edit['id']}").status_code == 202
    server.wait_edit(edit["id"], statuses=("retracted",))
    assert server.client.get("/state").json()["keys"] == [other["id"]]
    for asked in ASKED:
        best = explained(server, asked)["best_match"]
        assert best is None or best["id"] == other["id"]


LONG = " ".join(["word"] * 300)


BAD_PARAPHRASES = [
    (["one"] * 9, "at most 8"),
    (["   "], "paraphrases[0] must not be empty"),
    ([[{"role": "assistant", "content": "hi"}]], "paraphrases[0] must have role 'user'"),
    ([[]], "paraphrases[0] must not be empty"),
    ([LONG], "paraphrases[0] has 300 tokens; the limit is 256"),
    ([[{"role": "user", "content": LONG}]], "paraphrases[0] has 300 tokens"),
    ("not a list", "list"),
]


def test_bad_paraphrases_are_refused_and_queue_nothing(make_server):
    server = make_server()
    for paraphrases, message in BAD_PARAPHRASES:
        body = {"prompt": QUESTION, "target": "Vostok", "paraphrases": paraphrases}
        response = server.client.post("/edits", json=body)
        assert response.status_code == 422 and message in response.text, (paraphrases, response.text)
    assert server.client.get("/edits").json()["total"] == 0


def test_with_append_eos_an_answer_ends_after_the_corrected_fact(make_server):
    """MEMOIR_EDIT_APPEND_EOS=true (off by default): edits also learn to stop after the target."""
    server = make_server(env={"MEMOIR_EDIT_APPEND_EOS": "true"})
    assert server.client.get("/state").json()["edit_append_eos"] is True
    server.wait_edit(server.submit(QUESTION, "Vostok")["id"])
    plain = server.generate(QUESTION, max_new_tokens=8)
    assert plain["text"] == " Vostok" and plain["finish_reason"] == "stop"
