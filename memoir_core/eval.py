"""The paper's sequential-editing evaluation (spec §7) on ZsRE, CounterFact and hallucination correction.

    python -m memoir_core.eval zsre --edits 1000 --out runs/zsre-1000.json
    python -m memoir_core.eval counterfact --edits 100 --split dev --out runs/counterfact-100.json
    python -m memoir_core.eval zsre --edits 1,10,100,1000      # one run, reported after each T
    python -m memoir_core.eval hallucination --edits 600 --state-dir runs/eval/hall600   # resumable

Protocol: load the base model in fp32, score every request on the unedited model (the pre-edit
locality predictions are the locality reference), apply the first T edits in order, then score
the first T requests on the final memory. Scores are teacher-forced: reliability and
generalisation are the fraction of target tokens predicted exactly; locality is the fraction of
positions where the edited model predicts what the unedited one did (on CounterFact the locality
prompt is a neighbourhood prompt: the same relation about a similar subject); hallucination
reliability is the perplexity of the correct sentence.

The threshold only gates which requests the memory answers; it plays no part in training. So the
post pass is scored once with the memory on (best match, whatever its ratio) and combined with
the pre-edit scores by each request's match ratio: the figures for any tau, including a tau
calibrated from background prompts, come from one run.

A long run can be stopped and continued: with --state-dir, the memory (a state file as the service
writes) and the run's progress are saved every --save-every edits, and a later run with the same
task, data, model and settings continues from the last save. The pre-edit pass is recomputed (it
does not depend on the memory); the figures are those of one uninterrupted run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import json
import math
import os
from pathlib import Path
import sys
import time

import torch
from tqdm import tqdm

from . import free_eval
from .background import BACKGROUND_SIZE
from .editor import COLUMN_STEPS, DECAY_SCOPES
from .engine import MemoirEngine, ScoredContinuation
from .frames import Message, edit_frames
from .models import load_model
from .presets import ConfigOverrides, model_shape, recommended_config
from .splits import SPLITS, select
from .state import file_sha256

EDIT_FORMS = ("paper", "plain", "chat")
HALLUCINATION_THRESHOLD = 0.9  # the paper's tau for hallucination correction (ZsRE: 0.4)
DEFAULT_SWEEP = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)
TASKS = ("zsre", "counterfact", "hallucination")
PARAPHRASED = ("zsre", "counterfact")  # tasks whose records carry a paraphrase: they report Rel, Gen, Loc, Avg
DATA_FILES = {
    "zsre": "zsre/zsre_mend_edit.json",
    "counterfact": "counterfact/counterfact-edit.json",
    "hallucination": "hallucination/hallucination-edit.json",
}


def default_data_dir() -> Path:
    configured = os.environ.get("MEMOIR_DATA_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_data_file(task: str) -> Path:
    return default_data_dir() / DATA_FILES[task]


def default_background_file() -> Path:
    """The paper's irrelevant prompts: ZsRE training locality prompts (spec §2.2)."""
    return default_data_dir() / "zsre" / "wise_zsre_train_loc_prompts_1000.json"


def load_background(path: Path) -> list[str]:
    """The first 100 prompts of a JSON list: the ones whose mean de-centres TopHash features."""
    return json.loads(path.read_text(encoding="utf-8"))[:BACKGROUND_SIZE]


@dataclass
class Request:
    prompt: str
    target: str
    rephrase: str | None
    loc_prompt: str
    loc_answer: str
    subject: str | None = None


class BadRecord(ValueError):
    """A record the loader refuses; the message names its index in the file's list."""


def _text(record, index: int, *path: str) -> str:
    """The non-empty string at `path` in a CounterFact record, or BadRecord naming the record."""
    value, name = record, ".".join(path)
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise BadRecord(f"counterfact record {index}: missing {name!r}")
        value = value[key]
    if not isinstance(value, str):
        raise BadRecord(f"counterfact record {index}: {name!r} is not a string")
    if not value.strip():
        raise BadRecord(f"counterfact record {index}: {name!r} is empty")
    return value


def _first(record: dict, index: int, key: str) -> str:
    """The first prompt of a list in ROME's form (the paraphrase, the neighbourhood prompt)."""
    values = record.get(key)
    if not isinstance(values, list) or not values:
        raise BadRecord(f"counterfact record {index}: missing {key!r} (a non-empty list of prompts)")
    return _text({f"{key}[0]": values[0]}, index, f"{key}[0]")


def counterfact_request(record, index: int) -> Request:
    """One CounterFact record, in EasyEdit's flattened form or ROME's original form. Targets lose
    any leading space, as ZsRE's `alt` has none: scoring puts one between prompt and target."""
    if not isinstance(record, dict):
        raise BadRecord(f"counterfact record {index}: not an object")
    if "requested_rewrite" not in record:
        fields = ("prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "subject")
        prompt, target, rephrase, loc, loc_answer, subject = (_text(record, index, f) for f in fields)
        return Request(prompt, target.strip(), rephrase, loc, loc_answer.strip(), subject)
    subject = _text(record, index, "requested_rewrite", "subject")
    template = _text(record, index, "requested_rewrite", "prompt")
    if "{}" not in template:
        raise BadRecord(f"counterfact record {index}: 'requested_rewrite.prompt' has no '{{}}' for the subject")
    target = _text(record, index, "requested_rewrite", "target_new", "str").strip()
    loc_answer = _text(record, index, "requested_rewrite", "target_true", "str").strip()
    rephrase, loc = _first(record, index, "paraphrase_prompts"), _first(record, index, "neighborhood_prompts")
    return Request(template.replace("{}", subject), target, rephrase, loc, loc_answer, subject)


def load_requests(task: str, path: Path) -> list[Request]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if task == "zsre":
        return [Request(r["src"], r["alt"], r["rephrase"], r["loc"], r["loc_ans"], r.get("subject")) for r in records]
    if task == "counterfact":
        if not isinstance(records, list):
            raise BadRecord("counterfact file: not a JSON list of records")
        return [counterfact_request(r, i) for i, r in enumerate(records)]
    return [
        Request(r["prompt"], r["target_new"], None, r["locality_prompt"], r["locality_ground_truth"]) for r in records
    ]


def one_per_subject(requests: list[Request]) -> list[Request]:
    """The first record of each subject: a user correcting that many different facts, without
    ZsRE's reworded repeats of one question that carry other targets."""
    seen: set[str] = set()
    kept = []
    for request in requests:
        if request.subject is None or request.subject not in seen:
            kept.append(request)
            seen.add(request.subject)
    return kept


def _agreement(pre: ScoredContinuation, post: ScoredContinuation) -> float:
    return sum(a == b for a, b in zip(pre.predicted, post.predicted)) / len(pre.predicted)


@dataclass
class Scored:
    """Pre-edit (memory off) and memory-on scores of one request's three probes."""

    rel_off: ScoredContinuation
    rel_on: ScoredContinuation | None = None
    gen_off: ScoredContinuation | None = None
    gen_on: ScoredContinuation | None = None
    loc_off: ScoredContinuation | None = None  # None: the locality answer adds no tokens
    loc_on: ScoredContinuation | None = None


def _ratio(scored: ScoredContinuation | None) -> float:
    if scored is None or scored.decision is None or scored.decision.match is None:
        return 0.0
    return scored.decision.match.ratio


def _same_mask(scored: ScoredContinuation | None, reference: ScoredContinuation | None) -> bool:
    """Both probes' best stored mask is the same one (for a paraphrase and its edited prompt: the
    paraphrase found its own edit's columns, which it needs to get that edit's answer)."""
    matches = [s.decision.match if s is not None and s.decision is not None else None for s in (scored, reference)]
    return None not in matches and matches[0].position == matches[1].position


def _choose(off: ScoredContinuation, on: ScoredContinuation, tau: float) -> ScoredContinuation:
    return on if _ratio(on) >= tau else off


class Evaluation:
    def __init__(self, engine: MemoirEngine, task: str, requests: list[Request], batch_size: int):
        self.engine = engine
        self.task = task
        self.paraphrased = task in PARAPHRASED
        self.requests = requests
        self.batch_size = batch_size
        self.scored: list[Scored] = []

    def _score(self, pairs, use_edits: bool) -> list[ScoredContinuation]:
        return self.engine.score(pairs, use_edits=use_edits, batch_size=self.batch_size)

    def _loc_pairs(self, requests):
        return [(r.loc_prompt, r.loc_answer) for r in requests if r.loc_answer.strip()]

    def pre_pass(self) -> None:
        rs = self.requests
        rel = self._score([(r.prompt, r.target) for r in rs], use_edits=False)
        gen = self._score([(r.rephrase, r.target) for r in rs], False) if self.paraphrased else [None] * len(rs)
        loc_iter = iter(self._score(self._loc_pairs(rs), use_edits=False))
        self.scored = [
            Scored(rel_off=a, gen_off=b, loc_off=next(loc_iter) if r.loc_answer.strip() else None)
            for r, a, b in zip(rs, rel, gen)
        ]

    def post_pass(self, count: int) -> None:
        """Score the first `count` requests with the memory forced on (tau = 0)."""
        rs = self.requests[:count]
        saved, self.engine.threshold = self.engine.threshold, 0.0
        try:
            rel = self._score([(r.prompt, r.target) for r in rs], use_edits=True)
            gen = self._score([(r.rephrase, r.target) for r in rs], True) if self.paraphrased else [None] * count
            loc_iter = iter(self._score(self._loc_pairs(rs), use_edits=True))
        finally:
            self.engine.threshold = saved
        for r, s, a, b in zip(rs, self.scored, rel, gen):
            s.rel_on, s.gen_on = a, b
            s.loc_on = next(loc_iter) if r.loc_answer.strip() else None

    def metrics(self, count: int, tau: float) -> dict:
        rows = []
        for r, s in zip(self.requests[:count], self.scored):
            rel = _choose(s.rel_off, s.rel_on, tau)
            row = {"prompt": r.prompt, "target": r.target, "rel_ratio": _ratio(s.rel_on), "rel_fired": rel is s.rel_on}
            if self.paraphrased:
                gen = _choose(s.gen_off, s.gen_on, tau)
                row.update(rel=rel.accuracy, gen=gen.accuracy, gen_ratio=_ratio(s.gen_on), gen_fired=gen is s.gen_on,
                           gen_own_mask=_same_mask(s.gen_on, s.rel_on))
            else:
                row.update(ppl=math.exp(rel.nll))
            if s.loc_off is not None:
                loc = _choose(s.loc_off, s.loc_on, tau)
                row.update(loc=_agreement(s.loc_off, loc), loc_ratio=_ratio(s.loc_on), loc_fired=loc is s.loc_on)
            rows.append(row)

        def mean(key):
            values = [row[key] for row in rows if key in row]
            return sum(values) / len(values) if values else float("nan")

        summary = {"loc": mean("loc")}
        if self.paraphrased:
            summary.update(rel=mean("rel"), gen=mean("gen"))
            summary["avg"] = (summary["rel"] + summary["gen"] + summary["loc"]) / 3
            summary["gen_own_mask"] = mean("gen_own_mask")  # what bounds Gen on a small model (README)
        else:
            summary["ppl"] = mean("ppl")
        summary["fired"] = {
            probe: mean(f"{probe}_fired") for probe in ("rel", "gen", "loc") if any(f"{probe}_fired" in r for r in rows)
        }
        return {"summary": summary, "requests": rows}

    def pre_edit_summary(self, count: int) -> dict:
        firsts = self.scored[:count]
        out = {"rel": sum(s.rel_off.accuracy for s in firsts) / count}
        if self.paraphrased:
            out["gen"] = sum(s.gen_off.accuracy for s in firsts) / count
        else:
            out["ppl"] = sum(math.exp(s.rel_off.nll) for s in firsts) / count
        return out


def _table(task: str, results: list[dict]) -> str:
    if task in PARAPHRASED:
        header = f"{'T':>6} {'tau':>6} {'Rel':>6} {'Gen':>6} {'Loc':>6} {'Avg':>6} {'s/edit':>7}"
        lines = [
            f"{r['edits']:>6} {r['threshold']:>6.3f} {r['rel']:>6.3f} {r['gen']:>6.3f} {r['loc']:>6.3f} "
            f"{r['avg']:>6.3f} {r['seconds_per_edit']:>7.2f}"
            for r in results
        ]
    else:
        header = f"{'T':>6} {'tau':>6} {'PPL':>8} {'Loc':>6} {'s/edit':>7}"
        lines = [
            f"{r['edits']:>6} {r['threshold']:>6.3f} {r['ppl']:>8.3f} {r['loc']:>6.3f} {r['seconds_per_edit']:>7.2f}"
            for r in results
        ]
    table = [header, "-" * len(header), *lines]
    free = [r for r in results if "free_generation" in r]
    if free:
        names = [n for n, v in free[0]["free_generation"].items() if not isinstance(v, dict)]  # not fired / repeats
        header = f"{'T':>6} " + " ".join(f"{n:>15}" for n in names)
        table += ["", "free generation (fired)", header, "-" * len(header)]
        for r in free:
            scores = r["free_generation"]
            table.append(
                f"{r['edits']:>6} " + " ".join(f"{scores[n]:>7.3f} ({scores['fired'][n]:.2f})" for n in names)
            )
            table.append(f"{'repeat':>6} " + " ".join(f"{scores['repeats'][n]:>7.3f}       " for n in names))
            if "ends" in scores:
                table.append(
                    f"{'end':>6} "
                    + " ".join(f"{scores['ends'][n]:>7.3f} ({scores['unedited_ends'][n]:.2f})" for n in names)
                    + "  (unedited)"
                )
            if r.get("contested_records"):
                apart = r["free_generation_uncontested"]
                table.append(
                    f"{'':>6} " + " ".join(f"{apart[n]:>7.3f}       " for n in names)
                    + f"  without the {r['contested_records']} contested records"
                )
    return "\n".join(table)


class SavedRun:
    """The memory and progress of a run in --state-dir, so that a stopped run can continue."""

    def __init__(self, directory: Path, identity: dict):
        self.directory = directory
        self.identity = identity
        self.memory_file = directory / "memory.safetensors"
        self.progress_file = directory / "progress.json"

    def restore(self, engine: MemoirEngine) -> dict | None:
        """The saved progress (its memory loaded into the engine), or None for a fresh run."""
        if not self.progress_file.exists():
            return None
        progress = json.loads(self.progress_file.read_text(encoding="utf-8"))
        if progress["run"] != self.identity:
            differing = sorted(k for k in {*progress["run"], *self.identity} if progress["run"].get(k) != self.identity.get(k))
            sys.exit(
                f"{self.directory} holds a run with other settings ({', '.join(differing)} differ); "
                "use another --state-dir or the same settings"
            )
        engine.load(self.memory_file)
        return progress

    def save(self, engine: MemoirEngine, progress: dict) -> None:
        engine.save(self.memory_file)  # written atomically; progress follows, so a crash in between
        staging = self.progress_file.with_suffix(".tmp")  # leaves a memory at most one save ahead
        staging.write_text(json.dumps({"run": self.identity, **progress}), encoding="utf-8")
        os.replace(staging, self.progress_file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m memoir_core.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--edits", default="10", help="T, or a comma list (one run, reported after each T)")
    parser.add_argument("--data", type=Path, help="edit file (default: ../shared/data/<task>/...)")
    parser.add_argument("--background", type=Path, help="JSON list of irrelevant prompts; the first 100 are used")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--model", default=None, help="model directory, GGUF file or hub id (default: embedded)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument(
        "--threshold", default=None, help="tau, or 'calibrate' (default: the model preset; hallucination 0.9)"
    )
    parser.add_argument("--sweep", default=",".join(map(str, DEFAULT_SWEEP)), help="extra tau values to report")
    parser.add_argument("--lr", type=float, help="edit learning rate (default: the model preset); weight decay 1e-5 / lr")
    parser.add_argument(
        "--decay",
        choices=DECAY_SCOPES,
        help="weight decay on all of W_m every step (the paper), only on the edited columns, or none "
        "(default: the model preset)",
    )
    parser.add_argument(
        "--column-step",
        choices=COLUMN_STEPS,
        help="plain gradient on every masked column (the paper) or smaller steps on columns many stored masks "
        "hold (default: the model preset)",
    )
    parser.add_argument(
        "--protect",
        type=float,
        help="ridge factor that steers each edit's steps away from stored edits' keys; smaller protects more; "
        "0: off, the paper's plain step (default: the model preset; off where it has none)",
    )
    parser.add_argument("--max-iterations", type=int, help="SGD steps an edit may take (default: the model preset)")
    parser.add_argument(
        "--fit-iterations",
        type=int,
        help="an edit not yet answered right after --max-iterations keeps training up to this many steps; "
        "0: off, the paper's budget (default: the model preset)",
    )
    parser.add_argument(
        "--edit-form",
        choices=EDIT_FORMS,
        default="paper",
        help="paper: the prompt alone, target without end-of-sequence (the paper's protocol); plain / chat: "
        "submitted as a prompt / as a chat user message and trained as the service trains it (every frame, "
        "with end-of-sequence after the target only with --append-eos)",
    )
    parser.add_argument(
        "--append-eos",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --edit-form plain / chat: also train end-of-sequence after the target in every frame, so "
        "answers stop after it, as MEMOIR_EDIT_APPEND_EOS=true does (default: off, as the service)",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="also decode every probe greedily through the serving path, as plain prompts and in chat (free generation)",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="edit only the records of one subject split (memoir_core/splits.py): choose settings on dev, "
        "report test; all: the whole file, the paper's protocol",
    )
    parser.add_argument(
        "--one-per-subject",
        action="store_true",
        help="edit only the first record of each subject (ZsRE repeats questions with other targets)",
    )
    parser.add_argument(
        "--release-after-answer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="free generation: switch a row's memory off once it has said the matched edit's target",
    )
    parser.add_argument(
        "--supersede",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an edit whose normalised question (or a mask) equals a stored edit's supersedes it, as "
        "MEMOIR_SUPERSEDE=true does; ZsRE's and CounterFact's first 1000 records repeat no question, "
        "their contested records are rephrasings and supersede nothing",
    )
    parser.add_argument(
        "--key-projector",
        default=None,
        help="find edits by a key projector's router keys (cosine) instead of mask overlap: 'auto' (the one "
        "shipped for the model) or a file from `python -m memoir_core.key_projector`, as MEMOIR_KEY_PROJECTOR",
    )
    parser.add_argument("--reference", action="store_true", help="use the straightforward full-model edit loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--state-dir", type=Path, help="save the memory and progress here; continue a run found there")
    parser.add_argument("--save-every", type=int, default=10, help="edits between saves into --state-dir")
    args = parser.parse_args(argv)
    args.append_eos = args.append_eos and args.edit_form != "paper"  # the paper's form never trains it
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = args.data or default_data_file(args.task)
    checkpoints = sorted({int(t) for t in str(args.edits).split(",")})
    try:
        loaded_requests = load_requests(args.task, data)
    except BadRecord as refused:
        sys.exit(f"{data}: {refused}")
    requests = select(loaded_requests, args.split, lambda r: r.subject or r.prompt)
    if args.one_per_subject:
        requests = one_per_subject(requests)
    if checkpoints[-1] > len(requests):
        sys.exit(f"--edits {checkpoints[-1]} exceeds the {len(requests)} records in {data}")
    requests = requests[: checkpoints[-1]]
    background_file = args.background or default_background_file()
    background = load_background(background_file)

    torch.manual_seed(args.seed)
    calibrate = args.threshold == "calibrate"
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    # the model's preset (memoir_core/presets.py), overridden by any option given here;
    # hallucination uses the paper's tau 0.9 unless --threshold says otherwise
    explicit_tau = None if args.threshold in (None, "calibrate") else float(args.threshold)
    if explicit_tau is None and args.task == "hallucination":
        explicit_tau = HALLUCINATION_THRESHOLD
    config = recommended_config(
        model_shape(loaded.model),
        ConfigOverrides(
            layer=args.layer,
            top_k=args.top_k,
            threshold=explicit_tau,
            calibrate_threshold=False,  # tau is read out afterwards from memory-off and memory-on scores
            lr=args.lr,
            max_iterations=args.max_iterations,
            decay=args.decay,
            column_step=args.column_step,
            protect=args.protect,
            fit_iterations=args.fit_iterations,
            seed=args.seed,
            fast_edit=not args.reference,
            release_after_answer=args.release_after_answer,
            supersede=args.supersede,
            key_projector=args.key_projector,
        ),
    )
    tau = config.threshold
    engine = MemoirEngine(loaded, config, background_prompts=background)
    if args.generate or args.edit_form != "paper":  # chat questions are de-centred by a chat background
        engine.add_chat_background(background)
    print(
        f"model {engine.model_id}: layer {engine.layer}/{len(engine.blocks)}, D {engine.width}, k {engine.top_k}, "
        f"tau {'calibrated' if calibrate else tau}; set-up {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    saved_run = None
    if args.state_dir:
        identity = {
            "task": args.task,
            "data": file_sha256(data),
            "split": args.split,
            "one_per_subject": args.one_per_subject,
            "background": file_sha256(background_file),
            "weights": engine.weights_fingerprint,
            "layer": engine.layer,
            "top_k": engine.top_k,
            "hyper": asdict(engine.config.hyper),
            "dtype": str(engine.memory.projection.weight.dtype),
            "seed": args.seed,
            "edit_path": "reference" if args.reference else "fast",
            "edit_form": args.edit_form,
            "append_eos": args.append_eos,
            # only when off: runs saved before the option superseded nothing on these data either
            **({} if args.supersede else {"supersede": False}),
            **({"router": engine.layout.router} if engine.layout.router else {}),
        }
        saved_run = SavedRun(args.state_dir, identity)
    restored = saved_run.restore(engine) if saved_run else None
    done = restored["edits_done"] if restored else 0
    if done > checkpoints[-1]:
        sys.exit(f"{args.state_dir} already holds {done} edits, more than --edits {checkpoints[-1]}")
    edit_seconds = restored["edit_seconds"] if restored else 0.0
    losses = restored["losses"] if restored else []
    iterations = restored["iterations"] if restored else []
    # reports are kept per decoding setting: the same saved edits can be reported again with the other
    results = [
        r for r in (restored["results"] if restored else []) if r.get("release_after_answer") == args.release_after_answer
    ]
    if restored:
        print(f"continuing from {done} edits saved in {args.state_dir}", file=sys.stderr)

    def save_progress() -> None:
        if saved_run:
            state = {"edits_done": done, "edit_seconds": edit_seconds, "losses": losses, "iterations": iterations}
            saved_run.save(engine, {**state, "results": results})

    evaluation = Evaluation(engine, args.task, requests, args.batch_size)
    evaluation.pre_pass()

    progress = tqdm(total=checkpoints[-1], initial=done, desc=f"{args.task} edits", unit="edit")
    reported = {r["edits"] for r in results}
    for checkpoint in checkpoints:
        if checkpoint in reported or checkpoint < done:
            continue  # reported before the run was stopped, or passed without a report then
        for request in requests[done:checkpoint]:
            outcome = _edit(engine, request, args.edit_form, args.append_eos)
            edit_seconds += outcome.seconds
            losses.append(outcome.loss)
            iterations.append(outcome.iterations)
            done += 1
            progress.update(1)
            progress.set_postfix(loss=f"{outcome.loss:.3f}", it=outcome.iterations)
            if done % args.save_every == 0 and done < checkpoint:
                save_progress()
        evaluation.post_pass(checkpoint)
        # the engine's background prompts are this run's irrelevant prompts (see MemoirEngine above)
        used_tau = engine.calibrated_threshold(engine.snapshot.index) if calibrate else tau
        sweep = {}
        for value in sorted({*(float(v) for v in args.sweep.split(",") if v), used_tau}):
            sweep[f"{value:.3f}"] = evaluation.metrics(checkpoint, value)["summary"]
        report = evaluation.metrics(checkpoint, used_tau)
        free_report = {}
        if args.generate:
            edited = requests[:checkpoint]
            probes = [free_eval.probes(engine.tokenizer, r.prompt, r.rephrase, r.loc_prompt, r.target) for r in edited]
            free = free_eval.score(engine, probes, used_tau)
            disputed = free_eval.contested([r.subject for r in edited], [r.target for r in edited])
            for row, generated, flag in zip(report["requests"], free["requests"], disputed):
                row["generated"] = generated
                row["contested"] = flag
            free_report = {
                "free_generation": free["summary"],
                "free_generation_uncontested": free_eval.summary_of(
                    [g for g, flag in zip(free["requests"], disputed) if not flag]
                ),
                "contested_records": sum(disputed),
                # the later correction wins: every record scored against its subject's newest target
                "free_generation_latest": free_eval.summary_of(
                    free_eval.rescored(
                        free["requests"], free_eval.latest_targets([r.subject for r in edited], [r.target for r in edited])
                    )
                ),
            }
        results.append(
            {
                **report["summary"],
                "edits": checkpoint,
                "release_after_answer": args.release_after_answer,
                "threshold": used_tau,
                "threshold_calibrated": calibrate,
                "seconds_per_edit": edit_seconds / checkpoint,
                "mean_iterations": sum(iterations) / len(iterations),
                "mean_final_loss": sum(losses) / len(losses),
                "pre_edit": evaluation.pre_edit_summary(checkpoint),
                "threshold_sweep": sweep,
                "background_ratios_max": max(engine.best_ratios(background)),
                "superseded": len(engine.snapshot.index.superseded),
                "router": engine.layout.router,  # the key projector's digest, or None: masks
                **free_report,
                "requests": report["requests"],
            }
        )
        save_progress()
        _write_output(args, engine, data, results)
    progress.close()
    print(_table(args.task, results))
    return _write_output(args, engine, data, results)


def _edit(engine: MemoirEngine, request: Request, form: str, append_eos: bool):
    """Apply one request's edit as the paper does, or as the service does for that submitted form."""
    if form == "paper":
        return engine.edit(request.prompt, request.target)
    question = request.prompt if form == "plain" else [Message("user", request.prompt)]
    return engine.edit(edit_frames(engine.tokenizer, question), request.target, append_eos=append_eos)


def source_commit() -> str | None:
    """The checkout's commit, with "-dirty" if tracked files were changed (None outside git)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _write_output(args: argparse.Namespace, engine: MemoirEngine, data: Path, results: list[dict]) -> dict:
    """The run's JSON: the last checkpoint's metrics at the top level, every checkpoint under by_edits.

    Written after each checkpoint, so a long run that is stopped keeps what it has measured."""
    output = {
        **results[-1],
        "task": args.task,
        "commit": source_commit(),
        "model": engine.model_id,
        "layer": engine.layer,
        "blocks": len(engine.blocks),
        "width": engine.width,
        "top_k": engine.top_k,
        "device": str(engine.device),
        "dtype": str(engine.memory.projection.weight.dtype),
        "edit_path": "reference" if args.reference else "fast",
        "edit_form": args.edit_form,
        "append_eos": args.append_eos,
        "lr": engine.config.hyper.lr,
        "decay": engine.config.hyper.decay,
        "column_step": engine.config.hyper.column_step,
        "protect": engine.config.hyper.protect,
        "fit_iterations": engine.config.hyper.fit_iterations,
        "max_iterations": engine.config.hyper.max_iterations,
        "one_per_subject": args.one_per_subject,
        "split": args.split,
        "data": str(data),
        "by_edits": [{k: v for k, v in r.items() if k != "requests"} for r in results],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
