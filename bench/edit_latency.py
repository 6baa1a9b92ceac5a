"""Edit latency: the straightforward full-model loop against the engine's fast path.

    python -m bench.edit_latency --edits 20 --out runs/bench/edit_latency.json [--profile]

Both run the same first N ZsRE edits, in order, on the default model in fp32 with the same
hyper-parameters; the script checks that both produce the same masks and the same W_m, and
reports median and p90 seconds per edit and their ratio. --profile adds the top operators of one
fast-path edit (torch profiler). --flops counts, instead of timing, the floating-point operations
each path spends on the same edits (torch's FlopCounterMode: matrix products and attention,
forward and backward): their ratio is the speed-up the fast path could reach if both ran their
arithmetic at the same rate.
"""

from __future__ import annotations

import argparse
import json

from bench.common import median, percentile, table, write_json
from memoir_core import MemoirEngine, load_model
from memoir_core.eval import default_data_file
from memoir_core.presets import model_shape, recommended_config


def run(engine: MemoirEngine, edits: list[dict]) -> tuple[list[float], list]:
    seconds, results = [], []
    for record in edits:
        result = engine.edit(record["src"], record["alt"])
        seconds.append(result.seconds)
        results.append(result)
    return seconds, results


def count_flops(engine: MemoirEngine, edits: list[dict]) -> tuple[list[float], list[int]]:
    """Floating-point operations of each edit (all passes, forward and backward) and its SGD steps."""
    from torch.utils.flop_counter import FlopCounterMode

    flops, steps = [], []
    for record in edits:
        with FlopCounterMode(display=False) as counter:
            result = engine.edit(record["src"], record["alt"])
        flops.append(float(counter.get_total_flops()))
        steps.append(result.iterations)
    return flops, steps


def flop_summary(fast: MemoirEngine, reference: MemoirEngine, records: list[dict]) -> dict:
    fast_flops, fast_steps = count_flops(fast, records)
    reference_flops, reference_steps = count_flops(reference, records)
    per_edit = [r / f for r, f in zip(reference_flops, fast_flops)]
    summary = {
        "reference_gflop_per_edit": [f / 1e9 for f in reference_flops],
        "fast_gflop_per_edit": [f / 1e9 for f in fast_flops],
        "steps": fast_steps,
        "same_iterations": fast_steps == reference_steps,
        "flop_ratio_per_edit": per_edit,
        "flop_ratio_total": sum(reference_flops) / sum(fast_flops),
    }
    print(
        table(
            ["edit", "SGD steps", "reference GFLOP", "fast GFLOP", "ratio"],
            [
                [i + 1, s, r / 1e9, f / 1e9, q]
                for i, (s, r, f, q) in enumerate(zip(fast_steps, reference_flops, fast_flops, per_edit))
            ],
        )
    )
    print(f"total FLOP ratio (reference / fast): {summary['flop_ratio_total']:.2f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--flops", action="store_true", help="count FLOPs of both paths instead of timing them")
    parser.add_argument("--out")
    args = parser.parse_args()
    records = json.loads(default_data_file("zsre").read_text())[: args.edits]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    config = recommended_config(model_shape(loaded.model))
    fast = MemoirEngine(loaded, config)
    reference = MemoirEngine(
        loaded, recommended_config(model_shape(loaded.model), fast_edit=False), context_templates=fast.context_templates
    )
    if args.flops:
        summary = {"edits": args.edits, "model": loaded.model_id, **flop_summary(fast, reference, records)}
        write_json(args.out, {"benchmark": "edit_flops", **summary})
        return
    fast_seconds, fast_results = run(fast, records)
    reference_seconds, reference_results = run(reference, records)
    same_masks = [a.mask_fingerprint for a in fast_results] == [b.mask_fingerprint for b in reference_results]
    same_steps = [a.iterations for a in fast_results] == [b.iterations for b in reference_results]
    difference = (fast.master_weight - reference.master_weight).abs().max().item()
    scale = reference.master_weight.abs().max().item()
    summary = {
        "edits": args.edits,
        "model": loaded.model_id,
        "device": args.device,
        "dtype": args.dtype,
        "reference_median_s": median(reference_seconds),
        "reference_p90_s": percentile(reference_seconds, 0.9),
        "fast_median_s": median(fast_seconds),
        "fast_p90_s": percentile(fast_seconds, 0.9),
        "speedup_median": median(reference_seconds) / median(fast_seconds),
        "speedup_total": sum(reference_seconds) / sum(fast_seconds),
        "same_masks": same_masks,
        "same_iterations": same_steps,
        "max_abs_weight_difference": difference,
        "max_abs_weight": scale,
        "mean_iterations": sum(r.iterations for r in fast_results) / len(fast_results),
    }
    print(
        table(
            ["path", "median s/edit", "p90 s/edit"],
            [
                ["reference (full model)", summary["reference_median_s"], summary["reference_p90_s"]],
                ["fast path", summary["fast_median_s"], summary["fast_p90_s"]],
                ["speed-up", summary["speedup_median"], summary["reference_p90_s"] / summary["fast_p90_s"]],
            ],
        )
    )
    print(f"same masks: {same_masks}, same iterations: {same_steps}, max |dW_m| {difference:.2e} (max |W_m| {scale:.3f})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fast.edit(records[0]["src"] + " (profiled)", records[0]["alt"])
        top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(top)
        summary["profile_top_ops"] = top
    write_json(args.out, {"benchmark": "edit_latency", **summary})


if __name__ == "__main__":
    main()
