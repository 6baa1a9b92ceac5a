"""The model families MEMOIR is tested on, one entry each, with a tiny random configuration.

tests/engine/test_families.py builds a tiny randomly initialised model of every family here from
transformers' own config class and runs the engine's checks on it. The design notes' supported-families
table is generated from the same list, with what `arch.arch_spec` finds in each model:

    python -m memoir_core.families --markdown

Other dense families that discovery accepts load too; they are not covered by that test (the
engine logs a warning), and `arch_check` still verifies what the fast edit path assumes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .arch import ArchSpec, arch_spec

# Small enough that one family's checks take seconds on a CPU; std 0.1 makes the logits peaked.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
}
# Sliding-window families get a window shorter than the test prompts, so that it matters.
_SLIDING = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
# multi-head latent attention in tiny sizes
_LATENT_ATTENTION = {
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}


@dataclass(frozen=True)
class Family:
    model_type: str
    checkpoints: str  # well-known checkpoints of the family
    config: dict = field(default_factory=dict)  # settings for a tiny model beyond TINY


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama 2, Llama 3.x, SmolLM2, TinyLlama"),
    Family("mistral", "Mistral 7B, Mistral NeMo", {"sliding_window": 8}),
    Family("qwen2", "Qwen2, Qwen2.5"),
    Family("qwen3", "Qwen3 (dense)", {"head_dim": 16}),
    Family("gemma", "Gemma", {"head_dim": 16}),
    Family("gemma2", "Gemma 2", {"head_dim": 16, "query_pre_attn_scalar": 16, **_SLIDING}),
    Family(
        "gemma3_text",
        "Gemma 3 (text)",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0, **_SLIDING},
    ),
    Family("phi3", "Phi-3, Phi-3.5-mini, Phi-4"),
    Family("phi", "Phi-1.5, Phi-2"),
    Family("olmo2", "OLMo 2"),
    Family(
        "granite",
        "Granite 3.x (dense)",
        {"residual_multiplier": 0.5, "logits_scaling": 2.0, "embedding_multiplier": 4.0},
    ),
    Family("smollm3", "SmolLM3", {"no_rope_layer_interval": 2}),
    Family("starcoder2", "StarCoder2"),
    Family("cohere", "Command R"),
    Family("falcon", "Falcon 7B, 40B", {"ffn_hidden_size": 256}),
    Family("gpt2", "GPT-2, DistilGPT2", {"n_inner": 256}),
    Family("gptj", "GPT-J 6B", {"rotary_dim": 8, "n_inner": 256}),
    Family("gpt_neox", "Pythia, GPT-NeoX-20B"),
    # more dense families transformers ships, alphabetically
    Family("apertus", "Apertus"),
    Family("apertus1p5_text", "Apertus 1.5 (text)"),
    Family("arcee", "Arcee AFM"),
    Family("bloom", "BLOOM, BLOOMZ"),
    Family("codegen", "CodeGen", {"rotary_dim": 8, "n_inner": 256}),
    Family("cohere2", "Command R7B, Command A"),
    Family("ctrl", "CTRL"),
    Family("cwm", "Code World Model"),
    Family("diffllama", "DiffLlama"),
    Family("doge", "Doge (dense)"),
    Family("ernie4_5", "ERNIE 4.5 (dense)"),
    Family("exaone", "EXAONE 3.x"),
    Family("exaone4", "EXAONE 4"),
    Family("glm", "GLM-4 (0414 and earlier)"),
    Family("glm4", "GLM-4-0414"),
    Family("gpt-sw3", "GPT-SW3"),
    Family("gpt_bigcode", "StarCoder, SantaCoder"),
    Family("gpt_neox_japanese", "GPT-NeoX Japanese"),
    Family("granite_swa", "Granite (sliding window)"),
    Family("helium", "Helium", {"head_dim": 16}),
    Family("hyperclovax", "HyperCLOVA X SEED"),
    Family("internlm3", "InternLM3"),
    Family("iquestcoder", "IQuest-Coder"),
    Family("jais2", "Jais 2"),
    Family("minicpm3", "MiniCPM3", _LATENT_ATTENTION),
    Family("ministral3", "Ministral 3"),
    Family("mpt", "MPT"),
    Family("nanochat", "nanochat"),
    Family("nemotron", "Nemotron, Minitron"),
    Family("olmo", "OLMo"),
    Family("olmo3", "OLMo 3"),
    Family("persimmon", "Persimmon"),
    Family("seed_oss", "Seed-OSS"),
    Family("stablelm", "StableLM, Stable Code"),
    Family("vaultgemma", "VaultGemma"),
    Family("youtu", "Youtu-LLM", _LATENT_ATTENTION),
)


def family(model_type: str) -> Family:
    return next(f for f in FAMILIES if f.model_type == model_type)


def covered(model_type: str) -> bool:
    """Whether tests/engine/test_families.py checks this family."""
    return any(f.model_type == model_type for f in FAMILIES)


def tiny_config(entry: Family, vocab_size: int, pad_token_id: int, eos_token_id: int, **changes) -> PretrainedConfig:
    settings = {**TINY, **entry.config, **changes}
    ids = {"pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": eos_token_id}
    return AutoConfig.for_model(entry.model_type, vocab_size=vocab_size, **ids, **settings)


def tiny_model(
    entry: Family, vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int = 0, **changes
) -> PreTrainedModel:
    """A randomly initialised model of the family (float32, eval mode not set)."""
    config = tiny_config(entry, vocab_size, pad_token_id, eos_token_id, **changes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _after_projection(spec: ArchSpec) -> str:
    if spec.post_norm:
        return f"norm `{spec.post_norm}`: edits re-run the block"
    if spec.residual_scale_name:
        return f"added to the residual × `{spec.residual_scale_name}`"
    return "added to the residual"


def _logits(spec: ArchSpec) -> str:
    symbols = {"multiply": "× `{}`", "divide": "÷ `{}`", "softcap": "soft-capped by `{}`"}
    return ", ".join(symbols[op].format(name) for op, name, _ in spec.logit_ops) or "head only"


def markdown_table() -> str:
    """The design notes' supported-families table: the families grouped by what `arch_spec` finds in a tiny
    model of each (where the memory sits, what follows it, what the model does to the logits)."""
    groups: dict[tuple[str, str, str, str], list[Family]] = {}
    for entry in FAMILIES:
        spec = arch_spec(tiny_model(entry, vocab_size=256, pad_token_id=0, eos_token_id=0))
        layout = (
            f"`{spec.blocks}[i].{spec.projection}`",
            _after_projection(spec),
            f"`{spec.final_norm}`",
            _logits(spec),
        )
        groups.setdefault(layout, []).append(entry)
    rows = [
        "| FFN output projection (its input is a(x)) | after the projection | final norm | logits | families (`model_type`: checkpoints) |",
        "|---|---|---|---|---|",
    ]
    for (projection, after, final_norm, logits), entries in groups.items():
        families = "; ".join(f"`{e.model_type}`: {e.checkpoints}" for e in entries)
        rows.append(f"| {projection} | {after} | {final_norm} | {logits} | {families} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the design notes' supported-families table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table())
    else:
        for entry in FAMILIES:
            print(f"{entry.model_type}: {entry.checkpoints}")


if __name__ == "__main__":
    main()
