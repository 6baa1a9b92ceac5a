"""How the edit paths' speed on CUDA settles after the process starts: the fast path and the
reference loop on a randomly initialised LLaMA-3-8B-shaped model, in phases.

    python -m bench.gpu_warmup --out $OUT/gpu_warmup.json     # on a CUDA host, bf16

A: fast and reference alternating on the first new facts after start; B: fast only, new facts;
C: fast, facts it has seen (fewer steps); D: a fresh engine on B's facts; E: alternating again on
B's facts. Each row: seconds, SGD steps and seconds per step of one edit.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import write_json
from bench.gpu import FACTS, build_model, build_tokenizer
from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.models import LoadedModel, resolve_dtype

MORE = [
    ("Which metal has the chemical symbol Fe?", "iron"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("Which language is spoken in Brazil?", "Portuguese"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--out")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tokenizer = build_tokenizer(128256)
    model = build_model(args.shape, args.device, resolve_dtype(args.dtype, args.device), tokenizer.eos_token_id)
    loaded = LoadedModel(model, tokenizer, f"random-{args.shape}")
    phases: dict[str, list] = {}

    def run(phase: str, engines: dict[str, MemoirEngine], facts) -> None:
        rows = phases.setdefault(phase, [])
        for prompt, target in facts:
            for name, engine in engines.items():
                sync()
                result = engine.edit(prompt, target)
                sync()
                rows.append([name, prompt, result.seconds, result.iterations, result.seconds / max(result.iterations, 1)])
                print(phase, rows[-1], flush=True)

    fast = MemoirEngine(loaded, MemoirConfig())
    reference = MemoirEngine(loaded, MemoirConfig(fast_edit=False), context_templates=fast.context_templates)
    fast.edit(*FACTS[-1])
    reference.edit(*FACTS[-1])
    run("A_alternating", {"fast": fast, "reference": reference}, FACTS[:4])
    run("B_fast_new_facts", {"fast": fast}, MORE)
    run("C_fast_seen_facts", {"fast": fast}, FACTS[:4])
    fresh = MemoirEngine(loaded, MemoirConfig(), context_templates=fast.context_templates)
    run("D_fresh_engine", {"fresh": fresh}, MORE)
    run("E_alternating_again", {"fast": fast, "reference": reference}, MORE)
    write_json(args.out, {"benchmark": "gpu_warmup", "shape": args.shape, "dtype": args.dtype,
                          "columns": ["engine", "prompt", "seconds", "iterations", "seconds_per_step"], "phases": phases})


if __name__ == "__main__":
    main()
