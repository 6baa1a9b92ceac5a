"""The residual memory beside one FFN output projection.

`ResidualMemory` replaces the projection module in the model. Its forward is the frozen projection
plus whatever the current *plan* adds. A plan is set per call through a context variable, so
concurrent threads (a training edit and a serving request) each see their own plan and never
share mutable state inside the model:

* no plan              -> the frozen projection, bit for bit (memory off);
* `CaptureMeans`       -> records per-row token means of the input activation a(x);
* `TrainColumns`       -> y + W_sub (a[:, cols]), the k trainable columns of one edit (fast path);
* `TrainDense`         -> y + W_m (m * a), the straightforward formulation (reference path);
* `Routing`            -> decides per sequence at the first (prefill) call and then applies the
                          matched edit's stored mask at every later call (decode steps).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from .mask_index import Match, MaskIndex
from .tophash import TopHasher, token_mean


class Plan(Protocol):
    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor: ...


class ResidualMemory(nn.Module):
    def __init__(self, projection: nn.Module):
        super().__init__()
        self.projection = projection
        self._plan: ContextVar[Plan | None] = ContextVar(f"memoir_plan_{id(self)}", default=None)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        output = self.projection(activations)
        plan = self._plan.get()
        return output if plan is None else plan(activations, output)

    @contextmanager
    def using(self, plan: Plan | None) -> Iterator[Plan | None]:
        token = self._plan.set(plan)
        try:
            yield plan
        finally:
            self._plan.reset(token)


class CaptureMeans:
    """Records the token mean of a(x) over a window; the output is left untouched."""

    def __init__(self, window: torch.Tensor):
        self.window = window
        self.means: torch.Tensor | None = None

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            self.means = token_mean(activations, self.window.to(activations.device))
        return output


def _add_memory(output: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    delta = inputs.to(weight.dtype) @ weight.T
    return output + delta.to(output.dtype)


def columns_from(first: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: true from each row's column `first` [B] on (where the memory applies)."""
    return torch.arange(width, device=first.device)[None, :] >= first[:, None]


def from_positions(activations: torch.Tensor, memory_on: torch.Tensor | None) -> torch.Tensor:
    """a(x) with the positions where the memory is off ([B, T] bool false) zeroed, so that they
    get no contribution; all of it where memory_on is None."""
    return activations if memory_on is None else activations * memory_on[..., None].to(activations.dtype)


class TrainColumns:
    """One edit's k active columns as a dense [out, k] trainable matrix (the fast path).
    memory_on: [B, T] bool, the positions the memory applies at (`editor.EditBatch.memory_on`)."""

    def __init__(self, columns: torch.Tensor, weight: torch.Tensor, memory_on: torch.Tensor | None = None):
        self.columns = columns
        self.weight = weight
        self.memory_on = memory_on

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return _add_memory(output, from_positions(activations.index_select(-1, self.columns), self.memory_on), self.weight)


class TrainDense:
    """m * a through the full [out, D] W_m, exactly as the method is written (reference path).
    memory_on: [B, T] bool, the positions the memory applies at (`editor.EditBatch.memory_on`)."""

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor, memory_on: torch.Tensor | None = None):
        self.mask = mask
        self.weight = weight
        self.memory_on = memory_on

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        masked = from_positions(activations * self.mask.to(activations.dtype), self.memory_on)
        return _add_memory(output, masked, self.weight)


@dataclass(frozen=True)
class MemorySnapshot:
    """An immutable view of the memory: what one request sees from start to end."""

    weight: torch.Tensor  # [out, D] in the model's compute dtype
    index: MaskIndex
    applied: int  # number of edits applied to reach this state


@dataclass(frozen=True)
class Decision:
    match: Match | None  # best stored mask, or None when nothing is stored
    active: bool  # match ratio >= threshold (and edits allowed for this row)


def _add_masked(output: torch.Tensor, activations: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor, weight) -> torch.Tensor:
    """output[rows] += W_m (m * a[rows]) with each row's mask; other rows stay bit for bit."""
    masked = activations.index_select(0, rows) * masks
    return output.index_add(0, rows, (masked @ weight.T).to(output.dtype))


class Routing:
    """Per-sequence activation, decided from the prompt tokens at the first call (the prefill).

    window: [B, T] bool, true on the real prompt tokens whose mean defines the query's mask.
    allow: [B] bool, false for rows that asked to run without edits.
    formats: each row's prompt format (which background mean de-centres it); default all text.
    """

    def __init__(
        self,
        window: torch.Tensor,
        hasher: TopHasher,
        snapshot: MemorySnapshot,
        threshold: float,
        allow: torch.Tensor | None = None,
        formats: list[str] | None = None,
        router_keys: Callable[[TopHasher, torch.Tensor, list[str] | None], torch.Tensor | None] | None = None,
    ):
        self.window = window
        # the featurizer's: router keys of the prompts' means, when the memory is routed by them
        self.router_keys = router_keys
        self.formats = formats
        self.hasher = hasher
        self.snapshot = snapshot
        self.threshold = threshold
        self.allow = allow
        self.decisions: list[Decision] | None = None  # one per batch row
        self._masks_by_row: dict[int, torch.Tensor] = {}  # row -> matched stored mask, rows with memory on
        self._plan = RowMemory()  # applies the decisions, at the prefill and after it alike

    def decide(self, activations: torch.Tensor) -> None:
        means = token_mean(activations, self.window.to(activations.device))
        index = self.snapshot.index
        if index.router is not None and self.router_keys is not None:
            matches = index.best_by_router(self.router_keys(self.hasher, means, self.formats))
        else:
            matches = index.best(self.hasher.masks(means, self.formats))
        allow = [True] * len(matches) if self.allow is None else self.allow.tolist()
        self.decisions = [
            Decision(m, bool(ok and m is not None and m.ratio >= self.threshold)) for m, ok in zip(matches, allow)
        ]
        self._masks_by_row = {
            row: self.snapshot.index.mask(d.match.position).to(activations.device, activations.dtype)
            for row, d in enumerate(self.decisions)
            if d.active
        }
        self._plan.extend(self.row_memory())

    def row_memory(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per row, the (stored mask, W_m) to keep applying after the prefill, or None (memory off)."""
        if self.decisions is None:
            raise RuntimeError("row_memory before the prefill decision")
        return [
            (self._masks_by_row[row], self.snapshot.weight) if row in self._masks_by_row else None
            for row in range(len(self.decisions))
        ]

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.decisions is None:
            self.decide(activations)
            # the prefill: a row's memory starts where its feature window does (a chat prompt's
            # last user message), as its edits were trained; the template before it and the
            # earlier turns keep the base model's states
            first = self.window.to(activations.device).to(torch.uint8).argmax(dim=1)
            return self._plan(from_positions(activations, columns_from(first, self.window.shape[1])), output)
        return self._plan(activations, output)


class RowMemory:
    """The decode-step plan of a running batch: each row keeps its own (mask, W_m), possibly from
    different snapshots (rows that joined before and after an edit)."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def extend(self, entries: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        self.entries += entries
        self._groups = None

    def keep(self, slots: list[int]) -> None:
        self.entries = [self.entries[slot] for slot in slots]
        self._groups = None

    def release(self, slots: list[int]) -> None:
        """These rows go on without the memory."""
        for slot in slots:
            self.entries[slot] = None
        if slots:
            self._groups = None

    def _grouped(self, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._groups is None:
            by_weight: dict[int, tuple[torch.Tensor, list[int], list[torch.Tensor]]] = {}
            for slot, entry in enumerate(self.entries):
                if entry is not None:
                    mask, weight = entry
                    by_weight.setdefault(id(weight), (weight, [], []))[1].append(slot)
                    by_weight[id(weight)][2].append(mask)
            self._groups = [
                (torch.tensor(slots, device=device), torch.stack(masks)[:, None, :], weight)
                for weight, slots, masks in by_weight.values()
            ]
        return self._groups

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        for rows, masks, weight in self._grouped(activations.device):
            output = _add_masked(output, activations, rows, masks, weight)
        return output
