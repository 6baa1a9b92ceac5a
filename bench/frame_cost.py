"""What training every frame costs: one edit as the paper trains it (the prompt alone, one frame,
the paper's loss stop within 30 steps: the service before issue 22) against the same edit as the
service trains it now (the submitted frame, the other frame, EOS, and the preset's stop rule).

    python -m bench.frame_cost --edits 20 --out results/frame_cost.json

Both engines share the loaded model and edit the same first N ZsRE records; the two are run in
turn, record by record (paper, served, paper, ...), so a drift in the machine's speed reaches both
alike. Reports median and p90 seconds per edit, the median of the per-record ratios, and SGD steps.
--form chat submits the records as chat user messages instead of plain prompts.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from bench.common import median, percentile, table, write_json, zsre_on_default_model
from memoir_core import LoadedModel, Message, MemoirEngine, edit_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--form", choices=("plain", "chat"), default="plain")
    parser.add_argument("--out")
    args = parser.parse_args()
    preset, requests, background = zsre_on_default_model()
    loaded = LoadedModel(preset.model, preset.tokenizer, preset.model_id)
    paper_rule = replace(preset.config.hyper, fit_iterations=None, max_iterations=30)
    paper = MemoirEngine(
        loaded,
        replace(preset.config, hyper=paper_rule),
        background_prompts=background,
        context_templates=preset.context_templates,
    )
    served = MemoirEngine(loaded, preset.config, background_prompts=background, context_templates=preset.context_templates)
    served.add_chat_background(background)
    seconds = {"paper": [], "served": []}
    steps = {"paper": [], "served": []}
    for request in requests[: args.edits]:
        question = request.prompt if args.form == "plain" else [Message("user", request.prompt)]
        frames = edit_frames(served.tokenizer, question)
        for name, result in (
            ("paper", paper.edit(request.prompt, request.target)),
            ("served", served.edit(frames, request.target, append_eos=True)),
        ):
            seconds[name].append(result.seconds)
            steps[name].append(result.iterations)
    ratios = [s / p for s, p in zip(seconds["served"], seconds["paper"])]
    summary = {
        "edits": args.edits,
        "form": args.form,
        "model": paper.model_id,
        **{f"{name}_median_s": median(values) for name, values in seconds.items()},
        **{f"{name}_p90_s": percentile(values, 0.9) for name, values in seconds.items()},
        **{f"{name}_mean_steps": sum(values) / len(values) for name, values in steps.items()},
        "served_fit_iterations": served.config.hyper.fit_iterations,
        "served_max_iterations": served.config.hyper.max_iterations,
        "ratio_of_medians": median(seconds["served"]) / median(seconds["paper"]),
        "median_ratio": median(ratios),
        "seconds": seconds,
    }
    print(
        table(
            ["training", "median s/edit", "p90 s/edit", "mean SGD steps"],
            [
                [name, summary[f"{name}_median_s"], summary[f"{name}_p90_s"], summary[f"{name}_mean_steps"]]
                for name in seconds
            ],
        )
    )
    print(f"served / paper: ratio of medians {summary['ratio_of_medians']:.2f}, median ratio {summary['median_ratio']:.2f}")
    write_json(args.out, {"benchmark": "frame_cost", **summary})


if __name__ == "__main__":
    main()
