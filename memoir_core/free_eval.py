"""The user's yardstick: what the edited model generates, wherever the fact is asked.

After the edits, every probe is decoded greedily through the serving path (`MemoirEngine.generate`:
KV cache, the memory decision at the prefill, the served tau) as a plain prompt and as a chat user
message: the edit prompt, its paraphrase, and the locality question. An edit probe succeeds when
the target starts the answer (found within its first dozen characters, case and punctuation
ignored); a locality probe when its answer is exactly the unedited model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import MemoirEngine
from .frames import Prompt, question_frames
from .generation import GenerationOutput, GenerationRequest, SamplingParams, normalised

MAX_NEW_TOKENS = 16  # at least; a longer target (a corrected sentence) gets room for itself
WITHIN_CHARACTERS = 12  # the target must start within this many characters of the answer


def repeats_a_word(text: str, times: int = 3) -> bool:
    """Whether one word comes `times` times in a row ("Lewis Lewis Lewis"): an answer that does
    not end the way the unedited model's would (case and punctuation ignored)."""
    words = normalised(text).split()
    return any(len(set(words[i : i + times])) == 1 for i in range(len(words) - times + 1))


def answers_with(generated: str, target: str) -> bool:
    wanted = normalised(target)
    found = normalised(generated).find(wanted)
    return bool(wanted) and 0 <= found <= WITHIN_CHARACTERS


@dataclass(frozen=True)
class Probe:
    name: str  # "edit", "paraphrase", "loc", with "chat_" before it when asked in chat
    prompt: Prompt
    target: str | None  # None: a locality probe (compared with the unedited answer)
    max_new_tokens: int = MAX_NEW_TOKENS


def probes(tokenizer, prompt: str, paraphrase: str | None, loc_prompt: str, target: str) -> list[Probe]:
    room = max(MAX_NEW_TOKENS, len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 2)
    asked = [("edit", prompt, target), ("paraphrase", paraphrase, target), ("loc", loc_prompt, None)]
    framed = [(name, question_frames(tokenizer, text), want) for name, text, want in asked if text]
    out = [Probe(name, frames[0], want, room) for name, frames, want in framed]
    return out + [Probe(f"chat_{name}", frames[1], want, room) for name, frames, want in framed if len(frames) > 1]


def generate_all(engine: MemoirEngine, probes: list[Probe], use_edits: bool, batch_size: int = 32) -> list[GenerationOutput]:
    """Greedy answers, decoded `batch_size` at a time as the service's batcher would."""
    outputs: list[GenerationOutput] = []
    for first in range(0, len(probes), batch_size):
        requests = []
        for probe in probes[first : first + batch_size]:
            ids, start = engine.encode(probe.prompt)
            params = SamplingParams(max_new_tokens=probe.max_new_tokens)
            requests.append(GenerationRequest(ids, start, params, use_edits, format=probe.prompt.format))
        outputs += engine.generate(requests)
    return outputs


def score(engine: MemoirEngine, per_request: list[list[Probe]], threshold: float) -> dict:
    """Free-generation scores of each request's probes at `threshold` (set on the engine for the
    decoding, restored after). Returns {"summary": {probe: rate, "fired": {...}}, "requests": [...]}."""
    flat = [probe for request in per_request for probe in request]
    saved, engine.threshold = engine.threshold, threshold
    try:
        edited = generate_all(engine, flat, use_edits=True)
    finally:
        engine.threshold = saved
    # every probe unedited too: the locality answers to compare with, and how often the model's own
    # answers end (reach EOS or end of turn) within the same token budget
    unedited = generate_all(engine, flat, use_edits=False)
    rows, position = [], 0
    for request in per_request:
        row = {}
        for probe in request:
            out, own = edited[position], unedited[position]
            ok = out.text == own.text if probe.target is None else answers_with(out.text, probe.target)
            row[probe.name] = {
                "text": out.text,
                "ok": ok,
                "fired": bool(out.decision and out.decision.active),
                "repeats": repeats_a_word(out.text),
                "ends": out.finish_reason == "stop",
                "unedited_ends": own.finish_reason == "stop",
            }
            position += 1
        rows.append(row)
    return {"summary": summary_of(rows), "requests": rows}


def summary_of(rows: list[dict]) -> dict:
    """{probe: success rate, and per probe the rates at which the memory fired, an answer repeats a
    word, ends, and the unedited answer ends} over per-request rows as `score` returns them (rows
    written before a field was counted lack it: nan)."""
    names = list(dict.fromkeys(name for row in rows for name in row))

    def rate(name: str, field: str) -> float:
        values = [row[name][field] for row in rows if name in row and field in row[name]]
        return sum(values) / len(values) if values else float("nan")

    summary = {name: rate(name, "ok") for name in names}
    summary["fired"] = {name: rate(name, "fired") for name in names}
    for field in ("repeats", "ends", "unedited_ends"):
        summary[field] = {name: rate(name, field) for name in names}
    return summary


def latest_targets(subjects: list[str | None], targets: list[str]) -> list[str]:
    """Each record's subject's newest target: what a lifelong editor should answer once the later
    correction about that subject has won (records without a subject keep their own)."""
    newest = {subject: target for subject, target in zip(subjects, targets) if subject is not None}
    return [newest[subject] if subject is not None else target for subject, target in zip(subjects, targets)]


def rescored(rows: list[dict], targets: list[str]) -> list[dict]:
    """`score`'s per-request rows with each edit probe judged against another target (locality
    probes unchanged)."""
    return [
        {
            name: probe if name.endswith("loc") else {**probe, "ok": answers_with(probe["text"], target)}
            for name, probe in row.items()
        }
        for row, target in zip(rows, targets)
    ]


def contested(subjects: list[str | None], targets: list[str]) -> list[bool]:
    """Whether another of these edits asks about the same subject with a different target.

    ZsRE's split repeats a question about one subject in other words with other targets (its
    first 100 records hold 18 such groups, 46 records): after both edits, at most one answer can be right for
    questions that mean the same, so these records are reported apart as well."""
    answers: dict[str, set[str]] = {}
    for subject, target in zip(subjects, targets):
        if subject is not None:
            answers.setdefault(subject, set()).add(normalised(target))
    return [subject is not None and len(answers[subject]) > 1 for subject in subjects]
