"""Running the blocks above the edited one only on the columns the memory reaches.

The memory applies from a row's feature window on (`editor.EditBatch.memory_on`): a chat frame's
rows start with the template's system turn (and a context row with its prefix before it), which
the memory never touches. In every block those columns keep the base model's states at every
training step, so their keys and values are computed once per edit, and each step runs the blocks
only on the columns from `start` on, attending to them as decoding attends to a KV cache. For a
chat frame that is about a third of the columns. The result equals the full pass up to rounding;
`arch_check` tests that on the loaded model before edits rely on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _PrefixCache:
    """Stands in for the blocks' KV cache: records each layer's keys and values on the prefix
    pass, then prepends them to the window's on every later pass without storing anything, so the
    same prefix serves every training step."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = keys, values
            return keys, values
        return torch.cat([self.keys[layer_idx], keys], dim=-2), torch.cat([self.values[layer_idx], values], dim=-2)


def _cache_argument(kwargs: dict) -> str | None:
    """The name under which this transformers version passes the cache to a block."""
    return next((name for name in ("cache", "past_key_values") if name in kwargs), None)


def _columns(value, width: int, queries: slice, keys: slice):
    """A block argument restricted to some query columns: a [B, 1, T, T] attention mask to those
    queries and `keys`, any per-position tensor ([B, T, ...]) to those columns."""
    if isinstance(value, (tuple, list)):
        return type(value)(_columns(v, width, queries, keys) for v in value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 4 and value.shape[-2:] == (width, width):
            return value[..., queries, keys]
        if value.dim() >= 2 and value.shape[1] == width:
            return value[:, queries]
    return value


def causal_mask(attention: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, true where a query may attend (SDPA's convention): earlier or equal
    columns that are real tokens. Used where the model passed none (no padding, `is_causal`),
    which a shorter query than keys cannot use."""
    width = attention.shape[1]
    lower = torch.ones(width, width, dtype=torch.bool, device=attention.device).tril()
    return (lower[None] & attention.bool()[:, None, :])[:, None]


@dataclass
class SplitPass:
    """The blocks above the edited one, run from column `start` on (see the module doc)."""

    start: int
    calls: list[tuple[tuple, dict]]  # per block from the edited one's first upper block: window arguments

    def run(self, blocks: nn.ModuleList, first_block: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T - start, H] the edited block's output on the window columns."""
        for offset, (args, kwargs) in enumerate(self.calls):
            hidden = blocks[first_block + offset](hidden, *args, **kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden


@torch.no_grad()
def split_pass(
    blocks: nn.ModuleList,
    first_block: int,
    calls: list[tuple[tuple, dict]],
    prefix_hidden: torch.Tensor,
    attention: torch.Tensor,
    start: int,
) -> SplitPass | None:
    """Runs blocks first_block.. once on the first `start` columns and keeps their keys and values.
    calls: each block's recorded (args, kwargs) for the whole width, hidden state excluded.
    prefix_hidden: [B, start, H] what enters first_block there (the base model's states).
    attention: [B, T] the batch's padding mask. None where a block takes no cache argument."""
    width = attention.shape[1]
    cache = _PrefixCache()
    window_calls = []
    hidden = prefix_hidden
    for offset, (args, kwargs) in enumerate(calls):
        name = _cache_argument(kwargs)
        if name is None:
            return None
        kwargs = dict(kwargs)
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = causal_mask(attention)
        prefix_args = _columns(args, width, slice(0, start), slice(0, start))
        prefix_kwargs = {k: _columns(v, width, slice(0, start), slice(0, start)) for k, v in kwargs.items()}
        hidden = blocks[first_block + offset](hidden, *prefix_args, **{**prefix_kwargs, name: cache})
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        window_kwargs = {k: _columns(v, width, slice(start, None), slice(None)) for k, v in kwargs.items()}
        window_calls.append((_columns(args, width, slice(start, None), slice(None)), {**window_kwargs, name: cache}))
    cache.recording = False
    return SplitPass(start, window_calls)
