"""Left-padded batches with correct position ids.

Left padding keeps every sequence's last token in the last column (what generation needs). Plain
forward calls would number positions from the first column, padding included; that shifts
absolute position embeddings (GPT-2, GPT-J) and changes numerics, so positions count real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens
    position_ids: torch.Tensor  # [B, T]
    lengths: list[int]  # real tokens per row

    @property
    def pad_widths(self) -> list[int]:
        return [self.input_ids.shape[1] - n for n in self.lengths]

    def window(self, starts: list[int], stops: list[int]) -> torch.Tensor:
        """[B, T] bool: per row, real-token positions start..stop-1 (indices into the unpadded row)."""
        width = self.input_ids.shape[1]
        columns = torch.arange(width)
        pads = torch.tensor(self.pad_widths)
        lo = (pads + torch.tensor(starts))[:, None]
        hi = (pads + torch.tensor(stops))[:, None]
        return ((columns >= lo) & (columns < hi)).to(self.input_ids.device)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> PaddedBatch:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("cannot batch an empty sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), positions.to(device), [len(s) for s in sequences])
