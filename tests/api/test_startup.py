"""Start-up under faults: a model the engine cannot serve and a database that stays away end the
process non-zero with the reason on stderr (so a supervisor restarts or reports it); a database
that comes back within MEMOIR_DATABASE_WAIT_S is waited for."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys
import time

import pytest
from transformers import OPTConfig, OPTForCausalLM

from memoir_core.families import Family, tiny_model
from tests.api.conftest import TINY_ENV
from tests.proxy import CuttableProxy
from tests.server import REPO, Server, create_postgres_database, drop_postgres_database, free_port


def run_app(state_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        **TINY_ENV,
        "MEMOIR_PORT": str(free_port()),
        "MEMOIR_STATE_DIR": str(state_dir),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "app"], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


def unsupported_model(name: str, tokenizer):
    """Real, loadable causal LMs the engine cannot serve: OPT keeps its feed-forward layers in the
    decoder layer itself; Mixtral's feed-forward is a mixture of experts."""
    if name == "opt":
        config = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=128,
        )  # fmt: skip
        return OPTForCausalLM(config)
    changes = {"num_local_experts": 4, "num_experts_per_tok": 2}
    return tiny_model(Family("mixtral", ""), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, **changes)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("opt", "cannot find the feed-forward of OPTDecoderLayer"),
        ("mixtral", "model_type 'mixtral': block 0's feed-forward (MixtralSparseMoeBlock) is a mixture of experts"),
    ],
    ids=["opt", "mixtral"],
)
def test_a_model_that_cannot_be_served_exits_non_zero_with_the_reason(name, reason, tmp_path, tokenizer):
    directory = tmp_path / f"tiny-{name}"
    unsupported_model(name, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    result = run_app(tmp_path / "state", {"MEMOIR_MODEL": str(directory)})
    assert result.returncode == 1
    assert "fatal start-up error" in result.stderr
    assert reason in result.stderr


def test_a_corrupt_model_file_exits_non_zero_with_the_reason(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for source in tiny_model_dir.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    result = run_app(tmp_path / "state", {"MEMOIR_MODEL": str(broken)})
    assert result.returncode == 1
    assert "fatal start-up error" in result.stderr


@pytest.mark.postgres
def test_start_up_waits_for_the_database_then_gives_up(tmp_path, tiny_model_dir):
    url = create_postgres_database()
    proxy = CuttableProxy(5432)  # not started: the database is away from the beginning
    proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    try:
        env = {"MEMOIR_MODEL": str(tiny_model_dir), "MEMOIR_DATABASE_URL": proxied}
        result = run_app(tmp_path / "gives-up", {**env, "MEMOIR_DATABASE_WAIT_S": "3"})
        assert result.returncode == 1
        assert "the database is unreachable (migrations" in result.stderr

        server = Server(tmp_path / "waits", {**TINY_ENV, **env, "MEMOIR_DATABASE_WAIT_S": "120"}).start(wait=False)
        time.sleep(3)
        assert server.process.poll() is None  # still waiting, not failed
        proxy.restore()
        server.wait_ready()
        assert server.submit("The database came back on a", "Tuesday")["status"] == "queued"
        server.stop()
    finally:
        proxy.cut()
        drop_postgres_database(url)
