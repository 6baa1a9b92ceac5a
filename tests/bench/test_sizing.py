"""bench.sizing: its figures are the sizes of the tensors an engine holds, and the sizing table
in docs/performance.md is the one it computes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from bench.sizing import report, sizes
from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.families import family, tiny_model
from memoir_core.models import LoadedModel, prepare_model
from tests.conftest import TINY_HYPER

PERFORMANCE = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def test_the_computed_sizes_are_those_of_the_engines_tensors(tokenizer):
    model = tiny_model(family("llama"), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).to(
        torch.bfloat16
    )
    config = MemoirConfig(layer=1, hyper=replace(TINY_HYPER, protect=1.0, max_iterations=2))
    engine = MemoirEngine(
        LoadedModel(prepare_model(model), tokenizer, "tiny"), config, background_prompts=["a b c"], context_templates=[]
    )
    engine.edit("The capital of the fictional land of Zembla is", "Vostok")
    state = engine.state
    computed = sizes(model, torch.bfloat16, engine.layer, engine.top_k)
    assert computed.model == sum(p.numel() * p.element_size() for p in model.parameters())
    assert computed.master == state.master.numel() * state.master.element_size()
    assert computed.served == state.snapshot.weight.numel() * state.snapshot.weight.element_size() > 0
    assert computed.key_moments == state.key_moments.numel() * state.key_moments.element_size()
    assert computed.mask == state.snapshot.index.packed[0].nbytes


def test_the_documented_sizing_table_is_the_computed_one():
    assert report() in PERFORMANCE.read_text(encoding="utf-8"), "regenerate it: python -m bench.sizing"
