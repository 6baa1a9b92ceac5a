"""Every model family in memoir_core/families.py, as a tiny random model built from transformers'
own config class, passes the engine's checks; mixture-of-experts models are refused with the
reason; the families table in docs/design.md is the one the family list generates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import re

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from memoir_core import MemoirConfig, MemoirEngine, Prompt
from memoir_core.arch import UnsupportedArchitecture
from memoir_core.arch_check import check_fast_path
from memoir_core.families import FAMILIES, Family, covered, family, markdown_table, tiny_model
from memoir_core.models import LoadedModel, prepare_model, prepare_tokenizer
from tests.conftest import TINY_HYPER
from tests.engine.checks import (
    FACTS,
    UNRELATED,
    assert_kv_cache_equals_recompute,
    assert_memory_off_is_bitwise,
    assert_padded_batch_decides_like_single_rows,
    assert_same_edit,
    assert_same_memory,
    base_logits,
    greedy_ids,
    target_ids,
)

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
# the middle of three blocks: the fast path re-runs the block above and narrows its feed-forward
LAYER = 1
LONG = "In the long and winding history of English theatre, who wrote the tragedy Hamlet?"
SHORT = "Who wrote Hamlet?"
BACKGROUND = ["The weather today is", "I like to read books about", "Our train leaves at", "Green tea tastes of"]
TEMPLATES = ["I am", "Because of this, you"]  # context prefixes of different lengths: padded edit rows
# 5 steps keep the two paths' trajectories within rounding of each other; the flip needs more
COMPARED = replace(TINY_HYPER, max_iterations=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on one thread, and far faster when other processes share the
    cores (two threads then wait on each other at every small matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whole words of the texts used here, padded to 512 ids: a vocabulary this small makes the
    head and the loss cheap, so that all families fit in about a minute."""
    texts = [f"{p} {t}" for p, t in FACTS] + UNRELATED + BACKGROUND + TEMPLATES + [LONG, SHORT]
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)})
    specials = ["<pad>", "<eos>", "<unk>"]
    filler = [f"w{i}" for i in range(512 - len(specials) - len(words))]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(specials + words + filler)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return prepare_tokenizer(
        PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    )


def engine_on(loaded: LoadedModel, hyper, fast_edit: bool = True) -> MemoirEngine:
    config = MemoirConfig(layer=LAYER, threshold=0.99, fast_edit=fast_edit, hyper=hyper)
    return MemoirEngine(loaded, config, background_prompts=BACKGROUND, context_templates=TEMPLATES)


@pytest.mark.parametrize("entry", FAMILIES, ids=lambda entry: entry.model_type)
def test_family_passes_the_engine_checks(entry, word_tokenizer):
    tokenizer = word_tokenizer
    model = tiny_model(entry, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    loaded = LoadedModel(prepare_model(model), tokenizer, f"tiny-{entry.model_type}")
    texts = [prompt for prompt, _ in FACTS] + UNRELATED
    base = base_logits(loaded, texts)
    # engines on one model share the memory the first installs; each publishes its own state
    fast, reference = engine_on(loaded, COMPARED), engine_on(loaded, COMPARED, fast_edit=False)
    assert fast.fast_path.usable and fast.fast_path.additive == fast.arch.additive

    for prompt, target in FACTS:
        assert_same_edit(fast.edit(prompt, target), reference.edit(prompt, target))
    assert_same_memory(fast, reference)
    assert_memory_off_is_bitwise(fast, texts, base, edited=len(FACTS))
    assert_kv_cache_equals_recompute(fast, [FACTS[0][0], *UNRELATED], active=[True, False, False])
    assert_padded_batch_decides_like_single_rows(fast, [LONG, FACTS[1][0], SHORT, FACTS[0][0]])
    # a question behind a preamble the memory does not reach, as a chat frame's template: the fast
    # path runs the upper blocks from the question on where the check found that exact
    behind = Prompt(f"{LONG} {FACTS[2][0]}", feature_start=len(LONG) + 1)
    assert_same_edit(fast.edit(behind, FACTS[2][1]), reference.edit(behind, FACTS[2][1]))
    assert_same_memory(fast, reference)

    flipping = engine_on(loaded, TINY_HYPER)
    for prompt, target in FACTS:
        wanted = target_ids(flipping, prompt, target)
        assert greedy_ids(flipping, prompt, len(wanted)) != wanted
        flipping.edit(prompt, target)
        assert greedy_ids(flipping, prompt, len(wanted)) == wanted


@pytest.mark.parametrize(
    "model_type, changes",
    [
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}),
        ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 16}),
        # dense first block, experts above it
        ("deepseek_v3", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
                         "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                         "qk_nope_head_dim": 8, "v_head_dim": 16}),
    ],
)  # fmt: skip
def test_a_mixture_of_experts_is_refused_with_the_reason(model_type, changes, word_tokenizer):
    tokenizer = word_tokenizer
    model = tiny_model(
        Family(model_type, ""), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, **changes
    )
    with pytest.raises(
        UnsupportedArchitecture, match=rf"model_type '{model_type}': block \d+'s feed-forward .* mixture of experts"
    ):
        MemoirEngine(LoadedModel(prepare_model(model), tokenizer, f"tiny-{model_type}"))


@pytest.mark.parametrize(
    "model_type, state", [("bamba", "linear_attention"), ("falcon_h1", "hybrid"), ("xlstm", "xLSTMLayer")]
)
def test_a_block_with_recurrent_state_is_refused_with_the_reason(model_type, state, word_tokenizer):
    tokenizer = word_tokenizer
    model = tiny_model(Family(model_type, ""), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    with pytest.raises(
        UnsupportedArchitecture,
        match=rf"model_type '{model_type}': block 0 keeps a state other than attention .*{state}",
    ):
        MemoirEngine(LoadedModel(prepare_model(model), tokenizer, f"tiny-{model_type}"))


def tiny_loaded(model_type: str, tokenizer) -> LoadedModel:
    entry = family(model_type) if covered(model_type) else Family(model_type, "")
    model = tiny_model(entry, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return LoadedModel(prepare_model(model), tokenizer, f"tiny-{model_type}")


@pytest.mark.parametrize(
    "model_type, wrong, usable, additive, note",
    [
        ("gemma2", {"post_norm": None}, True, False, "does not grow by 1 x"),  # its post-FFN norm missed
        ("granite", {"residual_scale": 1.0}, True, False, "does not grow by 1 x"),  # the tiny one scales by 0.5
        ("cohere", {"logit_ops": ()}, False, True, "do not reproduce the model's logits"),  # logit_scale missed
    ],
    ids=["post-norm", "residual-scale", "logit-scale"],
)
def test_the_check_on_the_loaded_model_catches_what_discovery_got_wrong(
    model_type, wrong, usable, additive, note, word_tokenizer
):
    loaded = tiny_loaded(model_type, word_tokenizer)
    engine = engine_on(loaded, COMPARED)
    ids = word_tokenizer(LONG)["input_ids"]
    check = check_fast_path(loaded.model, replace(engine.arch, **wrong), engine.blocks, LAYER, engine.memory, ids)
    assert (check.usable, check.additive) == (usable, additive)
    assert len(check.notes) == 1 and note in check.notes[0]


def test_a_looped_model_edits_through_the_reference_loop(word_tokenizer):
    """Dory runs some blocks several times a forward pass: the fast path cannot re-run "the blocks
    above" once each, so edits take the reference loop, whatever fast_edit says."""
    loaded = tiny_loaded("dory", word_tokenizer)
    fast, reference = engine_on(loaded, COMPARED), engine_on(loaded, COMPARED, fast_edit=False)
    assert not fast.fast_path.usable and "do not run once each" in fast.fast_path.notes[0]
    assert fast.edit(*FACTS[0]).losses == reference.edit(*FACTS[0]).losses
    assert torch.equal(fast.master_weight, reference.master_weight)


def test_design_notes_families_table_is_the_generated_one():
    table = markdown_table()
    assert table in DESIGN.read_text(encoding="utf-8"), "regenerate it: python -m memoir_core.families --markdown"
    assert all(f"`{entry.model_type}`: " in table for entry in FAMILIES)
