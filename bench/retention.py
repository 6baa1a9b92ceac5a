"""Why old edits fade: how much ZsRE masks share, and what shrinking the memory costs.

    python -m bench.retention --out runs/bench/retention.json

Two measurements on the default model with its preset, the first ZsRE requests and the
evaluation's background prompts:

* mask sharing: for several k, the mean fraction of its columns that a mask shares with another
  request's mask (chance is k/D), and how many masks the most used columns appear in;
* shrinking: apply the first --edits edits, then score them with W_m scaled by each factor in
  --scales (0.74 is what the paper's decay on all of W_m leaves of the oldest of 1000 edits).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import table, write_json, zsre_on_default_model
from memoir_core import MemoirEngine
from memoir_core.eval import Evaluation
from memoir_core.tophash import TopHasher


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    return matrix[~torch.eye(len(matrix), dtype=torch.bool, device=matrix.device)]


def shared_fractions(masks: torch.Tensor) -> torch.Tensor:
    """Fraction of its columns that each 0/1 mask shares with each other one, [N * (N - 1)]."""
    masks = masks.float()
    return off_diagonal(masks @ masks.T / masks[0].sum())


def mask_sharing(engine: MemoirEngine, prompts: list[str], top_ks: list[int]) -> list[dict]:
    means = engine.prompt_means(prompts)
    rows = []
    for k in top_ks:
        hasher = TopHasher(engine.hasher.permutation, k, engine.hasher.backgrounds).to(means.device)
        masks = hasher.masks(means).float()
        others = shared_fractions(masks)
        usage = masks.sum(0).sort(descending=True).values
        rows.append(
            {
                "k": k,
                "mean_shared_fraction": others.mean().item(),
                "chance": k / masks.shape[1],
                "top_column_usage": usage[:5].tolist(),
                "masks": len(masks),
            }
        )
    return rows


def shrinking(engine: MemoirEngine, requests, scales: list[float], tau: float) -> list[dict]:
    evaluation = Evaluation(engine, "zsre", requests, batch_size=16)
    evaluation.pre_pass()
    for request in requests:
        engine.edit(request.prompt, request.target)
    trained = engine.state
    rows = []
    for scale in scales:
        engine.publish(engine.memory_state(trained.master * scale, trained.snapshot.index, trained.snapshot.applied))
        evaluation.post_pass(len(requests))
        summary = evaluation.metrics(len(requests), tau)["summary"]
        rows.append({"scale": scale, "rel": summary["rel"], "gen": summary["gen"], "loc": summary["loc"]})
    engine.publish(trained)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests whose masks are compared")
    parser.add_argument("--top-ks", default="32,48,77,128,256,439")
    parser.add_argument("--edits", type=int, default=100, help="edits applied before shrinking; 0 skips it")
    parser.add_argument("--scales", default="1.0,0.9,0.8,0.74")
    parser.add_argument("--tau", type=float, default=0.388, help="the calibrated tau of the evaluation at T = 300-1000")
    parser.add_argument("--out")
    args = parser.parse_args()

    engine, requests, _ = zsre_on_default_model()

    sharing = mask_sharing(engine, [r.prompt for r in requests[: args.requests]], [int(k) for k in args.top_ks.split(",")])
    print(table(["k", "shared", "chance", "top column usage"],
                [[r["k"], r["mean_shared_fraction"], r["chance"], r["top_column_usage"]] for r in sharing]))
    shrunk = []
    if args.edits:
        shrunk = shrinking(engine, requests[: args.edits], [float(s) for s in args.scales.split(",")], args.tau)
        print(table(["W_m scale", "Rel", "Gen", "Loc"], [[r["scale"], r["rel"], r["gen"], r["loc"]] for r in shrunk]))
    write_json(args.out, {"model": engine.model_id, "top_k": engine.top_k,
                          "decay": engine.config.hyper.decay,
                          "mask_sharing": sharing, "shrinking": shrunk, "edits": args.edits, "tau": args.tau})


if __name__ == "__main__":
    main()
