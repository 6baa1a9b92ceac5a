"""TopHash: a prompt's de-centred mean activation -> a sparse, permuted column mask.

Steps (spec §2): mean of a(x) over the prompt's real tokens, minus the background mean; keep the
k entries of largest magnitude; move them through a fixed seeded permutation. Overlap between two
masks does not depend on the permutation; which columns of W_m an edit trains does.
"""

from __future__ import annotations

import torch


def token_mean(activations: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `window` is true, per row, in float32.

    activations: [B, T, D]; window: [B, T] bool (real prompt tokens only: no padding, no target).
    """
    weights = window.to(torch.float32)
    counts = weights.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a prompt has no tokens inside its feature window")
    summed = torch.einsum("btd,bt->bd", activations.to(torch.float32), weights)
    return summed / counts


TEXT_FORMAT = "text"


class TopHasher:
    """Owns the permutation, k and the background means; all are persisted with the memory.

    One background mean per prompt format: a chat template puts every prompt in the same frame,
    which shifts all activations alike, so chat prompts are de-centred by the mean of chat-framed
    background prompts (spec §2.2: the background must share the edit prompts' formatting).
    """

    def __init__(self, permutation: torch.Tensor, top_k: int, backgrounds: dict[str, torch.Tensor] | torch.Tensor):
        width = permutation.numel()
        if not 0 < top_k <= width:
            raise ValueError(f"top_k must be in 1..{width}, got {top_k}")
        if isinstance(backgrounds, torch.Tensor):
            backgrounds = {TEXT_FORMAT: backgrounds}
        for name, mean in backgrounds.items():
            if mean.shape != (width,):
                raise ValueError(f"background {name!r} has shape {tuple(mean.shape)}, expected ({width},)")
        self.permutation = permutation.to(torch.long)
        self.top_k = top_k
        self.backgrounds = {name: mean.to(torch.float32) for name, mean in backgrounds.items()}

    @staticmethod
    def new_permutation(width: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(width, generator=generator)

    @property
    def width(self) -> int:
        return self.permutation.numel()

    @property
    def background_mean(self) -> torch.Tensor:
        return self.backgrounds[TEXT_FORMAT]

    def with_background(self, format: str, mean: torch.Tensor) -> "TopHasher":
        return TopHasher(self.permutation, self.top_k, {**self.backgrounds, format: mean.to(self.permutation.device)})

    def to(self, device: torch.device | str) -> "TopHasher":
        return TopHasher(
            self.permutation.to(device), self.top_k, {name: m.to(device) for name, m in self.backgrounds.items()}
        )

    def centres(self, formats: list[str] | None, rows: int, device) -> torch.Tensor:
        """[rows, D] background mean per row (all text when formats is None)."""
        if formats is None:
            return self.background_mean.to(device).expand(rows, -1)
        try:
            return torch.stack([self.backgrounds[f] for f in formats]).to(device)
        except KeyError as missing:
            raise ValueError(f"no background mean for prompt format {missing}; known: {sorted(self.backgrounds)}") from None

    def masks(self, prompt_means: torch.Tensor, formats: list[str] | None = None) -> torch.Tensor:
        """[B, D] plain token means -> [B, D] bool masks with exactly k ones per row."""
        centred = prompt_means.to(torch.float32) - self.centres(formats, prompt_means.shape[0], prompt_means.device)
        top = centred.abs().topk(self.top_k, dim=-1).indices
        hashed = self.permutation.to(top.device)[top]
        mask = torch.zeros(centred.shape, dtype=torch.bool, device=centred.device)
        return mask.scatter_(-1, hashed, True)
