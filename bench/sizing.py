"""Memory MEMOIR holds on a GPU host, computed from the sizes of the tensors the code allocates
(not measured): the model, W_m's master and served copies, the published states, the key moments
that key protection keeps (all on the model's device), and the packed masks (host memory).

    python -m bench.sizing                  # LLaMA-3-8B in bf16 with its preset (docs/performance.md's table)
    python -m bench.sizing --dtype fp32

The model is built on the meta device from its config (no weights are read or allocated);
discovery (memoir_core.arch) finds the edited projection, the preset gives layer and k.
tests/bench/test_sizing.py checks these formulas against an engine's own tensors.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from memoir_core import arch
from memoir_core.mask_index import MaskIndex
from memoir_core.presets import model_shape, recommended_config

# meta-llama/Meta-Llama-3-8B's config.json (the shape its preset matches)
LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
MASTER = torch.float32  # W_m's master copy and the key moments (engine.MemoryState)
MASKS = 100_000


@dataclass(frozen=True)
class Sizes:
    """Bytes of each thing the engine holds for one model (see `sizes`)."""

    model: int
    parameters: int
    master: int  # W_m, float32 [out, D]
    served: int  # W_m in the compute dtype; 0 when that is float32 (the master is served)
    columns: int  # an edit's trainable [out, k] float32 columns and their gradient
    key_moments: int  # float32 [D, D], per state, when protection is on
    mask: int  # one packed mask
    out: int
    width: int
    top_k: int
    layer: int

    @property
    def state(self) -> int:
        """One memory state: the master and the served copy."""
        return self.master + self.served

    def training(self, protect: bool) -> int:
        """While an edit trains: its base state, the new state, the trained columns (and both
        states' key moments with protection on)."""
        return 2 * self.state + self.columns + (2 * self.key_moments if protect else 0)


def sizes(model: nn.Module, dtype: torch.dtype, layer: int | None, top_k: int | None) -> Sizes:
    spec = arch.arch_spec(model)
    blocks = arch.blocks(model, spec)
    layer = layer if layer is not None else arch.default_layer(len(blocks))
    projection = blocks[layer].get_submodule(spec.projection)
    out, width = arch.projection_shape(getattr(projection, "projection", projection))
    top_k = top_k or arch.default_top_k(width)
    itemsize = dtype.itemsize
    parameters = sum(p.numel() for p in model.parameters())
    master = out * width * MASTER.itemsize
    return Sizes(
        model=parameters * itemsize,
        parameters=parameters,
        master=master,
        served=0 if dtype == MASTER else out * width * itemsize,
        columns=2 * out * top_k * MASTER.itemsize,
        key_moments=width * width * MASTER.itemsize,
        mask=MaskIndex(width, top_k).bytes_per_mask,
        out=out,
        width=width,
        top_k=top_k,
        layer=layer,
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(s: Sizes, dtype: str) -> str:
    frames = 2  # the service trains each edit in the plain and the chat frame: up to 2 masks
    masks = MASKS * frames * s.mask
    gpu = (
        f"{_size(s.model + s.state)} / {_size(s.model + s.training(False))}; "
        f"{_size(s.model + s.state + s.key_moments)} / {_size(s.model + s.training(True))}"
    )
    rows = [
        ("model weights", f"{s.parameters / 1e9:.2f} B parameters in {dtype}", _size(s.model)),
        ("W_m master", f"[{s.out}, {s.width}] fp32, one per memory state", _size(s.master)),
        (
            "W_m served copy",
            f"[{s.out}, {s.width}] {dtype}, one per memory state; an older one lives on while a generation "
            "that started on it runs",
            _size(s.served),
        ),
        ("one published memory state", "master + served copy", _size(s.state)),
        (
            "while an edit trains",
            f"its base state and the new one, the edit's [{s.out}, {s.top_k}] fp32 columns and their gradient",
            _size(s.training(False)),
        ),
        (
            "key moments (protection on)",
            f"[{s.width}, {s.width}] fp32 per state, so twice while an edit trains",
            _size(s.key_moments),
        ),
        ("total on the GPU", "steady / while an edit trains; with protection on", gpu),
        (
            "masks, 10^5 edits (host memory)",
            f"{s.mask} B a mask, up to {frames} per edit; the buffer doubles as it grows",
            f"{_size(masks)} (up to {_size(2 * masks)})",
        ),
    ]
    lines = ["| held | what | size (computed) |", "|---|---|---|"]
    lines += [f"| {name} | {what} | {size} |" for name, what, size in rows]
    return "\n".join(lines)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def report(dtype: str = "bf16") -> str:
    """docs/performance.md's sizing section: the LLaMA-3-8B preset and its table."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LLAMA3_8B)
    config = recommended_config(model_shape(model))
    protection = "on" if config.hyper.protect else "off"
    preset = (
        f"Preset {config.preset.name}: layer {config.layer} of 32, k {config.top_k} of D 14336, "
        f"τ {config.threshold}, lr {config.hyper.lr}, at most {config.hyper.max_iterations} steps, "
        f"key protection {protection}."
    )
    return preset + "\n\n" + markdown(sizes(model, DTYPES[dtype], config.layer, config.top_k), dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    print(report(parser.parse_args().dtype))


if __name__ == "__main__":
    main()
