"""Saving and loading the memory: one safetensors file with its JSON metadata in the header.

Tensors: W_m (float32), the permutation, the background mean, the packed masks (each edit's trained mask first) and, when edits
were trained with key protection, the stored keys' second moments. Metadata: the
format version, the base model id and a fingerprint of its weights at the edited layer, layer,
widths, k, tau, seed, the context templates, the edit keys, each edit's target and question digest,
and which edits later ones superseded. Writing goes to a temporary file
that replaces the target in one rename, so a crash never leaves a half-written state behind.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import re
import tempfile
from typing import TYPE_CHECKING, Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save_file
import torch

if TYPE_CHECKING:
    from .engine import MemoirEngine
    from .memory_state import MemoryState
from .mask_index import MaskIndex
from .tophash import TEXT_FORMAT, TopHasher

# 2: an edit's first stored mask is the one all its frames were trained through (1: each frame
# its own); 3: the memory applies from a prompt's feature window on (a chat prompt's last user
# message), in training as in serving. An older file is refused, and the service rebuilds it
# from the edit log; 4: edits keep their question's digest, and superseded edits are listed (a
# version 3 file has neither and is read as a memory without supersessions)
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
_METADATA_KEY = "memoir"


@dataclass(frozen=True)
class MemoryLayout:
    """What a state file must fit: the base model, its weights at the edited layer and W_m's shape."""

    model_id: str
    model_type: str
    weights_fingerprint: str
    layer: int
    width: int
    out_features: int
    router: str | None = None  # the key projector's digest when edits are routed by it


class StateMismatch(ValueError):
    """The saved memory belongs to another base model, layer or shape."""


def state_tensors(
    state: "MemoryState",
    hasher: TopHasher,
    layout: MemoryLayout,
    context_templates: list[str],
    threshold: float,
    threshold_calibrated: bool,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata a state file holds (also a whole-state delta's payload)."""
    snapshot = state.snapshot
    packed = snapshot.index.packed
    tensors = {
        "weight": state.master.detach().to("cpu", torch.float32).contiguous(),
        "permutation": hasher.permutation.cpu().contiguous(),
        **{
            "background_mean" + ("" if name == TEXT_FORMAT else f".{name}"): mean.cpu().contiguous()
            for name, mean in hasher.backgrounds.items()
        },
        "masks": torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).copy()),
    }
    if state.key_moments is not None:
        tensors["key_moments"] = state.key_moments.detach().to("cpu", torch.float32).contiguous()
    if snapshot.index.router is not None:
        tensors["router_keys"] = torch.from_numpy(np.ascontiguousarray(snapshot.index.router))
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_id": layout.model_id,
        "model_type": layout.model_type,
        "weights_fingerprint": layout.weights_fingerprint,
        "layer": layout.layer,
        "width": layout.width,
        "out_features": layout.out_features,
        "top_k": hasher.top_k,
        "threshold": threshold,
        "threshold_calibrated": threshold_calibrated,
        "seed": seed,
        "applied": snapshot.applied,
        "keys": list(snapshot.index.keys),
        "answers": snapshot.index.answers,
        "questions": snapshot.index.questions,
        "superseded": snapshot.index.superseded,
        "context_templates": context_templates,
        "router": layout.router if snapshot.index.router is not None else None,
    }
    return tensors, metadata


STAGING_SUFFIX = ".tmp"  # a staging file is `.<name>.<random>.tmp` beside its target


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """Write a state's tensors and metadata (`state_tensors`) atomically; returns the file's sha256.

    A failing disk (full, over quota, an I/O error) raises OSError and leaves neither the target
    nor the staging file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=STAGING_SUFFIX)
    os.close(fd)
    try:
        try:
            save_file(tensors, staging, metadata={_METADATA_KEY: json.dumps(metadata)})
        except SafetensorError as error:
            raise _as_os_error(error, path) from error
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        sha256 = file_sha256(staging)  # of the bytes written, whatever happens to `path` later
        os.replace(staging, path)
        fsync_directory(path.parent)  # the rename itself survives a power cut before anyone records it
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return sha256


def _as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors reports a failed write as SafetensorError ("... (os error 28)"); as an OSError
    with its errno, callers treat a full or failing disk like any other failed file write."""
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return error  # not an I/O error: a bug, raised as it is
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)} (writing {path})")


def fsync_directory(directory: Path) -> None:
    """Make a rename into `directory` durable (a file's own fsync does not cover its name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: nothing to flush
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def weights_sha256(state: "MemoryState") -> str:
    """SHA-256 of W_m's float32 bytes: equal on two replicas exactly when their memories are."""
    return hashlib.sha256(state.master.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def masks_sha256(state: "MemoryState") -> str:
    """SHA-256 of the packed masks and, once an edit was superseded, of which ones were: equal
    on two replicas exactly when the same masks are searched."""
    index = state.snapshot.index
    digest = hashlib.sha256(np.ascontiguousarray(index.packed).tobytes())
    if index.superseded:
        digest.update(json.dumps(sorted(index.superseded.items())).encode())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StateCorrupt(ValueError):
    """A state file whose bytes are not the ones recorded for it."""


def read_state_file(path: str | Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A state file's tensors and metadata, parsed from one read of its bytes; with `sha256`,
    those bytes must have it (else StateCorrupt).

    One read, because safetensors' own loader maps the file into memory: its tensors would change
    with the file, so a file hashed and then loaded, or corrupted on disk after loading, could put
    bytes nobody checked into the served memory (seen in bench.chaos: a corrupted checkpoint's
    permutation reached a leader's hasher). These tensors own their memory."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StateCorrupt("sha256 differs from the recorded one")
    try:
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as error:
        raise StateCorrupt(f"{path} is not a safetensors file: {error}") from error
    raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
    if raw is None:
        raise StateMismatch(f"{path} is not a MEMOIR state file")
    return tensors, json.loads(raw)


def check_compatible(layout: MemoryLayout, metadata: dict) -> None:
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StateMismatch(f"state format version {version} is not supported (expected {FORMAT_VERSION})")
    problems = []
    if metadata["weights_fingerprint"] != layout.weights_fingerprint:
        problems.append(
            f"it was saved for base model {metadata['model_id']!r} ({metadata['model_type']}), whose weights "
            f"differ from the loaded {layout.model_id!r} ({layout.model_type})"
        )
    if metadata["layer"] != layout.layer:
        problems.append(f"it edits layer {metadata['layer']}, the engine edits layer {layout.layer}")
    if (metadata["out_features"], metadata["width"]) != (layout.out_features, layout.width):
        problems.append(
            f"its memory is {metadata['out_features']}x{metadata['width']}, "
            f"the engine's projection is {layout.out_features}x{layout.width}"
        )
    if metadata["keys"] and metadata.get("router") != layout.router:
        # router keys cannot be made again from a state (it keeps no prompts): the edits would be
        # found by another rule than the one they were stored for
        routed = lambda r: f"key projector {r}" if r else "TopHash masks"  # noqa: E731
        problems.append(f"its edits are found by {routed(metadata.get('router'))}, the engine's by {routed(layout.router)}")
    if problems:
        raise StateMismatch("cannot load this MEMOIR state: " + "; ".join(problems))


# builds an unpublished state on the engine's device from stored parts (`MemoirEngine.memory_state`)
StateBuilder = Callable[[torch.Tensor, MaskIndex, int, "torch.Tensor | None"], "MemoryState"]


def read_state(
    layout: MemoryLayout, path: str | Path, build: StateBuilder, sha256: str | None = None
) -> tuple["MemoryState", TopHasher, dict]:
    """A saved memory as an unpublished state, with its hasher and metadata (checked for fit and,
    with `sha256`, for being the bytes recorded: `read_state_file`)."""
    tensors, metadata = read_state_file(path, sha256)
    return state_from_tensors(layout, tensors, metadata, build)


def state_from_tensors(
    layout: MemoryLayout, tensors: dict[str, torch.Tensor], metadata: dict, build: StateBuilder
) -> tuple["MemoryState", TopHasher, dict]:
    """An unpublished state from the tensors and metadata of `state_tensors` (checked for fit)."""
    check_compatible(layout, metadata)
    keys = tuple(metadata["keys"])
    packed = tensors["masks"].numpy().view(np.uint64).copy()
    backgrounds = {
        name.partition(".")[2] or TEXT_FORMAT: tensor
        for name, tensor in tensors.items()
        if name.split(".")[0] == "background_mean"
    }
    hasher = TopHasher(tensors["permutation"], metadata["top_k"], backgrounds)
    index = MaskIndex(
        layout.width,
        hasher.top_k,
        packed,
        keys,
        metadata.get("answers"),  # none before 2026-12
        metadata.get("questions"),  # these two: none before format version 4
        metadata.get("superseded"),
        tensors["router_keys"].numpy().copy() if "router_keys" in tensors else None,
    )
    state = build(tensors["weight"], index, metadata["applied"], tensors.get("key_moments"))
    return state, hasher, metadata


def load_state(engine: "MemoirEngine", path: str | Path) -> dict:
    """Restore W_m, masks, permutation, background mean, k, tau and templates, and publish them.

    The one function here that takes the engine: restoring means adopting and publishing, which
    only the engine does (under its lock)."""
    state, hasher, metadata = read_state(engine.layout, path, engine.memory_state)
    engine.adopt_hasher(hasher, metadata["context_templates"])
    engine.threshold = metadata["threshold"]
    engine.publish(state)
    return metadata
