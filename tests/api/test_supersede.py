"""The later correction wins, served: superseded_by in the edit log, a restart and a retraction."""

from __future__ import annotations

import pytest

from tests.api.test_replicas import REPLICA_ENV, postgres_url, replicas, state, wait_converged  # noqa: F401

QUESTION = "The secret code word of the old lighthouse keeper is"
OTHER = ("The secret code word of the harbour master is", "Marlin")


def served(server) -> dict:
    current = server.client.get("/state").json()
    return {name: current[name] for name in ("keys", "weights_sha256", "masks_sha256", "superseded")}


def edit(server, edit_id: str) -> dict:
    return server.client.get(f"/edits/{edit_id}").json()


def test_a_later_edit_of_the_same_question_supersedes_the_first(make_server):
    server = make_server()
    first = server.submit(QUESTION, "Albatross")
    other = server.submit(*OTHER)
    second = server.submit(QUESTION, "Cormorant")  # the same question, another answer
    server.wait_idle()

    assert edit(server, first["id"])["superseded_by"] == second["id"]
    assert [h["action"] for h in edit(server, first["id"])["history"]][-1] == "superseded"
    assert edit(server, second["id"])["superseded_by"] is None
    listed = {e["id"]: e["superseded_by"] for e in server.client.get("/edits").json()["items"]}
    assert listed == {first["id"]: second["id"], other["id"]: None, second["id"]: None}
    before = served(server)
    assert before["superseded"] == {first["id"]: second["id"]}
    answer = server.generate(QUESTION, max_new_tokens=10)
    assert answer["edit"]["id"] == second["id"] and "Cormorant" in answer["text"]
    assert server.generate(OTHER[0], max_new_tokens=10)["edit"]["id"] == other["id"]

    # a restart (the checkpoint after the third edit) serves the same memory, supersession too
    server.restart()
    assert served(server) == before
    assert server.generate(QUESTION, max_new_tokens=10)["edit"]["id"] == second["id"]

    # retracting the later edit brings the first one back, in the memory and in the log
    assert server.client.delete(f"/edits/{second['id']}").status_code == 202
    server.wait_edit(second["id"], statuses=("retracted",))
    assert edit(server, first["id"])["superseded_by"] is None
    assert [h["action"] for h in edit(server, first["id"])["history"]][-1] == "supersession_lifted"
    after = served(server)
    assert after["superseded"] == {} and after["keys"] == [first["id"], other["id"]]
    answer = server.generate(QUESTION, max_new_tokens=10)
    assert answer["edit"]["id"] == first["id"] and "Albatross" in answer["text"]
    server.restart()
    assert served(server) == after


def test_without_supersede_both_edits_stay(make_server):
    server = make_server(env={"MEMOIR_SUPERSEDE": "false"})
    first = server.submit(QUESTION, "Albatross")
    second = server.submit(QUESTION, "Cormorant")
    server.wait_idle()
    assert edit(server, first["id"])["superseded_by"] is None
    current = server.client.get("/state").json()
    assert current["supersede"] is False and current["superseded"] == {}
    assert current["keys"] == [first["id"], second["id"]]
    # identical masks: the newer wins the tie, but the first is still stored and searchable
    assert server.generate(QUESTION, max_new_tokens=10)["edit"]["id"] == second["id"]


@pytest.mark.postgres
def test_a_follower_agrees_on_what_was_superseded(replicas):  # noqa: F811
    servers = replicas(["s0", "s1"])
    leader = next(s for s in servers if state(s)["replica"]["role"] == "leader")
    follower = next(s for s in servers if s is not leader)
    first = leader.submit(QUESTION, "Albatross")
    second = follower.submit(QUESTION, "Cormorant")
    converged = wait_converged(servers)
    assert converged["superseded"] == {first["id"]: second["id"]}
    assert state(follower)["superseded"] == converged["superseded"]
    assert edit(follower, first["id"])["superseded_by"] == second["id"]
    answer = follower.generate(QUESTION, max_new_tokens=10, min_edit_seq=second["seq"])
    assert answer["edit"]["id"] == second["id"]

    assert follower.client.delete(f"/edits/{second['id']}").status_code == 202
    follower.wait_edit(second["id"], statuses=("retracted",))
    after = wait_converged(servers)
    assert after["superseded"] == {} and state(follower)["masks_sha256"] == after["masks_sha256"]
    assert follower.generate(QUESTION, max_new_tokens=10)["edit"]["id"] == first["id"]
