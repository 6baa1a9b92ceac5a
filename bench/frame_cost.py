"""What training every frame costs: one edit as the paper trains it (the prompt alone, one frame,
the paper's loss stop within 30 steps: the service before issue 22) against the same edit as the
service trains it now (both frames, the context-template rows on the chat frame, the memory from
the question on, the preset's stop rule; no EOS, as the service by default).

    python -m bench.frame_cost --edits 20 --out results/frame_cost.json

The engines share the loaded model and edit the same first N ZsRE records in turn, record by
record (paper, served, paper, ...), so a drift in the machine's speed reaches both alike. Reports median and p90 seconds per edit, the median of the per-record ratios, and SGD steps.
--form chat submits the records as chat user messages instead of plain prompts.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from bench.common import median, percentile, table, write_json, zsre_on_default_model
from memoir_core import LoadedModel, Message, MemoirEngine, edit_frames
from memoir_core.editor import EditHyperParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--form", choices=("plain", "chat"), default="plain")
    parser.add_argument("--out")
    args = parser.parse_args()
    preset, requests, background = zsre_on_default_model()
    loaded = LoadedModel(preset.model, preset.tokenizer, preset.model_id)

    def engine(hyper: EditHyperParams, frames: bool) -> MemoirEngine:
        config = replace(preset.config, hyper=hyper)
        made = MemoirEngine(loaded, config, background_prompts=background, context_templates=preset.context_templates)
        if frames:
            made.add_chat_background(background)
        return made

    served_rule = preset.config.hyper
    engines = {
        "paper": engine(replace(served_rule, fit_iterations=None, max_iterations=30), frames=False),
        "served": engine(served_rule, frames=True),
    }
    seconds = {name: [] for name in engines}
    steps = {name: [] for name in engines}
    for request in requests[: args.edits]:
        question = request.prompt if args.form == "plain" else [Message("user", request.prompt)]
        frames = edit_frames(loaded.tokenizer, question)
        for name, edited in engines.items():
            if name == "paper":
                result = edited.edit(request.prompt, request.target)
            else:
                result = edited.edit(frames, request.target)  # no EOS, as the service by default
            seconds[name].append(result.seconds)
            steps[name].append(result.iterations)
    summary = {
        "edits": args.edits,
        "form": args.form,
        "model": engines["paper"].model_id,
        **{f"{name}_median_s": median(values) for name, values in seconds.items()},
        **{f"{name}_p90_s": percentile(values, 0.9) for name, values in seconds.items()},
        **{f"{name}_mean_steps": sum(values) / len(values) for name, values in steps.items()},
        "served_fit_iterations": served_rule.fit_iterations,
        "served_max_iterations": served_rule.max_iterations,
        **{
            f"{name}_ratio_of_medians": median(seconds[name]) / median(seconds["paper"])
            for name in engines
            if name != "paper"
        },
        **{
            f"{name}_median_ratio": median([s / p for s, p in zip(seconds[name], seconds["paper"])])
            for name in engines
            if name != "paper"
        },
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
    for name in engines:
        if name != "paper":
            print(
                f"{name} / paper: ratio of medians {summary[f'{name}_ratio_of_medians']:.2f}, "
                f"median ratio {summary[f'{name}_median_ratio']:.2f}"
            )
    write_json(args.out, {"benchmark": "frame_cost", **summary})


if __name__ == "__main__":
    main()
