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


class TopHasher:
    """Owns the permutation, k and the background mean; all three are persisted with the memory."""

    def __init__(self, permutation: torch.Tensor, top_k: int, background_mean: torch.Tensor):
        width = permutation.numel()
        if not 0 < top_k <= width:
            raise ValueError(f"top_k must be in 1..{width}, got {top_k}")
        if background_mean.shape != (width,):
            raise ValueError(f"background mean has shape {tuple(background_mean.shape)}, expected ({width},)")
        self.permutation = permutation.to(torch.long)
        self.top_k = top_k
        self.background_mean = background_mean.to(torch.float32)

    @staticmethod
    def new_permutation(width: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(width, generator=generator)

    @property
    def width(self) -> int:
        return self.permutation.numel()

    def to(self, device: torch.device | str) -> "TopHasher":
        return TopHasher(self.permutation.to(device), self.top_k, self.background_mean.to(device))

    def masks(self, prompt_means: torch.Tensor) -> torch.Tensor:
        """[B, D] plain token means -> [B, D] bool masks with exactly k ones per row."""
        centred = prompt_means.to(torch.float32) - self.background_mean.to(prompt_means.device)
        top = centred.abs().topk(self.top_k, dim=-1).indices
        hashed = self.permutation.to(top.device)[top]
        mask = torch.zeros(centred.shape, dtype=torch.bool, device=centred.device)
        return mask.scatter_(-1, hashed, True)
