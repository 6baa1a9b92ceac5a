"""A learned key projector as the router (PENME-style), measured on retrieval alone (dev).

    python -m bench.router_projector --out results/router_projector_dev.json

Issue 41's routing lever for neighbours: CounterFact's neighbourhood prompt (the same relation
about another subject) shares most of its words with the edit prompt, so its TopHash mask overlaps
the edit's above τ and the memory fires. PENME trains a small projection of the key with
paraphrases as positives and lexically close prompts as negatives. Here: a linear map of the
block's de-centred token mean of a(x) (the engine's key, memory off) to 256 dimensions, trained
with InfoNCE on CounterFact `dev` records of one part of its subjects (edit prompt → its
paraphrase, against the batch's other paraphrases and every neighbour), then used as a cosine
router on the rest of `dev` and on ZsRE `dev` (another data set: does it transfer?).

Scores as bench.routing_keys: `own` (the best stored key is the query's own edit), `fire` (it
clears a threshold set just over the background prompts' best match) and `loc_fire` (the
locality probe clears it too: on CounterFact the neighbour, on ZsRE an unrelated question). The
gate row fires only when both the engine's mask and the projector clear their thresholds.
Nothing here reaches `test`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
import time

import torch

from bench.common import table, write_json, zsre_on_default_model
from bench.routing_keys import COSINE_MARGIN, MASK_MARGIN, pooled, token_activations, unit
from memoir_core.eval import default_data_file, load_requests
from memoir_core.key_projector import train_projector
from memoir_core.splits import select, subject_key
from memoir_core.tophash import TopHasher



def mean_keys(engine, texts: list[str], cache: Path | None) -> torch.Tensor:
    if cache is not None and cache.exists():
        return torch.load(cache)
    keys = pooled(token_activations(engine, texts, [None] * len(texts)), "mean")
    if cache is not None:
        torch.save(keys, cache)
    return keys


def held_out(subject: str) -> bool:
    """A second, independent cut of dev's subjects: one in five is kept out of the training."""
    return hashlib.sha256(("projector/" + subject_key(subject)).encode()).digest()[0] % 5 == 0


def train_mask_weights(prompt, paraphrase, neighbour, epochs: int, seed: int = 0) -> torch.Tensor:
    """One weight per mask column (softplus, so never negative): a weighted overlap of the
    engine's own masks, which states already keep. The same loss as the projector."""
    torch.manual_seed(seed)
    raw = torch.nn.Parameter(torch.zeros(prompt.shape[1]))
    optimiser = torch.optim.Adam([raw], lr=1e-2)
    n, batch, temperature = prompt.shape[0], 256, 0.05

    def overlap(q, s):
        w = torch.nn.functional.softplus(raw) / torch.nn.functional.softplus(torch.zeros(()))
        return (q * w) @ s.T / (s * w).sum(dim=1)

    for epoch in range(epochs):
        order = torch.randperm(n)
        for first in range(0, n, batch):
            rows = order[first : first + batch]
            logits = overlap(paraphrase[rows], torch.cat([prompt[rows], neighbour[rows]]).float()) / temperature
            loc = overlap(neighbour[rows], torch.cat([prompt[rows], paraphrase[rows]])) / temperature
            labels = torch.arange(len(rows))
            loss = torch.nn.functional.cross_entropy(logits, labels)
            # neighbours must fall below paraphrases on the same stored mask
            loss = loss + torch.nn.functional.softplus(loc.diagonal() - logits.diagonal()).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return torch.nn.functional.softplus(raw.detach()) / torch.nn.functional.softplus(torch.zeros(()))


def scores(query: torch.Tensor, loc: torch.Tensor, background: torch.Tensor, margin: float) -> dict:
    tau = background.max().item() + margin
    best = query.argmax(dim=1)
    return {
        "own": (best == torch.arange(len(best))).float().mean().item(),
        "fire": (query.max(dim=1).values >= tau).float().mean().item(),
        "own_and_fire": ((best == torch.arange(len(best))) & (query.max(dim=1).values >= tau)).float().mean().item(),
        "loc_fire": (loc.max(dim=1).values >= tau).float().mean().item(),
        "tau": round(tau, 3),
    }


def routers(engine, keys: dict[str, torch.Tensor], centre, weight, count: int, column_weight=None) -> list[dict]:
    """keys: prompt / query / loc / background means; the first `count` prompts are stored."""
    stored = {name: k if name != "prompt" else k[:count] for name, k in keys.items()}
    stored["query"], stored["loc"] = stored["query"][:count], stored["loc"][:count]
    hasher = TopHasher(engine.hasher.permutation, engine.top_k, centre)
    masks = {n: hasher.masks(k).float() for n, k in stored.items()}
    dense = {n: unit(k - centre, dim=-1) for n, k in stored.items()}
    projected = {n: unit((k - centre) @ weight, dim=-1) for n, k in stored.items()}
    rows, sims = [], {}
    for name, keys_, scale, margin in (
        ("mask (the engine's)", masks, engine.top_k, MASK_MARGIN),
        ("cosine of the mean", dense, 1, COSINE_MARGIN),
        ("projector cosine", projected, 1, COSINE_MARGIN),
    ):
        sims[name] = [keys_[n] @ keys_["prompt"].T / scale for n in ("query", "loc", "background")]
        rows.append({"router": name, **scores(*sims[name], margin)})
    if column_weight is not None:
        sized = (masks["prompt"] * column_weight).sum(dim=1)
        weighted = [(masks[n] * column_weight) @ masks["prompt"].T / sized for n in ("query", "loc", "background")]
        rows.append({"router": "mask, weighted columns", **scores(*weighted, MASK_MARGIN)})
    # the gate: the mask picks and must clear τ; the projector must also clear its own threshold
    mask_q, mask_l, mask_b = sims["mask (the engine's)"]
    proj_q, proj_l, proj_b = sims["projector cosine"]
    tau_m, tau_p = mask_b.max().item() + MASK_MARGIN, proj_b.max().item() + COSINE_MARGIN

    def gated(mask, proj):
        best = mask.argmax(dim=1)
        return (mask.max(dim=1).values >= tau_m) & (proj.gather(1, best[:, None])[:, 0] >= tau_p), best

    fire_q, best_q = gated(mask_q, proj_q)
    fire_l, _ = gated(mask_l, proj_l)
    rows.append({"router": "mask, gated by the projector", "own": (best_q == torch.arange(count)).float().mean().item(),
                 "fire": fire_q.float().mean().item(),
                 "own_and_fire": (fire_q & (best_q == torch.arange(count))).float().mean().item(),
                 "loc_fire": fire_l.float().mean().item(), "tau": round(tau_p, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.router_projector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--cache", default="/tmp/router_projector", help="directory for the computed keys")
    parser.add_argument("--out")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    engine, zsre, background = zsre_on_default_model()
    started = time.time()
    counterfact = select(load_requests("counterfact", default_data_file("counterfact")), "dev", lambda r: r.subject)
    train = [r for r in counterfact if not held_out(r.subject)]
    val = [r for r in counterfact if held_out(r.subject)]
    zsre_dev = select(zsre, "dev", lambda r: r.subject or r.prompt)
    keys = {}
    for name, records in (("cf_train", train), ("cf_val", val), ("zsre_dev", zsre_dev)):
        keys[name] = {probe: mean_keys(engine, [getattr(r, field) for r in records], cache / f"{name}_{probe}.pt")
                      for probe, field in (("prompt", "prompt"), ("query", "rephrase"), ("loc", "loc_prompt"))}
        print(f"{name}: {len(records)} records keyed, {time.time() - started:.0f} s", flush=True)
    background_keys = mean_keys(engine, background, cache / "background.pt")
    centre = background_keys.mean(dim=0)
    weight = train_projector(*(keys["cf_train"][p] - centre for p in ("prompt", "query", "loc")), args.dim, args.epochs)
    hasher = TopHasher(engine.hasher.permutation, engine.top_k, centre)
    train_masks = {p: hasher.masks(keys["cf_train"][p]).float() for p in ("prompt", "query", "loc")}
    column_weight = train_mask_weights(train_masks["prompt"], train_masks["query"], train_masks["loc"], args.epochs)
    rows = []
    for name in ("cf_val", "zsre_dev"):
        for count in args.counts:
            count = min(count, keys[name]["prompt"].shape[0])
            for row in routers(engine, {**keys[name], "background": background_keys}, centre, weight, count, column_weight):
                rows.append({"set": name, "T": count, **row})
    print(table(["set", "T", "router", "own", "fire", "own and fire", "loc fire"],
                [[r["set"], r["T"], r["router"], r["own"], r["fire"], r["own_and_fire"], r["loc_fire"]] for r in rows]))
    write_json(args.out, {"model": engine.model_id, "layer": engine.layer, "dim": args.dim, "epochs": args.epochs,
                          "train_records": len(train), "val_records": len(val), "rows": rows})


if __name__ == "__main__":
    main()
