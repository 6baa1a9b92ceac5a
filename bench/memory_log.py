"""The memory log's cost: database and blob bytes per edit, compaction, a new replica's catch-up
and a retraction, through a real server on SQLite with the local blob store.

    python -m bench.memory_log --edits 1000 --json                       # tiny model
    python -m bench.memory_log --edits 10000 --out results/memory_log_tiny_10k.json
    python -m bench.memory_log --shape llama-3-8b --edits 3 --iterations 1 --no-retract

Edits are trained with few steps (`--iterations`): what a delta costs is set by the columns its
mask selects (k), not by how well it fits, so the figures hold for fully trained edits too.
`--shape llama-3-8b` builds a two-block model with LLaMA-3-8B's width and random weights (the
edited block is what the log stores); on a CPU that is the only way to see an 8B-sized delta.

What is measured:
- db_bytes_per_edit: what the SQLite file grew by (edits, events, memory-log rows) per edit.
- blob_bytes_per_edit (raw) and blob_bytes_per_edit_compressed: the deltas as the log stores them.
- retrain_s: the leader's training time summed over all edits: what rebuilding by retraining costs.
- catch_up_s: a restart without checkpoints (a new replica): the newest whole state, then the
  compact_every - 1 deltas after it, the most there can be (`rebuild_seconds` on /ready).
- compaction_s: mean time to record a whole state (blob and row) and prune behind it.
- retract_s: withdrawing the edit in the middle of the log (retrains the edits after the newest
  checkpoint before it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import re
import shutil
import sqlite3
import tempfile
import time

import httpx

from bench.common import machine, write_json
from bench.replicas import tiny_model_dir
from tests.server import Server, until

SHAPES = {  # what the edited block's W_m is made of: hidden (its rows) and intermediate (its columns)
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def shaped_model_dir(shape: str, directory: Path) -> Path:
    """Two random LLaMA blocks at a real model's width, with the default tokenizer's vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memoir_core.models import default_gguf_file, dequantized_copy, prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(dequantized_copy(default_gguf_file())))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def facts(n: int) -> list[dict]:  # distinct questions: none supersedes another
    return [{"prompt": f"The registry code of depot {i} is", "target": f"Code{i}"} for i in range(n)]


def submit_all(server: Server, edits: list[dict]) -> None:
    """In requests of 100, waiting while the queue is full (429)."""
    for first in range(0, len(edits), 100):
        while True:
            response = server.client.post("/edits", json={"edits": edits[first : first + 100]})
            if response.status_code != 429:
                response.raise_for_status()
                break
            time.sleep(1.0)


def histogram_mean(metrics: str, name: str) -> float | None:
    total = re.search(rf"^{name}_sum (\S+)$", metrics, re.M)
    count = re.search(rf"^{name}_count (\S+)$", metrics, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return float(total.group(1)) / float(count.group(1))


def database_bytes(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        (size,) = connection.execute("PRAGMA page_size").fetchone()
        (free,) = connection.execute("PRAGMA freelist_count").fetchone()
    return (pages - free) * size


def log_sizes(state_dir: Path) -> tuple[float, float, int]:
    """(raw payload bytes, stored blob bytes) per edit delta still held, and how many are held."""
    blobs = state_dir / "blobs"
    with sqlite3.connect(state_dir / "memoir.db") as connection:
        rows = connection.execute(
            "SELECT payload_size, blob_key FROM memory_log WHERE kind = 'edit' AND blob_key IS NOT NULL"
        ).fetchall()
    if not rows:
        return float("nan"), float("nan"), 0
    raw = sum(size for size, _ in rows) / len(rows)
    stored = sum((blobs / key).stat().st_size for _, key in rows) / len(rows)
    return raw, stored, len(rows)


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="memoir-memory-log-"))
    try:
        if args.shape == "tiny":
            model = tiny_model_dir(root / "model")
            env = {"MEMOIR_EDIT_LR": "10", "MEMOIR_THRESHOLD": "0.9"}
        else:
            model = shaped_model_dir(args.shape, root / "model")
            env = {}
        env.update(
            MEMOIR_MODEL=str(model),
            MEMOIR_DEVICE="cpu",
            MEMOIR_DTYPE="fp32",
            MEMOIR_EDIT_MAX_ITERATIONS=str(args.iterations),
            MEMOIR_EDIT_FIT_ITERATIONS="0",
            MEMOIR_COMPACT_EVERY_EDITS=str(args.compact_every),
            MEMOIR_LOG_RETENTION_S="86400",  # every delta stays, so that all of them are measured
            MEMOIR_RATE_LIMIT_PER_MINUTE="0",
        )
        server = Server(root / "state", env).start(timeout=1800)
        db_empty = database_bytes(server.state_dir / "memoir.db")  # schema and the first whole state's row
        started = time.perf_counter()
        submit_all(server, facts(args.edits))
        server.wait_idle(timeout=24 * 3600)
        applying_s = time.perf_counter() - started
        metrics = server.client.get("/metrics").text
        retrain_s = float(re.search(r"^memoir_edit_seconds_sum (\S+)$", metrics, re.M).group(1))
        compaction_s = histogram_mean(metrics, "memoir_compaction_seconds")
        raw, stored, held = log_sizes(server.state_dir)
        db_bytes = database_bytes(server.state_dir / "memoir.db")

        retract_s = None
        if args.retract:
            listing = server.client.get("/edits", params={"status": "applied", "limit": 1, "offset": args.edits // 2})
            middle = listing.json()["items"][0]["id"]
            began = time.perf_counter()
            assert server.client.delete(f"/edits/{middle}").status_code in (200, 202)
            server.wait_edit(middle, statuses=("retracted",), timeout=24 * 3600)
            retract_s = time.perf_counter() - began

        # a new replica: no checkpoints, so the newest whole state and the deltas after it (the
        # worst case: compact_every - 1 of them)
        submit_all(server, facts(args.edits + args.compact_every - 1)[args.edits :])
        server.wait_idle(timeout=24 * 3600)
        hash_before = server.client.get("/state").json()["weights_sha256"]
        server.kill9()
        shutil.rmtree(server.state_dir / "checkpoints", ignore_errors=True)
        server.restart()
        ready = server.client.get("/ready").json()
        assert ready["replayed_on_startup"] == 0, ready
        assert server.client.get("/state").json()["weights_sha256"] == hash_before
        server.stop()
        return {
            "shape": args.shape,
            "edits": args.edits,
            "iterations": args.iterations,
            "compact_every": args.compact_every,
            "db_bytes_per_edit": round((db_bytes - db_empty) / args.edits, 1),
            "blob_bytes_per_edit": round(raw, 1),
            "blob_bytes_per_edit_compressed": round(stored, 1),
            "compression_ratio": round(raw / stored, 3) if held else None,
            "deltas_measured": held,
            "catch_up_s": ready["rebuild_seconds"],
            "retrain_s": round(retrain_s, 2),
            "catch_up_speedup": round(retrain_s / ready["rebuild_seconds"], 1),
            "compaction_s": round(compaction_s, 4) if compaction_s is not None else None,
            "retract_s": round(retract_s, 2) if retract_s is not None else None,
            "applying_s": round(applying_s, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", *SHAPES), default="tiny")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=5, help="training steps per edit")
    parser.add_argument("--compact-every", type=int, default=100, help="MEMOIR_COMPACT_EVERY_EDITS")
    parser.add_argument("--retract", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    command = "python -m bench.memory_log " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    write_json(args.out, {"command": command, **result})
    for key, value in result.items():
        print(f"{key:32} {value}")
    if args.json:
        print(json.dumps({"machine": machine(), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
