"""How much later edits write onto an earlier edit's input: key cross-talk through shared columns.

    python -m bench.crosstalk --out runs/bench/crosstalk.json

An edit's SGD steps on W_m are sums of outer products δ kᵀ restricted to its mask's columns, where
k is a(x) at the positions that predict the target. So edit i's update changes the memory's
output at edit j's key by

    r_ij = <k_i, k_j> over (m_i ∧ m_j)  /  <k_i, k_i> over m_i

times what it changes at its own key. For each of the first --old edits, the script adds up r_ij
over the later edits i ≤ --requests: as a root sum of squares (later edits push in unrelated
output directions) and as a plain sum (they push the same way). Rows: the project's masks; the
same keys centred on the background's token mean; random masks of the same k, which share
columns only at chance; and the project's masks with each update steered away from the stored
keys as `EditHyperParams(protect=α)` does (`protecting_map`; here each stored edit is one key,
the engine stores the second moment over the target positions). For each row, "paraphrase
reach" is what an update changes at its own paraphrase's key relative to its own key (mean over
edits), which is what generalisation needs to survive the steering.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import table, write_json, zsre_on_default_model
from bench.retention import off_diagonal, shared_fractions
from memoir_core import MemoirEngine
from memoir_core.editor import protecting_map


def target_keys(engine: MemoirEngine, texts: list[str], starts: list[int]) -> torch.Tensor:
    """[N, D] mean of a(x) over positions starts[n]..len-2 of each text, memory off."""
    rows = [engine.tokenizer(t)["input_ids"] for t in texts]
    return engine.window_means(rows, starts, [len(r) - 1 for r in rows]).float().cpu()


def protected_updates(keys: torch.Tensor, masks: torch.Tensor, ridge: float) -> torch.Tensor:
    """[N, D] each edit's update direction on its columns, steered away from the keys of the edits
    stored before it."""
    stored = torch.zeros(keys.shape[1], keys.shape[1])
    updates = torch.zeros_like(keys)
    for i in range(len(keys)):
        columns = masks[i].nonzero().flatten()
        key = keys[i, columns]
        steer = protecting_map(torch.outer(key, key), stored[columns[:, None], columns], ridge)
        updates[i, columns] = steer @ key
        on_mask = keys[i] * masks[i]
        stored += torch.outer(on_mask, on_mask)
    return updates


def accumulated(
    keys: torch.Tensor, masks: torch.Tensor, old: int, paraphrase_keys: torch.Tensor, updates: torch.Tensor | None = None
) -> dict:
    """updates: each edit's update direction (default: its key on its mask, the plain gradient's)."""
    on_masks = keys * masks
    updates = on_masks if updates is None else updates
    own = (updates * keys).sum(-1)
    ratio = (updates @ on_masks.T) / own[:, None]  # [i, j]: edit i's effect at key j, relative
    others = off_diagonal(ratio)
    later = [ratio[j + 1 :, j] for j in range(old)]
    return {
        "mean_abs_ratio": others.abs().mean().item(),
        "mean_ratio": others.mean().item(),
        "root_sum_squares": torch.stack([r.pow(2).sum().sqrt() for r in later]).mean().item(),
        "sum": torch.stack([r.sum().abs() for r in later]).mean().item(),
        "paraphrase_reach": ((updates * paraphrase_keys).sum(-1) / own).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="edits in order; the later ones write onto the old")
    parser.add_argument("--old", type=int, default=100, help="the first edits whose cross-talk is summed")
    parser.add_argument("--seed", type=int, default=0, help="for the random masks")
    parser.add_argument("--protect", default="1,0.1,0.01", help="ridge factors for the steered rows")
    parser.add_argument("--out")
    args = parser.parse_args()

    engine, requests, background = zsre_on_default_model()
    requests = requests[: args.requests]
    prompts = [r.prompt for r in requests]
    starts = [len(engine.tokenizer(p)["input_ids"]) - 1 for p in prompts]  # predicts the first target token
    keys = target_keys(engine, [f"{r.prompt} {r.target}" for r in requests], starts)
    paraphrase_starts = [len(engine.tokenizer(r.rephrase)["input_ids"]) - 1 for r in requests]
    paraphrase_keys = target_keys(engine, [f"{r.rephrase} {r.target}" for r in requests], paraphrase_starts)
    background_keys = target_keys(engine, background, [0] * len(background))
    masks = engine.prompt_masks(prompts).float().cpu()
    generator = torch.Generator().manual_seed(args.seed)
    scores = torch.rand(masks.shape, generator=generator)
    random_masks = torch.zeros_like(masks).scatter_(1, scores.topk(engine.top_k, dim=1).indices, 1.0)

    centred = background_keys.mean(0)
    rows = {
        "masks": accumulated(keys, masks, args.old, paraphrase_keys),
        "masks, centred keys": accumulated(keys - centred, masks, args.old, paraphrase_keys - centred),
        "random masks": accumulated(keys, random_masks, args.old, paraphrase_keys),
    }
    for ridge in map(float, args.protect.split(",")):
        updates = protected_updates(keys, masks, ridge)
        rows[f"masks, protect {ridge:g}"] = accumulated(keys, masks, args.old, paraphrase_keys, updates)
    shared = {name: shared_fractions(m).mean().item() for name, m in (("masks", masks), ("random masks", random_masks))}
    print(table(["masks", "mean |r|", "mean r", "root sum sq", "|sum|", "paraphrase reach"],
                [[name, r["mean_abs_ratio"], r["mean_ratio"], r["root_sum_squares"], r["sum"], r["paraphrase_reach"]]
                 for name, r in rows.items()]))
    print("mean shared fraction:", shared)
    write_json(args.out, {"model": engine.model_id, "layer": engine.layer, "top_k": engine.top_k,
                          "requests": args.requests, "old": args.old, "shared_fraction": shared, "crosstalk": rows})


if __name__ == "__main__":
    main()
