"""Key projector: a learned map of the retrieval key that decides which edit fires (PENME-style).

MEMOIR decides by the overlap of TopHash masks. A prompt about another subject that shares the
edit prompt's relation words (CounterFact's neighbourhood prompts) overlaps above tau, and a
paraphrase in other words can fall below it. The projector is a linear map of the same feature
(the de-centred token mean of a(x) at the edited block, memory off) to a few hundred dimensions,
trained contrastively on edit prompts and their paraphrases against the other records' and the
neighbours; prompts are then matched by cosine. It only routes: the matched edit's TopHash mask
still stores it and applies it, as in the paper.

A projector belongs to one model and layer, named by the engine's `weights_fingerprint` (the
edited block's weights). Shipped ones sit in `memoir_core/data/key_projectors/`; `python -m
memoir_core.key_projector --out FILE` trains one for another model from CounterFact's `dev` split
(bench/router_projector.py measured the lever; docs/free-generation.md has the figures).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

PACKAGED = Path(__file__).parent / "data" / "key_projectors"
# tau = the background prompts' best cosine + this (chosen on dev with bench/router_projector.py)
ROUTER_MARGIN = 0.02
unit = torch.nn.functional.normalize


@dataclass(frozen=True)
class KeyProjector:
    weight: torch.Tensor  # [D, d] float32
    fingerprint: str  # the model and layer it was trained for (MemoirEngine.weights_fingerprint)
    digest: str  # of the weight: what a stored memory's router keys were made with

    def keys(self, centred: torch.Tensor) -> torch.Tensor:
        """[B, D] de-centred means -> [B, d] unit router keys."""
        return unit(centred.to(torch.float32) @ self.weight.to(centred.device), dim=-1)

    def to(self, device: torch.device | str) -> "KeyProjector":
        return KeyProjector(self.weight.to(device), self.fingerprint, self.digest)


def load_projector(path: Path | str) -> KeyProjector:
    weight = load_file(str(path))["weight"].to(torch.float32)
    with safe_open(str(path), framework="pt") as handle:
        fingerprint = handle.metadata()["fingerprint"]
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]
    return KeyProjector(weight, fingerprint, digest)


def save_projector(path: Path | str, weight: torch.Tensor, fingerprint: str, note: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # float16 on disk: 0.8 MB for the default model; loaded back as float32
    save_file({"weight": weight.to(torch.float16).contiguous()}, str(path), {"fingerprint": fingerprint, "note": note})


def packaged_projector(fingerprint: str) -> KeyProjector | None:
    """The shipped projector trained for this model and layer, if there is one."""
    for path in sorted(PACKAGED.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata().get("fingerprint") == fingerprint:
                return load_projector(path)
    return None


def train_projector(
    prompt: torch.Tensor, paraphrase: torch.Tensor, neighbour: torch.Tensor, dim: int = 256, epochs: int = 60, seed: int = 0
) -> torch.Tensor:
    """[D, dim] from de-centred [N, D] means of edit prompts, their paraphrases and their
    neighbours: InfoNCE both ways (prompt -> its paraphrase, paraphrase -> its prompt), against
    the batch's other records and every neighbour in the batch."""
    generator = torch.Generator().manual_seed(seed)
    width = prompt.shape[1]
    weight = torch.nn.Parameter(torch.randn(width, dim, generator=generator) / width**0.5)
    optimiser = torch.optim.Adam([weight], lr=1e-3)
    count, batch, temperature = prompt.shape[0], 256, 0.05
    labels_for = lambda n: torch.arange(n)  # noqa: E731
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for first in range(0, count, batch):
            rows = order[first : first + batch]
            anchors, positives, negatives = (unit(x[rows] @ weight, dim=-1) for x in (prompt, paraphrase, neighbour))
            forward = anchors @ torch.cat([positives, negatives]).T / temperature
            backward = positives @ torch.cat([anchors, negatives]).T / temperature
            labels = labels_for(len(rows))
            loss = torch.nn.functional.cross_entropy(forward, labels) + torch.nn.functional.cross_entropy(backward, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return weight.detach()


def main() -> None:
    from .eval import default_data_file, load_requests
    from .engine import MemoirEngine
    from .models import load_model
    from .presets import model_shape, recommended_config
    from .splits import select

    parser = argparse.ArgumentParser(prog="python -m memoir_core.key_projector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local HF model directory or GGUF file (default: the embedded one)")
    parser.add_argument("--data", type=Path, default=None, help="CounterFact records (default: the shared file)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    engine = MemoirEngine(loaded, recommended_config(model_shape(loaded.model)), context_templates=[])
    records = select(load_requests("counterfact", args.data or default_data_file("counterfact")), "dev", lambda r: r.subject)
    centre = engine.hasher.background_mean.cpu()
    means = [engine.features.prompt_means([getattr(r, f) for r in records]).cpu() - centre
             for f in ("prompt", "rephrase", "loc_prompt")]
    weight = train_projector(*means, dim=args.dim, epochs=args.epochs)
    fingerprint = engine.weights_fingerprint
    save_projector(args.out, weight, fingerprint, f"{engine.model_id}, layer {engine.layer}, CounterFact dev ({len(records)} records)")
    print(f"{args.out}: {tuple(weight.shape)} for {engine.model_id} layer {engine.layer} ({fingerprint})")


if __name__ == "__main__":
    main()
