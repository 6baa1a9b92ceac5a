"""A numerical check, on the loaded model, of what the fast edit path takes from `arch.arch_spec`.

`editor.train_fast` relies on three relations: (1) for an additive block, the edited block's
output with memory equals its output without plus residual_scale * W_m (m * a), so the block need
not run again; (2) the logits equal the final norm, the head and the logit ops applied to the last
hidden state; (3) each block runs once per forward, in order, so the blocks above the edited one
can be run again from its output. A fourth saves work where it holds: (4) those blocks, run on
the later columns against the earlier columns' keys and values, give the full pass's output
there (`split_pass`). Structure and config can mislead for a family no test has covered (a scale
under another name, a head that does more, a looped model), so all four are checked once on a
short forward pass with the memory installed. A relation that does not hold sends edits to a path
that does not need it: re-running the block from its input (1), the reference loop (2, 3), or
every column (4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, apply_final_norm_and_head
from .editor import capture_blocks
from .hooks import thread_hooks
from .memory import ResidualMemory
from .split_pass import SplitPass, split_pass
from .tokens import left_pad

# The memory's test contribution is this many times the block output's RMS, so that rounding
# in the residual add stays far below it (bf16 included) while a norm after the projection,
# which bounds the feed-forward branch, misses it by about its whole size.
_PROBE_SCALE = 4.0
_ADDITIVE_TOLERANCE = 0.1  # relative error of the additive relation
_HEAD_TOLERANCE = 1e-3  # relative to the largest logit
# (4) relative to what the upper blocks add to the hidden state. bf16 rounding, which differs
# between the split and the full pass's kernels, measured at most 4e-3 on CPU (random Llamas, 128
# to 4096 wide) and 0.011 on an H200 (LLaMA-3-8B-shaped); a prefix shifted by one column 0.10 to
# 0.15, a prefix of zeros about 0.7
_SPLIT_TOLERANCE = 0.05


@dataclass(frozen=True)
class FastPathCheck:
    additive: bool  # train_fast may add the memory's contribution instead of re-running the block
    # each block runs once, in order, and apply_final_norm_and_head reproduces the model's logits:
    # train_fast may be used at all
    usable: bool
    # every block above the edited one is called with the edited block's arguments (besides the
    # hidden state): one capture can stop after the edited block; else each block's own are kept
    same_block_inputs: bool = True
    # the blocks above the edited one may run on the columns the memory reaches only, the
    # others' keys and values computed once (`split_pass`): train_fast's `split`
    split: bool = False
    split_error: float | None = None  # (4)'s measured relative error; None: the split pass refused
    notes: tuple[str, ...] = ()  # why a relation is not used


class _Stop(Exception):
    pass


class _RecordOutput:
    output: torch.Tensor | None = None

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.output = output
        return output


class _AddToOutput:
    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta.to(output.device, output.dtype)


def _same(a, b) -> bool:
    """Arguments equal in value (tensors) or identical (anything else that is not plain data)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))):
        return a == b
    return False


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def check_fast_path(
    model: nn.Module, spec: ArchSpec, blocks: nn.ModuleList, layer: int, memory: ResidualMemory, input_ids: list[int]
) -> FastPathCheck:
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids], device=device)
    seen: dict[str, torch.Tensor] = {}

    def block_output(module, args, kwargs, output):
        seen["block"] = _first(output)

    def final_norm_input(module, args, kwargs):
        seen["last_hidden"] = args[0] if args else next(iter(kwargs.values()))

    order: list[int] = []
    calls: dict[int, tuple[tuple, dict]] = {}

    def ran(index):
        def record_call(module, args, kwargs):
            order.append(index)
            calls[index] = (args[1:], kwargs)

        return record_call

    record = _RecordOutput()
    pre = [(model.get_submodule(spec.final_norm), final_norm_input), *((b, ran(i)) for i, b in enumerate(blocks))]
    with memory.using(record), thread_hooks(pre=pre, post=[(blocks[layer], block_output)]):
        logits = model(input_ids=ids, use_cache=False).logits
    notes = []
    if order != list(range(len(blocks))):  # e.g. a looped model that runs some blocks again
        notes.append("the blocks do not run once each, in order: edits use the reference loop")
    ours = apply_final_norm_and_head(model, seen["last_hidden"], spec).float()
    scale = logits.float().abs().max()
    if not torch.allclose(ours, logits.float(), rtol=_HEAD_TOLERANCE, atol=_HEAD_TOLERANCE * float(scale)):
        notes.append(
            "the final norm, head and logit ops do not reproduce the model's logits: edits use the reference loop"
        )
    usable = not notes
    # one attention type above the edited block (masks differ between types only on long inputs,
    # so the short pass here cannot tell) and equal arguments in this pass (nothing per layer)
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    same_inputs = not layer_types or len(set(layer_types[layer:])) == 1
    same_inputs = same_inputs and all(
        _same(calls[layer], calls[i]) for i in range(layer + 1, len(blocks)) if i in calls
    )

    additive = spec.additive
    if additive:
        plain = seen["block"].float()
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(record.output.shape, generator=generator)
        size = _PROBE_SCALE * plain.pow(2).mean().sqrt() / max(abs(spec.residual_scale), 1e-6)
        delta = (direction * size.cpu()).to(record.output.dtype)

        def stop(module, args, kwargs, output):
            seen["block"] = _first(output)
            raise _Stop

        try:
            with memory.using(_AddToOutput(delta)), thread_hooks(post=[(blocks[layer], stop)]):
                model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        expected = spec.residual_scale * delta.float().to(plain.device)
        error = (seen["block"].float() - plain - expected).norm() / expected.norm()
        additive = bool(error < _ADDITIVE_TOLERANCE)
        if not additive:
            notes.append(
                f"block {layer}'s output does not grow by {spec.residual_scale:g} x the memory's contribution "
                f"(relative error {float(error):.2g}): edits re-run the block"
            )
    split_error = _split_error(model, blocks, layer, memory, input_ids, same_inputs) if usable and additive else None
    split = split_error is not None and split_error <= _SPLIT_TOLERANCE
    if usable and additive and not split:
        measured = "" if split_error is None else f" (relative error {split_error:.2g})"
        notes.append(
            "the blocks above the edited one do not reproduce their output when run on the later columns "
            f"against the earlier ones' keys and values{measured}: chat edits run them on every column"
        )
    return FastPathCheck(additive, usable, same_inputs, split, split_error, tuple(notes))


def _split_error(model, blocks, layer, memory, input_ids: list[int], reuse_inputs: bool) -> float | None:
    """(4) how far the split pass (`split_pass`) lands from the full pass's last hidden state on
    its columns, relative to what the upper blocks add there, for one row (no padding: the model
    may pass no mask) and for two rows, one left-padded; None where the split pass refuses."""
    device = model.get_input_embeddings().weight.device
    worst = 0.0
    try:
        for rows in ([input_ids], [input_ids, input_ids[len(input_ids) // 3 :]]):
            batch = left_pad(rows, 0, device)
            captured = capture_blocks(model, blocks, layer, memory, batch, reuse_inputs)
            calls = captured.upper_calls()
            full = SplitPass(0, calls).run(blocks, layer + 1, captured.block_output)
            start = batch.input_ids.shape[1] // 2
            part = split_pass(blocks, layer + 1, calls, captured.block_output[:, :start], batch.attention_mask, start)
            if part is None:
                return None
            window = part.run(blocks, layer + 1, captured.block_output[:, start:]).float()
            expected = full[:, start:].float()
            added = expected - captured.block_output[:, start:].float()
            worst = max(worst, float((window - expected).norm() / added.norm().clamp_min(1e-12)))
    except Exception:  # a block that takes the arguments otherwise: the full pass it is
        return None
    return worst
