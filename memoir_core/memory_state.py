"""MemoryState: one complete memory (float32 W_m, its masks, its tau) as readers and files see it.

Separate from the engine because the edit trainer builds states, state.py and deltas.py read and
write them, and the engine only publishes them: none of these needs the others to make one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mask_index import MaskIndex
from .memory import MemorySnapshot


@dataclass(frozen=True)
class MemoryState:
    """A complete memory: float32 W_m (never modified in place) and what readers see of it."""

    master: torch.Tensor  # float32 W_m [out, D]
    snapshot: MemorySnapshot
    threshold: float | None = None  # this memory's own tau (calibrated mode), else the engine's
    # float32 [D, D] sum of the stored edits' key second moments on their own columns; kept
    # only while edits are trained with hyper.protect (the editor steers new steps away from them)
    key_moments: torch.Tensor | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The edit key of every stored mask, in storage order (an edit owns one mask per frame, its trained one first)."""
        return self.snapshot.index.keys

    @property
    def edit_keys(self) -> tuple[str, ...]:
        """Each stored edit's key once, in apply order."""
        return self.snapshot.index.edit_keys


def publishable(
    master: torch.Tensor,
    index: MaskIndex,
    applied: int,
    compute_dtype: torch.dtype,
    key_moments: torch.Tensor | None = None,
) -> MemoryState:
    """A state whose readers' copy of W_m is in the projection's compute dtype (shared when fp32)."""
    weight = master if compute_dtype == torch.float32 else master.to(compute_dtype)
    return MemoryState(master, MemorySnapshot(weight, index, applied), key_moments=key_moments)
