"""Is a free-generation miss a fit that never happened, or one that a later edit undid?

    python -m bench.write_time_fit --edits 30 --out results/write_time_fit.json
    python -m bench.write_time_fit --edits 40 --one-per-subject --fit-iterations 60

Edits the first N ZsRE records on the default model as the service does (every frame, EOS after
the target, τ calibrated) and, right after each edit, decodes its prompt greedily as a plain prompt
and as a chat user message through the serving path: the write-time fit. After the N edits every
probe of `python -m memoir_core.eval zsre --generate` is decoded again: the end-of-run answer.
"""

from __future__ import annotations

import argparse
import time

from bench.common import table, write_json, zsre_on_default_model
from memoir_core import Message, edit_frames, free_eval
from memoir_core.eval import one_per_subject
from memoir_core.presets import ConfigOverrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--form", choices=("plain", "chat"), default="plain")
    parser.add_argument("--one-per-subject", action="store_true")
    parser.add_argument("--max-iterations", type=int)
    parser.add_argument("--fit-iterations", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    overrides = ConfigOverrides(calibrate_threshold=True, max_iterations=args.max_iterations, fit_iterations=args.fit_iterations)
    engine, requests, background = zsre_on_default_model(overrides)
    engine.add_chat_background(background)
    requests = (one_per_subject(requests) if args.one_per_subject else requests)[: args.edits]

    fit, steps, seconds = [], [], []
    for request in requests:
        question = request.prompt if args.form == "plain" else [Message("user", request.prompt)]
        result = engine.edit(edit_frames(engine.tokenizer, question), request.target)  # no EOS, as the service by default
        steps.append(result.iterations)
        seconds.append(result.seconds)
        asked = free_eval.probes(engine.tokenizer, request.prompt, None, request.loc_prompt, request.target)
        asked = [p for p in asked if p.name in ("edit", "chat_edit")]
        answers = free_eval.generate_all(engine, asked, use_edits=True)
        fit.append({p.name: free_eval.answers_with(a.text, p.target) for p, a in zip(asked, answers)})

    started = time.perf_counter()
    probes = [free_eval.probes(engine.tokenizer, r.prompt, r.rephrase, r.loc_prompt, r.target) for r in requests]
    end = free_eval.score(engine, probes, engine.threshold)
    contested = free_eval.contested([r.subject for r in requests], [r.target for r in requests])
    undone = sum(f["edit"] and not e["edit"]["ok"] for f, e in zip(fit, end["requests"]))
    summary = {
        "edits": len(requests),
        "form": args.form,
        "one_per_subject": args.one_per_subject,
        "fit_iterations": engine.config.hyper.fit_iterations,
        "max_iterations": engine.config.hyper.max_iterations,
        "mean_steps": sum(steps) / len(steps),
        "seconds_per_edit": sum(seconds) / len(seconds),
        "write_time_fit": {name: sum(f[name] for f in fit) / len(fit) for name in ("edit", "chat_edit")},
        "end_of_run": end["summary"],
        "plain_fits_undone_later": undone,
        "contested_records": sum(contested),
        "scoring_seconds": time.perf_counter() - started,
        "records": [
            {"prompt": r.prompt, "target": r.target, "contested": c, "steps": s, "write_time": f,
             "end": {name: probe["ok"] for name, probe in e.items()}}
            for r, c, s, f, e in zip(requests, contested, steps, fit, end["requests"])
        ],  # fmt: skip
    }
    names = [n for n in end["summary"] if n != "fired"]
    print(
        table(
            ["edits", "steps", "s/edit", "fit plain", "fit chat", *names],
            [[len(requests), summary["mean_steps"], summary["seconds_per_edit"], summary["write_time_fit"]["edit"],
              summary["write_time_fit"]["chat_edit"], *(end["summary"][n] for n in names)]],
        )  # fmt: skip
    )
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
