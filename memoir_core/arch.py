"""Where MEMOIR sits in a causal LM, found from the module tree and the config (`arch_spec`).

MEMOIR wraps the FFN output projection of one block. Its *input* is the activation a(x) that
TopHash hashes and that the residual memory reads; its output joins the residual stream.
Discovery finds:

* the blocks: the ModuleList of `num_hidden_layers` modules beside the input embeddings;
* each block's feed-forward (a child named mlp, feed_forward or ffn) and, inside it, the one
  linear map back to the hidden size: the output projection;
* whether a norm sits between that projection and the residual add (Gemma 2/3, OLMo 2 have a
  `post_feedforward_layernorm`), and a scale on the feed-forward's residual branch (Granite's
  `residual_multiplier`);
* the final norm (the norm beside the blocks, registered after them) and what the model does to
  the logits after the head (Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma 2/3's
  `final_logit_softcapping`).

A mixture-of-experts feed-forward is refused (`_refuse_experts`), and so is a block that keeps
recurrent or convolution state (`_refuse_stateful`). The `*_OVERRIDES` tables hold what names and
config cannot tell by themselves. `arch_check` verifies the relations the fast edit path
relies on numerically once the memory is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
import re

import torch
from torch import nn

from .memory import ResidualMemory

FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")
# a norm child of a block whose name says it normalises the feed-forward's output
POST_FEED_FORWARD_NORMS = ("post_feedforward", "post_mlp", "post_ffn", "ffn_post")
# Where the name cannot tell: HyperCLOVA X's post_norm1 follows attention, post_norm2 the
# feed-forward (nn.Identity unless use_post_norm).
POST_NORM_OVERRIDES: dict[str, str] = {"hyperclovax": "post_norm2"}
# attention kinds the decoder's key/value cache handles; anything else keeps another state
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# class names of block children that keep recurrent or convolution state across tokens
_STATEFUL = re.compile(r"Mamba|Mixer|Conv|DeltaNet|LSTM|SSM|Rwkv|RWKV|Recurrent")
# float attributes of a block that scale the feed-forward's branch before the residual add
RESIDUAL_SCALE_ATTRIBUTES = ("residual_multiplier", "residual_scale")
# config attributes applied to the logits after the head, in this order (Cohere, Granite, Gemma 2/3)
LOGIT_ATTRIBUTES = (("logit_scale", "multiply"), ("logits_scaling", "divide"), ("final_logit_softcapping", "softcap"))
# Where one attribute means another thing in one family: HyperCLOVA X multiplies by
# logits_scaling where Granite divides.
LOGIT_OVERRIDES: dict[str, dict[str, str]] = {"hyperclovax": {"logits_scaling": "multiply"}}

# Ratios from the paper's LLaMA-3-8B setting: layer 27 of 32, k = 4096 of D = 14336.
LAYER_RATIO = 27 / 32
TOP_K_RATIO = 4096 / 14336


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    family: str  # config.model_type
    blocks: str  # dotted path of the ModuleList of transformer blocks
    mlp: str  # the block's feed-forward module, relative to one block (position-wise)
    projection: str  # FFN output projection, relative to one block
    final_norm: str  # norm applied to the last hidden state before the LM head
    # a norm between the projection and the residual add (block output is then not additive in W_m)
    post_norm: str | None = None
    residual_scale: float = 1.0  # the feed-forward branch is multiplied by this before the add
    residual_scale_name: str | None = None  # the attribute it was read from
    # (op, config attribute, value), op "multiply" | "divide" | "softcap", applied in this order
    logit_ops: tuple[tuple[str, str, float], ...] = ()

    @property
    def additive(self) -> bool:
        """True when a block's output with memory = its output without + residual_scale * W_m (m * a):
        no norm after the projection before the residual add."""
        return self.post_norm is None

    def describe(self) -> str:
        """One line for logs and the families table."""
        parts = [f"{self.blocks}[i].{self.projection}", f"final norm {self.final_norm}"]
        if self.post_norm:
            parts.append(f"norm after the projection ({self.post_norm})")
        if self.residual_scale_name:
            parts.append(f"residual branch x {self.residual_scale_name} ({self.residual_scale:g})")
        parts += [f"logits {op} {name} ({value:g})" for op, name, value in self.logit_ops]
        return "; ".join(parts)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (hasattr(module, "nf") and getattr(module, "weight", None) is not None)


def projection_shape(projection: nn.Module) -> tuple[int, int]:
    """(out_features, in_features D) of a Linear or of GPT-2's transposed Conv1D."""
    if isinstance(projection, nn.Linear):
        return projection.out_features, projection.in_features
    weight = projection.weight
    # transformers' Conv1D stores weight as [in, out] and exposes nf = out features.
    if hasattr(projection, "nf"):
        return weight.shape[1], weight.shape[0]
    raise UnsupportedArchitecture(f"cannot read the shape of projection {type(projection).__name__}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def hidden_size(model: nn.Module) -> int:
    size = getattr(model.config.get_text_config(), "hidden_size", None)
    return size if isinstance(size, int) else model.get_input_embeddings().embedding_dim


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _find_blocks(model: nn.Module) -> str:
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (layers is None or len(module) == layers)
    ]
    beside = split_parent(_path_of(model, model.get_input_embeddings()))[0]
    siblings = [name for name, _ in lists if split_parent(name)[0] == beside]
    if siblings:
        return siblings[0]
    raise UnsupportedArchitecture(
        f"cannot find the transformer blocks of {type(model).__name__}: no ModuleList of {layers} modules "
        "beside its input embeddings"
    )


def _feed_forward(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name in FEED_FORWARD_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


def _no_feed_forward(block: nn.Module) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"cannot find the feed-forward of {type(block).__name__}: no child named {', '.join(FEED_FORWARD_NAMES)} "
        "(a block whose feed-forward layers are not a module of their own is not supported)"
    )


def _refuse_experts(model_type: str, index: int, feed_forward: nn.Module) -> None:
    """MoE: a token's FFN output is a routed mix of several experts' projections, so there is no
    one projection whose input a(x) all tokens share, to hash and to place W_m beside."""
    names = {name.rpartition(".")[2] for name, _ in feed_forward.named_modules()}
    classes = " ".join(type(m).__name__ for m in feed_forward.modules()).lower()
    stacked = any(p.dim() >= 3 for p in feed_forward.parameters())
    if {"experts", "router"} & names or "expert" in classes or "router" in classes or stacked:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}: block {index}'s feed-forward ({type(feed_forward).__name__}) is a mixture "
            "of experts, which MEMOIR does not support: its memory sits beside one dense FFN output projection "
            "and hashes that projection's input a(x), but an MoE layer routes each token through its own experts, "
            "so there is no single projection or a(x) shared by all tokens"
        )


def _output_projection(feed_forward: nn.Module, width: int, where: str) -> str:
    found: list[str] = []
    for name, module in feed_forward.named_modules():
        if any(name.startswith(f"{memory}.") for memory in found):
            continue  # inside a memory an engine installed: it stands for the projection it wraps
        if isinstance(module, ResidualMemory) or (name and _is_linear(module) and projection_shape(module)[0] == width):
            found.append(name)
    if len(found) != 1:
        what = "no linear map" if not found else f"{len(found)} linear maps ({', '.join(found)})"
        raise UnsupportedArchitecture(
            f"{where}: {what} back to the hidden size {width}; expected one output projection"
        )
    return found[0]


def _post_norm(model_type: str, block: nn.Module) -> str | None:
    override = POST_NORM_OVERRIDES.get(model_type)
    for name, child in block.named_children():
        if _is_norm(child) and (name == override or any(marker in name for marker in POST_FEED_FORWARD_NORMS)):
            return name
    return None


def _refuse_stateful(model_type: str, config, block_list: nn.ModuleList) -> None:
    """Generation keeps a key/value cache per block: a block that carries recurrent or convolution
    state (Mamba, linear attention, short convolutions, xLSTM) or has no attention cannot use it."""
    kinds = set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    for index, block in enumerate(block_list):
        classes = [type(child).__name__ for child in block.children()]
        stateful = [c for c in classes if _STATEFUL.search(c)]
        attention = any("attention" in c.lower() and "linear" not in c.lower() for c in classes)
        if kinds or stateful or not attention:
            what = ", ".join(sorted(kinds) or stateful) or "no attention"
            raise UnsupportedArchitecture(
                f"model_type {model_type!r}: block {index} keeps a state other than attention keys and values "
                f"({what}); MEMOIR's decoder caches attention keys and values only"
            )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _residual_scale(block: nn.Module, config) -> tuple[float, str | None]:
    for source in (block, config):
        for name in RESIDUAL_SCALE_ATTRIBUTES:
            value = getattr(source, name, None)
            if _is_number(value):
                return float(value), name
    return 1.0, None


def _final_norm(model: nn.Module, blocks_path: str) -> str:
    parent_path, blocks_name = split_parent(blocks_path)
    parent = model.get_submodule(parent_path) if parent_path else model
    names = [name for name, _ in parent.named_children()]
    after = [name for name in names[names.index(blocks_name) + 1 :] if _is_norm(getattr(parent, name))]
    if len(after) != 1:
        raise UnsupportedArchitecture(
            f"cannot find the final norm of {type(model).__name__}: {len(after)} norms follow {blocks_path}, expected one"
        )
    return f"{parent_path}.{after[0]}" if parent_path else after[0]


def _logit_ops(model_type: str, config) -> tuple[tuple[str, str, float], ...]:
    overrides = LOGIT_OVERRIDES.get(model_type, {})
    ops = []
    for name, op in LOGIT_ATTRIBUTES:
        value = getattr(config, name, None)
        if _is_number(value) and value:  # 0 / None: off
            ops.append((overrides.get(name, op), name, float(value)))
    return tuple(ops)


def arch_spec(model: nn.Module) -> ArchSpec:
    """Discover where the memory goes; raises UnsupportedArchitecture with the reason."""
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None) or getattr(model.config, "model_type", "?")
    blocks_path = _find_blocks(model)
    block_list = model.get_submodule(blocks_path)
    width = hidden_size(model)
    feed_forwards = [_feed_forward(block) for block in block_list]
    for index, found_here in enumerate(feed_forwards):
        if found_here is not None:
            _refuse_experts(model_type, index, found_here[1])
    _refuse_stateful(model_type, config, block_list)
    found = set()
    for index, (block, found_here) in enumerate(zip(block_list, feed_forwards)):
        if found_here is None:
            raise _no_feed_forward(block)
        mlp, feed_forward = found_here
        where = f"block {index}'s feed-forward ({type(feed_forward).__name__})"
        found.add((mlp, _output_projection(feed_forward, width, where), _post_norm(model_type, block)))
    if len(found) != 1:
        raise UnsupportedArchitecture(
            f"the blocks of {type(model).__name__} differ in their feed-forward layout: {sorted(found)}"
        )
    mlp, projection, post_norm = found.pop()
    residual_scale, residual_scale_name = _residual_scale(block_list[0], config)
    return ArchSpec(
        family=model_type,
        blocks=blocks_path,
        mlp=mlp,
        projection=f"{mlp}.{projection}",
        final_norm=_final_norm(model, blocks_path),
        post_norm=post_norm,
        residual_scale=residual_scale,
        residual_scale_name=residual_scale_name,
        logit_ops=_logit_ops(model_type, config),
    )


def blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    return model.get_submodule((spec or arch_spec(model)).blocks)


def default_layer(num_blocks: int) -> int:
    return min(num_blocks - 1, round(LAYER_RATIO * num_blocks))


def default_top_k(width: int) -> int:
    return max(1, round(TOP_K_RATIO * width))


def split_parent(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def apply_final_norm_and_head(model: nn.Module, hidden: torch.Tensor, spec: ArchSpec | None = None) -> torch.Tensor:
    """Logits from a last hidden state, as the model's own forward would compute them."""
    spec = spec or arch_spec(model)
    logits = model.get_output_embeddings()(model.get_submodule(spec.final_norm)(hidden))
    for op, _, value in spec.logit_ops:
        if op == "multiply":
            logits = logits * value
        elif op == "divide":
            logits = logits / value
        else:  # softcap
            logits = torch.tanh(logits / value) * value
    return logits
