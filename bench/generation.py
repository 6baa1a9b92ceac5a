"""Generation overhead: tokens/s and time to first token, unmodified model against the engine.

    python -m bench.generation --out runs/bench/generation.json

Rows: transformers' own `generate` on the unmodified model (the baseline), then the engine with
0, 100 and 1,000 stored edits, with the memory off (prompt matches nothing) and firing (the
prompt's own mask is stored). Stored edits are synthetic (random k-of-D masks and a random W_m):
what generation costs depends on how many masks are searched and whether the memory fires, not on
what the edits say. Greedy, batch 1, a fixed number of new tokens; median of several runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import median, table, write_json
from memoir_core import GenerationRequest, MemoirEngine, SamplingParams, load_model
from memoir_core.mask_index import MaskIndex, pack_masks
from memoir_core.presets import recommended_config

PROMPT = "What is the name of the river that flows through the city of Vienna?"


def synthetic_memory(engine: MemoirEngine, count: int, fire_on: str | None, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    width, k = engine.width, engine.top_k
    top = torch.rand(count, width, generator=generator).topk(k, dim=1).indices
    masks = torch.zeros(count, width, dtype=torch.bool).scatter_(1, top, True)
    if fire_on is not None and count:
        masks[-1] = engine.prompt_masks([fire_on])[0].cpu()
    index = MaskIndex(width, k).appended(pack_masks(masks), [f"synthetic-{i}" for i in range(count)])
    weight = torch.randn(engine.out_features, width, generator=generator) * 0.01 if count else torch.zeros(engine.out_features, width)
    engine.publish(engine.memory_state(weight, index, count))


def time_engine(engine: MemoirEngine, ids: list[int], new_tokens: int, repeats: int) -> tuple[float, float, bool]:
    def run(n):
        request = GenerationRequest(ids, params=SamplingParams(max_new_tokens=n, ignore_eos=True))
        started = time.perf_counter()
        output = engine.generate([request])[0]
        return time.perf_counter() - started, output

    run(new_tokens)  # warm-up
    ttft = median([run(1)[0] for _ in range(repeats)])
    totals, fired = [], False
    for _ in range(repeats):
        seconds, output = run(new_tokens)
        assert len(output.token_ids) == new_tokens
        totals.append(seconds)
        fired = output.decision.active
    return ttft, new_tokens / median(totals), fired


def time_transformers(model, ids: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    inputs = torch.tensor([ids], device=model.device)

    def run(n):
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - started

    run(new_tokens)
    ttft = median([run(1) for _ in range(repeats)])
    return ttft, new_tokens / median([run(new_tokens) for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--edits", default="0,100,1000")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline_model = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = baseline_model.tokenizer(PROMPT)["input_ids"]
    base_ttft, base_tps = time_transformers(baseline_model.model, ids, args.new_tokens, args.repeats)
    del baseline_model
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = MemoirEngine(loaded, recommended_config(loaded.model_id))
    rows = [["transformers generate (unmodified)", "-", "-", base_ttft * 1e3, base_tps, 1.0]]
    results = [{"case": "transformers", "ttft_ms": base_ttft * 1e3, "tokens_per_s": base_tps}]
    for count in (int(c) for c in args.edits.split(",")):
        for firing in ([False, True] if count else [False]):
            synthetic_memory(engine, count, PROMPT if firing else None)
            ttft, tps, fired = time_engine(engine, ids, args.new_tokens, args.repeats)
            assert fired == firing
            rows.append(["engine", count, "firing" if fired else "off", ttft * 1e3, tps, tps / base_tps])
            results.append({"case": "engine", "edits": count, "memory": "firing" if fired else "off",
                            "ttft_ms": ttft * 1e3, "tokens_per_s": tps, "throughput_ratio": tps / base_tps})
            print(rows[-1], flush=True)
    print(table(["generator", "stored edits", "memory", "TTFT ms", "tokens/s", "vs unmodified"], rows))
    write_json(args.out, {"benchmark": "generation", "new_tokens": args.new_tokens, "prompt": PROMPT, "results": results})


if __name__ == "__main__":
    main()
