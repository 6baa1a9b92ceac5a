"""Why generalisation stops near 0.7 on the default model: rephrases that find another edit's mask.

    python -m bench.rephrase_retrieval --scores results/zsre_t1000.json --out runs/bench/rephrase_retrieval.json

A rephrase gets its edit's answer only if its best-matching stored mask is that edit's own: the
memory then applies the columns trained for it (spec §6). With the first --requests ZsRE edit
prompts stored, this measures, for every block of the default model, how often a rephrase's
nearest stored prompt is its own edit's:

* by mask overlap at the preset's k/D (what MEMOIR retrieves with), and
* by cosine of the de-centred token means (the dense features the masks are cut from), to see
  whether the top-k cut is what loses the paraphrases.

At the preset's layer it also sweeps k, and with --scores (an evaluation JSON at T = --requests)
it splits that run's generalisation by whether the rephrase's nearest mask was its own.
Nothing is trained: masks are a deterministic function of the base model, so they are the ones
the evaluation stored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import table, write_json, zsre_on_default_model
from memoir_core import MemoirEngine
from memoir_core.arch import arch_spec, blocks
from memoir_core.hooks import thread_hooks
from memoir_core.tokens import left_pad
from memoir_core.tophash import TopHasher, token_mean


@torch.no_grad()
def all_layer_means(engine: MemoirEngine, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """[N, L, D] token means of every block's projection input over each whole prompt (memory off)."""
    projections = [block.get_submodule(arch_spec(engine.model).projection) for block in blocks(engine.model)]
    means = []
    for first in range(0, len(prompts), batch_size):
        batch = left_pad([engine.encode(p)[0] for p in prompts[first : first + batch_size]],
                         engine.tokenizer.pad_token_id, engine.device)
        window = batch.attention_mask.bool()
        captured: dict[int, torch.Tensor] = {}

        def capture(layer):
            return lambda module, args, kwargs: captured.__setitem__(layer, token_mean(args[0], window))

        with thread_hooks(pre=[(p, capture(i)) for i, p in enumerate(projections)]):
            engine.model(**batch.model_inputs(), use_cache=False)
        means.append(torch.stack([captured[i] for i in range(len(projections))], dim=1))
    return torch.cat(means)


def nearest_is_own(similarity: torch.Tensor) -> torch.Tensor:
    """[N] bool: row i's most similar stored item is item i (ties go to the first, as MaskIndex)."""
    return similarity.argmax(dim=1) == torch.arange(similarity.shape[0])


def own_by_mask(engine: MemoirEngine, prompts: torch.Tensor, rephrases: torch.Tensor, background: torch.Tensor,
                k: int) -> torch.Tensor:
    """[N] bool for one block's [N, D] means: the rephrase's best-overlapping TopHash mask is its own
    prompt's (the engine's permutation; the block's own background mean)."""
    hasher = TopHasher(engine.hasher.permutation, k, background.mean(dim=0))
    return nearest_is_own(hasher.masks(rephrases).float() @ hasher.masks(prompts).float().T)


def own_by_cosine(prompts: torch.Tensor, rephrases: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize
    centre = background.mean(dim=0)
    return nearest_is_own(unit(rephrases - centre, dim=-1) @ unit(prompts - centre, dim=-1).T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="ZsRE edits stored (T)")
    parser.add_argument("--top-ks", default="32,77,128,256,439", help="k values swept at the preset's layer")
    parser.add_argument("--scores", help="evaluation JSON at T = --requests whose generalisation is split")
    parser.add_argument("--out")
    args = parser.parse_args()

    engine, requests, background_prompts = zsre_on_default_model()
    requests = requests[: args.requests]

    prompts = all_layer_means(engine, [r.prompt for r in requests])
    rephrases = all_layer_means(engine, [r.rephrase for r in requests])
    background = all_layer_means(engine, background_prompts)
    # the preset's k / D at every block (all blocks of one model share D)
    own = [own_by_mask(engine, prompts[:, i], rephrases[:, i], background[:, i], engine.top_k) for i in range(prompts.shape[1])]
    by_layer = [
        {"layer": i, "mask": own[i].float().mean().item(),
         "cosine": own_by_cosine(prompts[:, i], rephrases[:, i], background[:, i]).float().mean().item()}
        for i in range(prompts.shape[1])
    ]
    print(table(["layer", f"own by mask (k {engine.top_k})", "own by cosine"],
                [[r["layer"], r["mask"], r["cosine"]] for r in by_layer]))

    at = engine.layer
    by_k = [{"k": k, "mask": own_by_mask(engine, prompts[:, at], rephrases[:, at], background[:, at], k).float().mean().item()}
            for k in (int(k) for k in args.top_ks.split(","))]
    print(table(["k", f"own by mask (layer {at})"], [[r["k"], r["mask"]] for r in by_k]))

    split = None
    if args.scores:
        scored = json.loads(Path(args.scores).read_text(encoding="utf-8"))
        if scored["edits"] != args.requests or scored["top_k"] != engine.top_k or scored["layer"] != at:
            raise SystemExit(f"{args.scores} is not a T = {args.requests}, layer {at}, k {engine.top_k} run")
        gen = torch.tensor([r["gen"] for r in scored["requests"]])
        own_at = own[at]  # the masks the evaluation stored and matched: its layer, k and background
        split = {
            "own_fraction": own_at.float().mean().item(),
            "gen_when_own": gen[own_at].mean().item(),
            "gen_otherwise": gen[~own_at].mean().item(),
            "gen": gen.mean().item(),
        }
        print(table(["rephrases whose nearest mask is own", "Gen then", "Gen otherwise", "Gen"],
                    [[split["own_fraction"], split["gen_when_own"], split["gen_otherwise"], split["gen"]]]))
    write_json(args.out, {"model": engine.model_id, "requests": args.requests, "layer": at, "top_k": engine.top_k,
                          "by_layer": by_layer, "by_k": by_k, "gen_split": split, "scores": args.scores})


if __name__ == "__main__":
    main()
