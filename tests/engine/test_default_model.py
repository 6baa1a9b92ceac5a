"""The engine on the embedded SmolLM2 model: one edit changes the greedy answer, nothing else."""

from __future__ import annotations

from dataclasses import replace

import torch

from memoir_core import EditHyperParams, GenerationRequest, MemoirConfig, MemoirEngine, SamplingParams
from memoir_core.presets import model_shape, recommended_config

EDIT = ("The Eiffel Tower is located in the city of", "Rome")
UNRELATED = ["The capital of Japan is", "The largest planet in the solar system is"]


def greedy(engine: MemoirEngine, prompts: list[str], tokens: int = 6):
    requests = [
        GenerationRequest(engine.tokenizer(p)["input_ids"], params=SamplingParams(max_new_tokens=tokens)) for p in prompts
    ]
    return engine.generate(requests)


def test_the_embedded_model_keeps_its_sweep_chosen_preset(default_loaded):
    chosen = recommended_config(model_shape(default_loaded.model))
    assert chosen.preset.name == "SmolLM2-135M"
    assert chosen.preset.reason.startswith("llama, 30 blocks, hidden 576, FFN width 1536, vocabulary 49152: the shape of")
    expected = EditHyperParams(lr=40.0, weight_decay=1e-5 / 40.0, decay="edited", protect=1.0)
    assert replace(chosen, preset=None) == MemoirConfig(layer=25, top_k=77, threshold=0.4, hyper=expected)


def test_one_edit_changes_the_answer_and_leaves_an_unrelated_one(default_loaded):
    engine = MemoirEngine(default_loaded, recommended_config(model_shape(default_loaded.model)))
    before = greedy(engine, [EDIT[0], *UNRELATED])
    assert "Rome" not in before[0].text

    result = engine.edit(*EDIT)
    assert result.loss < 0.1

    after = greedy(engine, [EDIT[0], *UNRELATED])
    assert after[0].text.strip().startswith("Rome")
    assert after[0].decision.active and after[0].decision.match.ratio == 1.0
    for old, new in zip(before[1:], after[1:]):
        assert not new.decision.active
        assert new.token_ids == old.token_ids


def test_the_preset_keeps_key_moments_and_protect_zero_turns_protection_off(default_loaded):
    """The default model's preset steers edits off stored keys, so its memory carries their key
    moments; `protect=0` (MEMOIR_EDIT_PROTECT=0, --protect 0) gives the paper's plain step."""
    # a few steps are enough to store key moments and compare the two memories
    short = dict(max_iterations=4, fit_iterations=0)
    protected = MemoirEngine(default_loaded, recommended_config(model_shape(default_loaded.model), **short))
    plain = MemoirEngine(
        default_loaded,
        recommended_config(model_shape(default_loaded.model), protect=0, **short),
        context_templates=protected.context_templates,  # the same base model writes the same ones
    )
    assert plain.config.hyper.protect is None
    for engine in (protected, plain):
        engine.edit(*EDIT)
    moments = protected.state.key_moments
    assert moments is not None and moments.abs().sum() > 0
    assert plain.state.key_moments is None
    # the first edit has no stored keys to steer off, so both train the same memory
    assert torch.equal(protected.state.master, plain.state.master)
