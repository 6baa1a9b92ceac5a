"""Generation overhead: tokens/s and time to first token, unmodified model against the engine.

    python -m bench.generation --out runs/bench/generation.json

Rows: transformers' own `generate` on the unmodified model (the baseline), then the engine with
0, 100 and 1,000 stored edits, with the memory off (prompt matches nothing) and firing (the
prompt's own mask is stored). Stored edits are synthetic (random k-of-D masks and a random W_m):
what generation costs depends on how many masks are searched and whether the memory fires, not on
what the edits say. Greedy, batch 1, a fixed number of new tokens; median of several rounds, each
round running every case once so that drift in the machine's speed touches them alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import median, table, write_json
from memoir_core import GenerationRequest, MemoirEngine, SamplingParams, load_model
from memoir_core.engine import MemoryState
from memoir_core.mask_index import MaskIndex, pack_masks
from memoir_core.presets import model_shape, recommended_config

PROMPT = "What is the name of the river that flows through the city of Vienna?"


def synthetic_memory(engine: MemoirEngine, count: int, fire_on: str | None, seed: int = 0) -> MemoryState:
    generator = torch.Generator().manual_seed(seed)
    width, k = engine.width, engine.top_k
    top = torch.rand(count, width, generator=generator).topk(k, dim=1).indices
    masks = torch.zeros(count, width, dtype=torch.bool).scatter_(1, top, True)
    if fire_on is not None and count:
        masks[-1] = engine.prompt_masks([fire_on])[0].cpu()
    index = MaskIndex(width, k).appended(pack_masks(masks), [f"synthetic-{i}" for i in range(count)])
    weight = torch.randn(engine.out_features, width, generator=generator) * 0.01 if count else torch.zeros(engine.out_features, width)
    return engine.memory_state(weight, index, count)


def engine_run(engine: MemoirEngine, ids: list[int], new_tokens: int) -> tuple[float, bool]:
    request = GenerationRequest(ids, params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    started = time.perf_counter()
    output = engine.generate([request])[0]
    seconds = time.perf_counter() - started
    assert len(output.token_ids) == new_tokens
    return seconds, output.decision.active


def transformers_run(model, ids: list[int], new_tokens: int) -> tuple[float, bool]:
    inputs = torch.tensor([ids], device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - started
    assert out.shape[1] == len(ids) + new_tokens
    return seconds, False


def measure(engine: MemoirEngine, baseline_model, ids: list[int], counts: list[int], fire_on: str,
            new_tokens: int, repeats: int) -> tuple[list[list], list[dict]]:
    """TTFT and tokens/s of transformers' generate on `baseline_model` and of the engine with each
    count of synthetic edits, memory off and firing on `fire_on`; table rows and JSON records."""
    # (label, stored edits, memory, state); the baseline has no state
    cases: list[tuple[str, int | str, str, MemoryState | None]] = [("transformers generate (unmodified)", "-", "-", None)]
    for count in counts:
        for firing in [False, True] if count else [False]:
            cases.append(("engine", count, "firing" if firing else "off", synthetic_memory(engine, count, fire_on if firing else None)))

    def timed(case, tokens: int) -> float:
        _, _, memory, state = case
        if state is None:
            return transformers_run(baseline_model, ids, tokens)[0]
        engine.publish(state)
        seconds, fired = engine_run(engine, ids, tokens)
        assert fired == (memory == "firing")
        return seconds

    for case in cases:  # warm-up
        timed(case, new_tokens)
    # rounds interleave the cases, so drift in the machine's speed touches every case alike
    ttfts: list[list[float]] = [[] for _ in cases]
    totals: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, case in enumerate(cases):
            ttfts[i].append(timed(case, 1))
            totals[i].append(timed(case, new_tokens))
    base_tps = new_tokens / median(totals[0])
    rows, results = [], []
    for i, (label, count, memory, _) in enumerate(cases):
        ttft, tps = median(ttfts[i]), new_tokens / median(totals[i])
        rows.append([label, count, memory, ttft * 1e3, tps, tps / base_tps])
        results.append({"case": label, "edits": count, "memory": memory, "ttft_ms": ttft * 1e3,
                        "tokens_per_s": tps, "throughput_ratio": tps / base_tps})
    return rows, results


HEADERS = ["generator", "stored edits", "memory", "TTFT ms", "tokens/s", "vs unmodified"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--edits", default="0,100,1000")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline_model = load_model(args.model, device=args.device, dtype=args.dtype).model
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = MemoirEngine(loaded, recommended_config(model_shape(loaded.model)))
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    counts = [int(c) for c in args.edits.split(",")]
    rows, results = measure(engine, baseline_model, ids, counts, PROMPT, args.new_tokens, args.repeats)
    print(table(HEADERS, rows))
    write_json(args.out, {"benchmark": "generation", "new_tokens": args.new_tokens, "repeats": args.repeats,
                          "prompt": PROMPT, "results": results})


if __name__ == "__main__":
    main()
