"""How much later edits write onto an earlier edit's input: key cross-talk through shared columns.

    python -m bench.crosstalk --out runs/bench/crosstalk.json

An edit's SGD steps on W_m are sums of outer products δ kᵀ restricted to its mask's columns, where
k is a(x) at the positions that predict the target. So edit i's update changes the memory's
output at edit j's key by

    r_ij = <k_i, k_j> over (m_i ∧ m_j)  /  <k_i, k_i> over m_i

times what it changes at its own key. For each of the first --old edits, the script adds up r_ij
over the later edits i ≤ --requests: as a root sum of squares (later edits push in unrelated
output directions) and as a plain sum (they push the same way). Rows: the project's masks; the
same keys centred on the background's token mean; and random masks of the same k, which share
columns only at chance.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import table, write_json, zsre_on_default_model
from bench.retention import off_diagonal, shared_fractions
from memoir_core import MemoirEngine


def target_keys(engine: MemoirEngine, texts: list[str], starts: list[int]) -> torch.Tensor:
    """[N, D] mean of a(x) over positions starts[n]..len-2 of each text, memory off."""
    rows = [engine.tokenizer(t)["input_ids"] for t in texts]
    return engine.window_means(rows, starts, [len(r) - 1 for r in rows]).float().cpu()


def accumulated(keys: torch.Tensor, masks: torch.Tensor, old: int) -> dict:
    on_masks = keys * masks
    own = (on_masks * keys).sum(-1)
    ratio = (on_masks @ on_masks.T) / own[:, None]  # [i, j]: edit i's effect at key j, relative
    others = off_diagonal(ratio)
    later = [ratio[j + 1 :, j] for j in range(old)]
    return {
        "mean_abs_ratio": others.abs().mean().item(),
        "mean_ratio": others.mean().item(),
        "root_sum_squares": torch.stack([r.pow(2).sum().sqrt() for r in later]).mean().item(),
        "sum": torch.stack([r.sum().abs() for r in later]).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="edits in order; the later ones write onto the old")
    parser.add_argument("--old", type=int, default=100, help="the first edits whose cross-talk is summed")
    parser.add_argument("--seed", type=int, default=0, help="for the random masks")
    parser.add_argument("--out")
    args = parser.parse_args()

    engine, requests, background = zsre_on_default_model()
    requests = requests[: args.requests]
    prompts = [r.prompt for r in requests]
    starts = [len(engine.tokenizer(p)["input_ids"]) - 1 for p in prompts]  # predicts the first target token
    keys = target_keys(engine, [f"{r.prompt} {r.target}" for r in requests], starts)
    background_keys = target_keys(engine, background, [0] * len(background))
    masks = engine.prompt_masks(prompts).float().cpu()
    generator = torch.Generator().manual_seed(args.seed)
    scores = torch.rand(masks.shape, generator=generator)
    random_masks = torch.zeros_like(masks).scatter_(1, scores.topk(engine.top_k, dim=1).indices, 1.0)

    rows = {
        "masks": accumulated(keys, masks, args.old),
        "masks, centred keys": accumulated(keys - background_keys.mean(0), masks, args.old),
        "random masks": accumulated(keys, random_masks, args.old),
    }
    shared = {name: shared_fractions(m).mean().item() for name, m in (("masks", masks), ("random masks", random_masks))}
    print(table(["masks", "mean |r|", "mean r", "root sum sq", "|sum|"],
                [[name, r["mean_abs_ratio"], r["mean_ratio"], r["root_sum_squares"], r["sum"]] for name, r in rows.items()]))
    print("mean shared fraction:", shared)
    write_json(args.out, {"model": engine.model_id, "layer": engine.layer, "top_k": engine.top_k,
                          "requests": args.requests, "old": args.old, "shared_fraction": shared, "crosstalk": rows})


if __name__ == "__main__":
    main()
