"""An applied edit changes /generate for its question, and nothing else, on the embedded model."""

from __future__ import annotations

EDIT = ("The Eiffel Tower is located in the city of", "Rome")
UNRELATED = ["The capital of Japan is", "Water is made of hydrogen and"]


def test_an_applied_edit_changes_generation_and_leaves_unrelated_prompts_alone(default_server):
    server = default_server
    preset = server.client.get("/state").json()["preset"]  # chosen by the embedded model's shape
    assert preset["name"] == "SmolLM2-135M" and "llama, 30 blocks, hidden 576" in preset["reason"]
    before = server.generate(EDIT[0], max_new_tokens=8)
    assert before["edit"] is None and "Rome" not in before["text"]
    unrelated_before = [server.generate(p, max_new_tokens=8) for p in UNRELATED]

    edit = server.submit(*EDIT)
    server.wait_edit(edit["id"])

    after = server.generate(EDIT[0], max_new_tokens=8)
    assert after["text"].strip().startswith("Rome")
    assert after["edit"]["id"] == edit["id"] and after["edit"]["match_ratio"] == 1.0
    assert after["edit_seq"] == edit["seq"]
    for prompt, earlier in zip(UNRELATED, unrelated_before):
        now = server.generate(prompt, max_new_tokens=8)
        assert now["edit"] is None
        assert now["text"] == earlier["text"]
    assert server.generate(EDIT[0], max_new_tokens=8, use_edits=False)["text"] == before["text"]
