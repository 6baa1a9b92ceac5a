"""Presets are chosen by architecture and shape: the paper's models, built on the meta device from
transformers' own configs (no weights), get their published or best-reading values; anything else
gets the paper's ratios, and the choice says why."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig, MistralConfig

from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.families import family, tiny_model
from memoir_core.models import LoadedModel, prepare_model
from memoir_core.presets import RATIOS, ConfigOverrides, model_shape, recommended_config

LLAMA3_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256,
)  # fmt: skip
LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
MISTRAL_7B = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=32000)
GPTJ_6B = GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400)


def on_meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "config, name, layer",
    [
        (LLAMA3_8B, "LLaMA-3-8B", 27),
        (MISTRAL_7B, "Mistral-7B", 27),
        (LLAMA2_7B, "LLaMA-2-7B", 27),
        (GPTJ_6B, "GPT-J-6B", 21),
    ],
    ids=["llama3-8b", "mistral-7b", "llama2-7b", "gptj-6b"],
)
def test_the_papers_models_get_their_preset_by_shape(config, name, layer):
    chosen = recommended_config(model_shape(on_meta(config)))
    assert chosen.preset.name == name and "the shape of" in chosen.preset.reason
    assert (chosen.layer, chosen.top_k, chosen.threshold) == (layer, 4096, 0.4)
    assert (chosen.hyper.lr, chosen.hyper.max_iterations, chosen.hyper.weight_decay, chosen.hyper.decay) == (
        1.0,
        30,
        1e-5,
        "all",
    )
    assert chosen.hyper.protect is None


def test_explicit_edit_settings_win_over_the_preset_and_are_named():
    shape = model_shape(on_meta(LLAMA3_8B))
    assert recommended_config(shape).hyper.fit_iterations is None
    chosen = recommended_config(shape, ConfigOverrides(column_step="usage", fit_iterations=40))
    assert (chosen.hyper.column_step, chosen.hyper.fit_iterations) == ("usage", 40)
    assert "set explicitly: column_step, fit_iterations" in chosen.preset.reason
    with pytest.raises(ValueError, match="column_step must be one of"):
        recommended_config(shape, ConfigOverrides(column_step="both"))


def test_another_shape_gets_the_papers_ratios_and_says_why():
    llama3_with_more_blocks = LlamaConfig(**{**LLAMA3_8B.to_dict(), "num_hidden_layers": 40})
    shape = model_shape(on_meta(llama3_with_more_blocks))
    chosen = recommended_config(shape, lr=2.0)
    assert chosen.preset.name == RATIOS
    assert (chosen.layer, chosen.top_k) == (round(27 / 32 * 40), 4096)
    assert "no preset for llama, 40 blocks, hidden 4096, FFN width 14336" in chosen.preset.reason
    assert chosen.preset.reason.endswith("set explicitly: lr")
    assert chosen.hyper.lr == 2.0 and chosen.hyper.weight_decay == 1e-5 / 2.0


def test_the_shape_is_read_from_the_module_tree_also_under_an_installed_memory(tokenizer):
    model = tiny_model(family("gpt2"), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    before = model_shape(model)
    assert before == type(before)("gpt2", 3, 64, 256, len(tokenizer))
    engine = MemoirEngine(
        LoadedModel(prepare_model(model), tokenizer, "tiny"),
        MemoirConfig(),
        background_prompts=["a b"],
        context_templates=[],
    )
    assert model_shape(model) == before and engine.width == before.width
