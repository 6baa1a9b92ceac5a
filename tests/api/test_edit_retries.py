"""An edit whose training raises (not bad input: the engine itself fails) is tried
MEMOIR_EDIT_MAX_ATTEMPTS times, then marked failed with the reason; the queue goes on."""

from __future__ import annotations

import pytest

from app.db.session import database_engine, session_factory
from app.services.edit_log import EditLog, NewEdit
from app.services.leadership import LeaderLock
from memoir_core import Prompt
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny("gpt2", tokenizer).model.save_pretrained(directory)  # 512 learned positions
    tokenizer.save_pretrained(directory)
    return directory


def test_a_failing_training_is_retried_then_marked_failed_with_the_reason(make_server, tiny_gpt2_dir):
    server = make_server(env={"MEMOIR_MODEL": str(tiny_gpt2_dir), "MEMOIR_EDIT_MAX_ATTEMPTS": "2"})
    # past the API's context check, straight into the log: a prompt longer than GPT-2's position
    # table makes the embedding lookup itself raise, on every attempt
    text = "The vault " * 300
    url = f"sqlite:///{server.state_dir / 'memoir.db'}"
    sessions = session_factory(database_engine(url))
    log = EditLog(sessions, append_eos=True, leadership=LeaderLock(url, sessions))  # submits only: never leads
    broken = log.submit([NewEdit(prompt=text, target="gold", frames=[Prompt(text)])]).edits[0]
    failed = server.wait_edit(broken.id, statuses=("failed",))
    assert "IndexError" in failed["error"] and "after 2 attempts" in failed["error"]
    actions = [h["action"] for h in server.client.get(f"/edits/{broken.id}").json()["history"]]
    assert actions == ["submitted", "started", "failed"]
    good = server.submit("The capital of the fictional land of Zembla is", "Onhava")
    assert server.wait_edit(good["id"])["status"] == "applied"
    assert server.client.get("/state").json()["keys"] == [good["id"]]
