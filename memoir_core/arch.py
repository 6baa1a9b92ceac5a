"""Per-architecture table: where the blocks, the FFN output projection and the final norm live.

MEMOIR wraps the FFN output projection of one block. Its *input* is the activation a(x) that
TopHash hashes and that the residual memory reads; its output is added to the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of transformer blocks
    projection: str  # FFN output projection, relative to one block
    final_norm: str  # norm applied to the last hidden state before the LM head
    # True when the projection's output is added straight to the residual stream (no norm after
    # it), so a block's output with memory = its output without memory + W_m (m * a).
    additive: bool = True
    mlp: str = "mlp"  # the block's feed-forward module, relative to one block (position-wise)


_LLAMA_LIKE = ArchSpec(blocks="model.layers", projection="mlp.down_proj", final_norm="model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": ArchSpec(blocks="model.layers", projection="mlp.down_proj", final_norm="model.norm", additive=False),
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(blocks="transformer.h", projection="mlp.c_proj", final_norm="transformer.ln_f"),
    "gptj": ArchSpec(blocks="transformer.h", projection="mlp.fc_out", final_norm="transformer.ln_f"),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers", projection="mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm"
    ),
}

# Ratios from the paper's LLaMA-3-8B setting: layer 27 of 32, k = 4096 of D = 14336.
LAYER_RATIO = 27 / 32
TOP_K_RATIO = 4096 / 14336


class UnsupportedArchitecture(ValueError):
    pass


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported by MEMOIR; supported architectures: {supported}"
        )
    return spec


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_spec(model).blocks)


def default_layer(num_blocks: int) -> int:
    return min(num_blocks - 1, round(LAYER_RATIO * num_blocks))


def default_top_k(width: int) -> int:
    return max(1, round(TOP_K_RATIO * width))


def projection_shape(projection: nn.Module) -> tuple[int, int]:
    """(out_features, in_features D) of a Linear or of GPT-2's transposed Conv1D."""
    if isinstance(projection, nn.Linear):
        return projection.out_features, projection.in_features
    weight = projection.weight
    # transformers' Conv1D stores weight as [in, out] and exposes nf = out features.
    if hasattr(projection, "nf"):
        return weight.shape[1], weight.shape[0]
    raise UnsupportedArchitecture(f"cannot read the shape of projection {type(projection).__name__}")


def split_parent(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def apply_final_norm_and_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from a last hidden state, as the model's own forward would compute them."""
    hidden = model.get_submodule(arch_spec(model).final_norm)(hidden)
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
