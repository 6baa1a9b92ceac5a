"""Which key routes a rephrased question to the right edit: poolings, blocks and similarity (dev).

    python -m bench.routing_keys --split dev --edits 100 --out results/routing_keys_dev_t100.json
    python -m bench.routing_keys --split dev --edits 500 --out results/routing_keys_dev_t500.json

Issue 41's first lever: what the key and the mask are made of. A paraphrase gets its edit's answer
only if retrieval picks an edit with its target, so this measures retrieval alone, with nothing
trained (keys and masks are functions of the base model, memory off): the first --edits records
of the split are stored by their edit prompts, and each record's ZsRE paraphrase is matched
against them.

* `own`: the best match is the paraphrase's own edit; `right`: it carries the paraphrase's target
  (its own, or a record of the same subject with the same target); `same_subject`: it is about
  the paraphrase's subject (a miss that is not is a routing error no data conflict explains);
* `fire`: the best match clears a threshold set just above the background prompts' best match
  (mask overlap + 0.05, cosine + 0.02, as calibration does); `loc_fire`: how often the locality
  questions clear it too.

Keys: at the edited block, the token mean of a(x) over the whole prompt (MEMOIR's, the default),
without its first token, over its last half (HoReN's), last third, last four tokens or last token,
without the subject's tokens, and the mean and subject-free keys averaged; each cut to a TopHash
mask and matched by overlap (what the engine does), and as a de-centred dense vector matched by
cosine (a router beside the masks). Then cosine keys from other blocks and from several at once.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import table, write_json, zsre_on_default_model
from bench.rephrase_retrieval import all_layer_means
from memoir_core.arch import arch_spec, blocks
from memoir_core.hooks import thread_hooks
from memoir_core.splits import select, subject_key
from memoir_core.tokens import left_pad
from memoir_core.tophash import TopHasher

POOLINGS = ("mean", "skip_first", "last_half", "last_third", "last4", "last", "no_subject")
BLOCK_SETS = {"24-26": [24, 25, 26], "0,8,16,25": [0, 8, 16, 25], "all": None}
MASK_MARGIN, COSINE_MARGIN = 0.05, 0.02
unit = torch.nn.functional.normalize


def subject_tokens(tokenizer, text: str, subject: str | None) -> tuple[list[int], torch.Tensor]:
    """A text's ids and which of them overlap the subject's first occurrence (case ignored)."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    flags = [False] * len(encoded["input_ids"])
    start = text.lower().find(subject.lower()) if subject else -1
    if start >= 0:
        stop = start + len(subject)
        flags = [s < stop and e > start for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], torch.tensor(flags, dtype=torch.bool)


@torch.no_grad()
def token_activations(engine, texts: list[str], subjects: list[str | None], batch_size: int = 16):
    """Per text: [n, D] a(x) at the edited block's projection (memory off) and its subject flags."""
    projection = blocks(engine.model)[engine.layer].get_submodule(arch_spec(engine.model).projection)
    rows = []
    for first in range(0, len(texts), batch_size):
        part = slice(first, first + batch_size)
        encoded = [subject_tokens(engine.tokenizer, t, s) for t, s in zip(texts[part], subjects[part])]
        batch = left_pad([ids for ids, _ in encoded], engine.tokenizer.pad_token_id, engine.device)
        captured = {}
        with thread_hooks(pre=[(projection, lambda m, args, kwargs: captured.__setitem__("a", args[0]))]):
            engine.model(**batch.model_inputs(), use_cache=False)
        width = captured["a"].shape[1]
        rows += [(captured["a"][i, width - len(ids) :].clone(), flags) for i, (ids, flags) in enumerate(encoded)]
    return rows


def pooled(rows, how: str) -> torch.Tensor:
    def one(a: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        part = {
            "mean": a,
            "skip_first": a[1:] if n > 1 else a,
            "last_half": a[n // 2 :],
            "last_third": a[(2 * n) // 3 :],
            "last4": a[-4:],
            "last": a[-1:],
            "no_subject": a[~subject] if (~subject).any() else a,
        }[how]
        return part.mean(dim=0)

    return torch.stack([one(a, s) for a, s in rows])


def scores(paraphrase: torch.Tensor, loc: torch.Tensor, background: torch.Tensor, margin: float, records) -> dict:
    """From [N, T] similarities of paraphrases, locality and background prompts to the stored keys."""
    tau = background.max().item() + margin
    best = paraphrase.argmax(dim=1).tolist()
    subject = [subject_key(r.subject or r.prompt) for r in records]
    return {
        "own": sum(j == i for i, j in enumerate(best)) / len(best),
        "right": sum(records[j].target == records[i].target for i, j in enumerate(best)) / len(best),
        "same_subject": sum(subject[j] == subject[i] for i, j in enumerate(best)) / len(best),
        "fire": (paraphrase.max(dim=1).values >= tau).float().mean().item(),
        "loc_fire": (loc.max(dim=1).values >= tau).float().mean().item(),
        "tau": round(tau, 3),
    }


def pooling_rows(engine, records, background: list[str]) -> list[dict]:
    subjects = [r.subject for r in records]
    acts = {
        "prompt": token_activations(engine, [r.prompt for r in records], subjects),
        "paraphrase": token_activations(engine, [r.rephrase for r in records], subjects),
        "loc": token_activations(engine, [r.loc_prompt for r in records], [None] * len(records)),
        "background": token_activations(engine, background, [None] * len(background)),
    }
    rows, similarities = [], {}
    for how in POOLINGS:
        means = {name: pooled(a, how) for name, a in acts.items()}
        centre = means["background"].mean(dim=0)
        hasher = TopHasher(engine.hasher.permutation, engine.top_k, centre)
        masks = {name: hasher.masks(m).float() for name, m in means.items()}
        dense = {name: unit(m - centre, dim=-1) for name, m in means.items()}
        for kind, keys, scale, margin in (("mask", masks, engine.top_k, MASK_MARGIN), ("cosine", dense, 1, COSINE_MARGIN)):
            sims = [keys[n] @ keys["prompt"].T / scale for n in ("paraphrase", "loc", "background")]
            similarities[(kind, how)] = sims
            rows.append({"key": f"block {engine.layer}, {how}", "match": kind, **scores(*sims, margin, records)})
    for kind, margin in (("mask", MASK_MARGIN), ("cosine", COSINE_MARGIN)):
        both = [(a + b) / 2 for a, b in zip(similarities[(kind, "mean")], similarities[(kind, "no_subject")])]
        rows.append({"key": f"block {engine.layer}, mean + no_subject", "match": kind, **scores(*both, margin, records)})
    return rows


def block_rows(engine, records, background: list[str]) -> list[dict]:
    means = {
        "prompt": all_layer_means(engine, [r.prompt for r in records]),
        "paraphrase": all_layer_means(engine, [r.rephrase for r in records]),
        "loc": all_layer_means(engine, [r.loc_prompt for r in records]),
        "background": all_layer_means(engine, background),
    }
    count = means["prompt"].shape[1]
    sets = {f"{i}": [i] for i in sorted({0, count // 4, count // 2, engine.layer - 1, engine.layer, engine.layer + 1})}
    sets.update({name: layers or list(range(count)) for name, layers in BLOCK_SETS.items()})
    rows = []
    for name, layers in sets.items():
        centre = means["background"][:, layers].mean(dim=0)
        keys = {n: unit(unit(m[:, layers] - centre, dim=-1).flatten(1), dim=-1) for n, m in means.items()}
        sims = [keys[n] @ keys["prompt"].T for n in ("paraphrase", "loc", "background")]
        rows.append({"key": f"blocks {name}, mean", "match": "cosine", **scores(*sims, COSINE_MARGIN, records)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.routing_keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("dev", "test", "all"), default="dev")
    parser.add_argument("--edits", type=int, default=100, help="records stored (T)")
    parser.add_argument("--out")
    args = parser.parse_args()
    engine, requests, background = zsre_on_default_model()
    records = select(requests, args.split, lambda r: r.subject or r.prompt)[: args.edits]
    rows = pooling_rows(engine, records, background) + block_rows(engine, records, background)
    print(table(["key", "match", "own", "right", "same subject", "fire", "loc fire"],
                [[r["key"], r["match"], r["own"], r["right"], r["same_subject"], r["fire"], r["loc_fire"]] for r in rows]))
    write_json(args.out, {"model": engine.model_id, "split": args.split, "edits": len(records), "layer": engine.layer,
                          "top_k": engine.top_k, "rows": rows})


if __name__ == "__main__":
    main()
