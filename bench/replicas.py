"""Replicas on one PostgreSQL database: follower lag, catch-up by deltas, leader restart.

    python -m bench.replicas lag --edits 100 --out results/replica_lag.json
    python -m bench.replicas catch-up --edits 1000 --model tiny --out results/replica_catch_up.json
    python -m bench.replicas restart --out results/leader_restart.json

lag: a leader and a follower (real server processes, the default model unless --model tiny); N
edits in order; the follower's /ready is polled every 5 ms, and an edit's lag is the time from the
leader's memory-log record of it (created in the transaction that marks it applied) to the first
poll at which the follower's settled seq includes it. --iterations caps each edit's SGD steps
(the lag does not depend on how long an edit trains, only on its delta, which has the same size).

catch-up: after N edits, a new replica's rebuild of the memory, timed in-process on the same
database and model, both ways: from the log's first whole state through the N deltas
(`replica.restore`) and by retraining the N edits (`worker.replay`, what a restart did before the
memory log). Checkpoint files are removed first, so neither starts from one.

restart: the leader's restart after a crash with 19 edits since its last checkpoint (default
model, its preset, checkpoint every 20, 39 edits): newest checkpoint + 19 deltas against newest
checkpoint + 19 retrained edits, in-process, each ending at the same W_m hash.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import shutil
import tempfile
import time

import httpx
import psycopg

from bench.common import percentile, table, write_json
from memoir_core.state import weights_sha256
from tests.server import Server, create_postgres_database, drop_postgres_database

ZSRE_LIKE = "The secret code word of agent {i} is"


def facts(n: int) -> list[dict]:
    return [{"prompt": ZSRE_LIKE.format(i=i), "target": f"Word{i}"} for i in range(n)]


def tiny_model_dir(directory: Path) -> Path:
    from tests.conftest import build_tiny
    from memoir_core.models import default_gguf_file, dequantized_copy, prepare_tokenizer
    from transformers import AutoTokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(dequantized_copy(default_gguf_file())))
    loaded = build_tiny("llama", tokenizer)
    loaded.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def server_env(args, root: Path) -> dict:
    env = {"MEMOIR_DEVICE": "cpu", "MEMOIR_DTYPE": "fp32", "MEMOIR_CHECKPOINT_EVERY": str(args.checkpoint_every)}
    if args.model == "tiny":
        env.update(MEMOIR_MODEL=str(tiny_model_dir(root / "tiny")), MEMOIR_EDIT_LR="10", MEMOIR_THRESHOLD="0.9")
    if args.iterations:
        env["MEMOIR_EDIT_MAX_ITERATIONS"] = str(args.iterations)
    return env


def submit_all(server: Server, edits: list[dict]) -> list[dict]:
    submitted = []
    for first in range(0, len(edits), 100):
        response = server.client.post("/edits", json={"edits": edits[first : first + 100]})
        response.raise_for_status()
        submitted += response.json()["edits"]
    return submitted


def recorded_at(url: str) -> dict[int, float]:
    """edit seq -> epoch seconds of the memory-log record of its outcome."""
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT edit_seq, created_at FROM memory_log WHERE edit_seq IS NOT NULL").fetchall()
    return {seq: at.timestamp() for seq, at in rows}


def measure_lag(args, root: Path, url: str) -> dict:
    env = server_env(args, root)
    leader = Server(root / "leader", env, url).start()
    follower = Server(root / "follower", env, url).start()
    try:
        submitted = submit_all(leader, facts(args.edits))
        last_seq = submitted[-1]["seq"]
        seen_at: dict[int, float] = {}
        poll = httpx.Client(base_url=follower.url, timeout=10)
        settled = 0
        deadline = time.monotonic() + 3600
        while settled < last_seq and time.monotonic() < deadline:
            now_settled = poll.get("/ready").json().get("settled_seq", 0)
            now = time.time()
            for seq in range(settled + 1, now_settled + 1):
                seen_at[seq] = now
            settled = max(settled, now_settled)
            time.sleep(0.005)
        recorded = recorded_at(url)
        lags = [seen_at[e["seq"]] - recorded[e["seq"]] for e in submitted if e["seq"] in seen_at]
        leader_state = leader.client.get("/state").json()
        follower_state = follower.client.get("/state").json()
        return {
            "edits": len(lags),
            "lag_seconds": {"p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99), "max": max(lags)},
            "same_memory": leader_state["weights_sha256"] == follower_state["weights_sha256"],
        }
    finally:
        follower.stop()
        leader.stop()


def in_process_runtime(args, root: Path, url: str, state_dir: Path):
    """A Runtime on the bench database with the model loaded, as a replica's start-up has it."""
    import os

    from app.config import Settings
    from app.runtime import Runtime
    from memoir_core import MemoirEngine, load_model
    from memoir_core.background import default_background_prompts
    from memoir_core.presets import model_shape, recommended_config

    for key, value in {**server_env(args, root), "MEMOIR_STATE_DIR": str(state_dir), "MEMOIR_DATABASE_URL": url}.items():
        os.environ[key] = value
    settings = Settings()
    runtime = Runtime(settings)
    loaded = load_model(settings.model, device="cpu", dtype="fp32")
    config = recommended_config(model_shape(loaded.model), settings.config_overrides())
    runtime.engine = MemoirEngine(loaded, config)
    runtime.engine.add_chat_background(default_background_prompts())
    runtime.seq_by_key.update({e.id: e.seq for e in runtime.edit_log.applied()})
    runtime.leadership.epoch = -1  # the legacy replay may mark unusable checkpoints: not fenced here
    return runtime


def time_rebuilds(runtime) -> dict:
    from app.services.replica import restore
    from app.services.worker import replay

    started = time.perf_counter()
    by_deltas, _ = restore(runtime)
    delta_seconds = time.perf_counter() - started
    started = time.perf_counter()
    by_training, retrained = replay(runtime)
    training_seconds = time.perf_counter() - started
    return {
        "edits_in_memory": by_deltas.snapshot.applied,
        "retrained": retrained,
        "deltas_seconds": delta_seconds,
        "retraining_seconds": training_seconds,
        "speed_up": training_seconds / delta_seconds,
        "same_memory": weights_sha256(by_deltas) == weights_sha256(by_training),
    }


def build_log(args, root: Path, url: str, edits: int) -> Path:
    """A leader that applied `edits` edits and stopped (killed: no shutdown checkpoint)."""
    leader = Server(root / "leader", server_env(args, root), url).start()
    submit_all(leader, facts(edits))
    leader.wait_idle(timeout=7200)
    leader.kill9()
    return leader.state_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["lag", "catch-up", "restart"])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--iterations", type=int, default=None, help="cap on SGD steps per edit")
    parser.add_argument("--out")
    args = parser.parse_args()
    args.checkpoint_every = 20 if args.what == "restart" else 100_000
    root = Path(tempfile.mkdtemp(prefix="memoir-bench-replicas-"))
    url = create_postgres_database()
    try:
        if args.what == "lag":
            result = measure_lag(args, root, url)
            print(table(["edits", "p50 s", "p99 s", "max s"], [[result["edits"], *result["lag_seconds"].values()]]))
        else:
            edits = 39 if args.what == "restart" else args.edits
            leader_dir = build_log(args, root, url, edits)
            if args.what == "catch-up":  # neither way may start from a checkpoint
                shutil.rmtree(leader_dir / "checkpoints", ignore_errors=True)
            runtime = in_process_runtime(args, root, url, leader_dir)
            result = time_rebuilds(runtime)
            print(table(["edits", "retrained", "deltas s", "retraining s", "speed-up", "same W_m"], [[
                result["edits_in_memory"], result["retrained"], result["deltas_seconds"],
                result["retraining_seconds"], result["speed_up"], result["same_memory"],
            ]]))
        write_json(args.out, {"benchmark": f"replicas {args.what}", "args": vars(args), **result})
    finally:
        drop_postgres_database(url)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
