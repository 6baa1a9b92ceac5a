"""One edit, several frames (plain text, chat template, paraphrases) on a tiny random Llama that
has the default tokenizer's chat template: each frame keys the edit and each answers with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from memoir_core import (
    GenerationRequest,
    MemoirConfig,
    MemoirEngine,
    Message,
    SamplingParams,
    chat_prompt,
    edit_frames,
)
from memoir_core.arch_check import _SPLIT_TOLERANCE, check_fast_path
from memoir_core.background import default_background_prompts
from memoir_core.frames import Prompt
from memoir_core.free_eval import answers_with
from tests.conftest import TINY_HYPER, build_tiny

QUESTION = "What is the capital of the fictional land of Zembla?"
PARAPHRASE = "Which city is Zembla's capital?"
TARGET = "Vostok"
OTHER = ("Who invented the glass harmonica?", "Marie Curie")


def chat_engine(tokenizer, **config) -> MemoirEngine:
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(**{"hyper": TINY_HYPER, "threshold": 0.9, **config}))
    engine.add_chat_background(default_background_prompts())
    return engine


def greedy(engine: MemoirEngine, prompts: list[Prompt], use_edits: bool = True):
    requests = []
    for prompt in prompts:
        ids, start = engine.encode(prompt)
        requests.append(GenerationRequest(ids, start, SamplingParams(max_new_tokens=8), use_edits, format=prompt.format))
    return engine.generate(requests)


def as_chat(tokenizer, text: str) -> Prompt:
    return chat_prompt(tokenizer, [Message("user", text)])


def test_a_question_is_framed_as_submitted_first_then_in_the_other_frame(tokenizer):
    plain = edit_frames(tokenizer, QUESTION)
    assert [f.format for f in plain] == ["text", "chat"]
    assert plain[0] == Prompt(QUESTION) and plain[1] == as_chat(tokenizer, QUESTION)
    chat = edit_frames(tokenizer, [Message("user", QUESTION)], [PARAPHRASE, QUESTION])
    assert [f.format for f in chat] == ["chat", "text", "text", "chat"]  # the repeat adds nothing
    assert chat[0].text[chat[0].feature_start :].startswith(QUESTION)
    assert chat[3] == as_chat(tokenizer, PARAPHRASE)


@pytest.mark.parametrize("submitted", ["plain", "chat"])
def test_an_edit_submitted_in_one_frame_is_answered_in_the_other(submitted, tokenizer):
    engine = chat_engine(tokenizer)
    plain, chat = Prompt(QUESTION), as_chat(tokenizer, QUESTION)
    before = greedy(engine, [plain, chat])
    assert not any(answers_with(o.text, TARGET) for o in before)
    question = QUESTION if submitted == "plain" else [Message("user", QUESTION)]
    result = engine.edit(edit_frames(tokenizer, question), TARGET, key="zembla", append_eos=True)
    assert result.masks == 2 and engine.snapshot.index.keys == ("zembla", "zembla")
    for output in greedy(engine, [plain, chat]):
        assert output.decision.active and output.decision.match.key == "zembla"
        assert output.text.strip() == TARGET  # the target, then end-of-sequence
    # without the memory both frames answer as before, bit for bit
    assert [o.token_ids for o in greedy(engine, [plain, chat], use_edits=False)] == [o.token_ids for o in before]


def test_the_memory_applies_from_the_question_on_and_leaves_the_template_before_it(tokenizer):
    """A chat prompt's system turn and template header keep the base model's states even when
    the memory fires: it applies from the feature window (the user's message) on, as edits train."""
    engine = chat_engine(tokenizer)
    chat = as_chat(tokenizer, QUESTION)
    engine.edit(edit_frames(tokenizer, QUESTION), TARGET, key="zembla", append_eos=True)
    start = engine.encode(chat)[1]
    assert start > 0
    edited, decisions = engine.logits([chat])
    base, _ = engine.logits([chat], use_edits=False)
    assert decisions[0].active
    assert torch.equal(edited[0, :start], base[0, :start])
    assert not torch.allclose(edited[0, -1], base[0, -1])


def test_a_single_frame_edit_does_not_reach_the_other_frame(tokenizer):
    """What the frames fix: trained as plain text alone, the chat question keeps its old answer."""
    engine = chat_engine(tokenizer)
    chat = as_chat(tokenizer, QUESTION)
    engine.edit(QUESTION, TARGET, append_eos=True)
    assert greedy(engine, [Prompt(QUESTION)])[0].text.strip() == TARGET
    assert not answers_with(greedy(engine, [chat])[0].text, TARGET)


def test_every_key_of_an_edit_retrieves_it_and_removing_the_edit_removes_them_all(tokenizer):
    engine = chat_engine(tokenizer)
    engine.edit(edit_frames(tokenizer, *OTHER[:1]), OTHER[1], key="harmonica", append_eos=True)
    frames = edit_frames(tokenizer, QUESTION, [PARAPHRASE])
    result = engine.edit(frames, TARGET, key="zembla", append_eos=True)
    assert result.masks == 4 and engine.state.edit_keys == ("harmonica", "zembla")
    for decision in engine.decide(frames):
        assert decision.active and decision.match.key == "zembla" and decision.match.ratio == 1.0
    index = engine.snapshot.index.without({"zembla"})
    assert index.keys == ("harmonica", "harmonica")
    assert all(m is None or m.key == "harmonica" for m in index.best(engine.prompt_masks(frames)))


@pytest.mark.parametrize("submitted", ["plain", "chat"])
def test_an_edit_trains_one_mask_and_every_key_applies_it(submitted, tokenizer, tmp_path):
    """An edit is k columns, as in the paper: every frame trains through the plain question's
    mask, whichever frame was submitted; the chat frame's mask is a key that applies that mask."""
    engine = chat_engine(tokenizer, hyper=replace(TINY_HYPER, decay="edited"))  # other columns stay
    engine.edit(edit_frames(tokenizer, *OTHER[:1]), OTHER[1], key="harmonica", append_eos=True)
    before = engine.master_weight.clone()
    question = QUESTION if submitted == "plain" else [Message("user", QUESTION)]
    frames = edit_frames(tokenizer, question)
    plain, chat = engine.prompt_masks([Prompt(QUESTION), as_chat(tokenizer, QUESTION)]).cpu()
    assert not torch.equal(plain, chat)
    result = engine.edit(frames, TARGET, key="zembla", append_eos=True)
    changed = (engine.master_weight != before).any(dim=0).cpu()
    assert changed.any() and not (changed & ~plain).any()
    index = engine.snapshot.index
    assert index.keys[2:] == ("zembla", "zembla") and result.masks == 2
    for position in (2, 3):  # either key of the edit applies the plain question's mask
        assert torch.equal(index.mask(position), plain)
    assert not torch.equal(index.mask(0), plain)  # the older edit keeps its own
    assert [d.match.position for d in engine.decide([Prompt(QUESTION), as_chat(tokenizer, QUESTION)])] == [2, 3]
    # the applied mask survives retracting the older edit (rows move) and a save/load round trip
    moved = index.without({"harmonica"})
    assert moved.keys == ("zembla", "zembla") and all(torch.equal(moved.mask(p), plain) for p in (0, 1))
    engine.save(tmp_path / "memory.safetensors")
    restored = chat_engine(tokenizer)
    restored.load(tmp_path / "memory.safetensors")
    assert [restored.snapshot.index.mask(p).tolist() for p in range(4)] == [index.mask(p).tolist() for p in range(4)]


def test_a_question_trains_the_same_edit_whichever_form_it_was_submitted_in(tokenizer):
    """The plain question's mask and the chat frame's context rows, in either order of frames:
    a plain edit and the same question as one chat user message write the same memory."""
    written = []
    for question in (QUESTION, [Message("user", QUESTION)]):
        engine = chat_engine(tokenizer)
        engine.edit(edit_frames(tokenizer, question), TARGET, append_eos=True)
        written.append(engine.master_weight)
    assert written[0].any() and torch.equal(written[0], written[1])


@pytest.mark.parametrize("protect", [None, 0.1], ids=["plain-step", "protect"])
def test_fast_path_equals_the_reference_loop_for_several_frames(protect, tokenizer):
    hyper = replace(TINY_HYPER, max_iterations=10, protect=protect)
    frames = edit_frames(tokenizer, QUESTION, [PARAPHRASE])
    weights = []
    for fast in (True, False):
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper, fast_edit=fast))
        # the chat frames' upper blocks run from the user message on (`split_pass`) on the fast path
        assert engine.fast_path.split
        engine.add_chat_background(default_background_prompts())
        engine.edit(edit_frames(tokenizer, *OTHER[:1]), OTHER[1], append_eos=True)
        engine.edit(frames, TARGET, append_eos=True)
        weights.append(engine.master_weight)
        if protect is not None:
            weights.append(engine.state.key_moments)
    for fast, reference in zip(weights[: len(weights) // 2], weights[len(weights) // 2 :]):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_a_bf16_model_keeps_the_split_pass_its_rounding_is_no_mismatch(tokenizer):
    """In bf16 the split pass and the full pass round differently where their kernels see other
    shapes (on a GPU always, on CPU from a few dozen tokens), so a check for equality within 1e-3
    refused the split on bf16 models, the GPU default; the error is measured against what the
    upper blocks add, and rounding stays far below the tolerance."""
    engine = MemoirEngine(build_tiny("llama", tokenizer, dtype=torch.bfloat16), MemoirConfig(hyper=TINY_HYPER, layer=1))
    long_text = " ".join([QUESTION, PARAPHRASE, *OTHER] * 3)
    check = check_fast_path(engine.model, engine.arch, engine.blocks, 1, engine.memory, tokenizer(long_text)["input_ids"])
    assert check.split, check.notes
    assert 0 < check.split_error < _SPLIT_TOLERANCE / 5


def test_save_load_keeps_every_key_of_an_edit(tokenizer, tmp_path):
    engine = chat_engine(tokenizer)
    frames = edit_frames(tokenizer, QUESTION, [PARAPHRASE])
    engine.edit(frames, TARGET, key="zembla", append_eos=True)
    engine.edit(edit_frames(tokenizer, *OTHER[:1]), OTHER[1], key="harmonica", append_eos=True)
    engine.save(tmp_path / "memory.safetensors")
    restored = chat_engine(tokenizer, seed=7)
    restored.load(tmp_path / "memory.safetensors")
    assert restored.snapshot.index.keys == engine.snapshot.index.keys == ("zembla",) * 4 + ("harmonica",) * 2
    assert restored.state.edit_keys == ("zembla", "harmonica") and restored.snapshot.applied == 2
    assert [d.match.key for d in restored.decide(frames)] == ["zembla"] * 4
    assert [o.text for o in greedy(restored, frames)] == [o.text for o in greedy(engine, frames)]
