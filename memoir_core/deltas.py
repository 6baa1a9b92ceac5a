"""Deltas: what one edit changed in the memory, exact to the bit.

A replica that applies an edit's delta to the state the edit was trained on reaches the trainer's
state bit for bit, without training: the delta holds the new *values* (not differences) of every
column of W_m that changed, of the key-moment entries that changed, the masks the edit added with
their keys, the target the edit says, its question's digest and the edits it superseded, the memory's own tau and its edit count. Columns are compared as bits, so a change of
-0.0 to 0.0 counts too and nothing relies on float arithmetic being repeatable.

A whole state (a checkpoint's content) travels the same way: `state_bytes` / `state_from_bytes`.
"""

from __future__ import annotations

from dataclasses import replace
import json
from typing import TYPE_CHECKING

import numpy as np
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
import torch

if TYPE_CHECKING:
    from .engine import MemoirEngine, MemoryState

_METADATA_KEY = "memoir_delta"
DELTA_VERSION = 4  # follows state.FORMAT_VERSION: a delta carries the memory that format trains
READABLE_VERSIONS = (3, 4)  # 3: no question digest nor supersessions (an edit that superseded nothing)


class DeltaMismatch(ValueError):
    """A delta applied to a state other than the one it was taken against."""


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def changed_columns(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Indices of the columns of two [out, D] float32 matrices whose bits differ anywhere."""
    return (_as_bits(before) != _as_bits(after)).any(dim=0).nonzero().flatten()


def changed_square(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Indices i such that row i or column i of two [D, D] float32 matrices differ in their bits."""
    differs = _as_bits(before) != _as_bits(after)
    return (differs.any(dim=0) | differs.any(dim=1)).nonzero().flatten()


def edit_delta(base: "MemoryState", state: "MemoryState") -> bytes:
    """The change from `base` to `state` (the state one edit trained on top of it), serialised."""
    base_index, index = base.snapshot.index, state.snapshot.index
    if index.keys[: len(base_index)] != base_index.keys:
        raise DeltaMismatch("the new state does not extend the base state's masks")
    columns = changed_columns(base.master, state.master)
    tensors = {
        "columns": columns.to("cpu", torch.int64),
        "weight": state.master[:, columns].to("cpu", torch.float32).contiguous(),
        "masks": torch.from_numpy(np.ascontiguousarray(index.packed[len(base_index) :]).view(np.uint8).copy()),
    }
    if index.router is not None:
        tensors["router_keys"] = torch.from_numpy(np.ascontiguousarray(index.router[len(base_index) :]))
    if state.key_moments is not None:
        before = base.key_moments if base.key_moments is not None else torch.zeros_like(state.key_moments)
        square = changed_square(before, state.key_moments)
        tensors["moment_index"] = square.to("cpu", torch.int64)
        tensors["moments"] = state.key_moments[square[:, None], square].to("cpu", torch.float32).contiguous()
    metadata = {
        "version": DELTA_VERSION,
        "kind": "edit",
        "base_applied": base.snapshot.applied,
        "applied": state.snapshot.applied,
        "keys": list(index.keys[len(base_index) :]),
        "answer": index.answers.get(index.keys[-1]) if len(index) > len(base_index) else None,
        "question": index.questions.get(index.keys[-1]) if len(index) > len(base_index) else None,
        "supersedes": [key for key in index.superseded if key not in base_index.superseded],
        "threshold": state.threshold,
    }
    return save_tensors(tensors, metadata={_METADATA_KEY: json.dumps(metadata)})


def _header_metadata(payload: bytes) -> dict:
    """The __metadata__ of a safetensors buffer (its 8-byte length, then the JSON header)."""
    length = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + length]).get("__metadata__", {})


def apply_delta(engine: "MemoirEngine", base: "MemoryState", payload: bytes, in_place: bool = False) -> "MemoryState":
    """The state an edit delta leads to from `base`.

    in_place: write into base's tensors instead of copies; only for a private base that was never
    published (catching up through many deltas at once)."""
    tensors, metadata = read_payload(payload, "edit")
    if metadata["base_applied"] != base.snapshot.applied:
        raise DeltaMismatch(
            f"the delta was taken on a memory of {metadata['base_applied']} edits, not {base.snapshot.applied}"
        )
    if ("router_keys" in tensors) != (engine.layout.router is not None):
        raise DeltaMismatch("the delta's edit is found by another rule (key projector or masks) than this engine's")
    device = base.master.device
    master = base.master if in_place else base.master.clone()
    columns = tensors["columns"].to(device)
    master[:, columns] = tensors["weight"].to(device)
    key_moments = base.key_moments
    if "moments" in tensors:
        if key_moments is None:
            key_moments = master.new_zeros(master.shape[1], master.shape[1])
        elif not in_place:
            key_moments = key_moments.clone()
        square = tensors["moment_index"].to(device)
        key_moments[square[:, None], square] = tensors["moments"].to(device)
    packed = tensors["masks"].numpy().view(np.uint64)
    index = base.snapshot.index.appended(
        packed,
        metadata["keys"],
        metadata.get("answer"),
        metadata.get("question"),
        metadata.get("supersedes", ()),
        tensors["router_keys"].numpy().copy() if "router_keys" in tensors else None,
    )
    state = engine.memory_state(master, index, metadata["applied"], key_moments)
    return replace(state, threshold=metadata["threshold"])


def read_payload(payload: bytes, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_tensors(payload)
    raw = _header_metadata(payload).get(_METADATA_KEY)
    if raw is None:
        raise DeltaMismatch("not a MEMOIR delta")
    metadata = json.loads(raw)
    if metadata.get("version") not in READABLE_VERSIONS or metadata.get("kind") != kind:
        raise DeltaMismatch(f"expected a version {DELTA_VERSION} {kind!r} payload, got {metadata.get('kind')!r}")
    return tensors, metadata


def state_bytes(engine: "MemoirEngine", state: "MemoryState") -> bytes:
    """A whole state (what a checkpoint file holds: W_m, masks, hasher, templates) as bytes."""
    tensors, metadata = engine.state_tensors(state)
    if state.snapshot.applied == 0:  # an empty memory is all zeros: no need to carry W_m
        del tensors["weight"]
    wrapped = {"version": DELTA_VERSION, "kind": "state", "state": metadata}
    return save_tensors(tensors, metadata={_METADATA_KEY: json.dumps(wrapped)})


def state_from_bytes(engine: "MemoirEngine", payload: bytes):
    """(state, hasher, metadata) of `state_bytes`, checked for fit as a checkpoint file is."""
    from .state import state_from_tensors

    tensors, wrapped = read_payload(payload, "state")
    metadata = wrapped["state"]
    if "weight" not in tensors:
        tensors["weight"] = torch.zeros(metadata["out_features"], metadata["width"], dtype=torch.float32)
    return state_from_tensors(engine.layout, tensors, metadata, engine.memory_state)
