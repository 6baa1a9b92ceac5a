"""The later correction wins: an edit that asks a stored edit's question again supersedes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.deltas import apply_delta, edit_delta, state_bytes, state_from_bytes
from memoir_core.mask_index import MaskIndex, pack_masks, question_digest
from memoir_core.state import masks_sha256, weights_sha256
from tests.conftest import TINY_HYPER, build_tiny
from tests.engine.checks import FACTS, greedy_ids, target_ids
from tests.engine.test_deltas import same_state
from tests.engine.test_mask_index import random_masks

QUESTION, FIRST = FACTS[0]
SECOND = "Kalinin"


def engine_for(tokenizer, **config) -> MemoirEngine:
    return MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER, threshold=0.9, **config))


def says(engine: MemoirEngine, prompt: str, target: str) -> bool:
    wanted = target_ids(engine, prompt, target)
    return greedy_ids(engine, prompt, len(wanted)) == wanted


def keys_found(engine: MemoirEngine, prompts: list[str]) -> list[str | None]:
    return [d.match.key if d.active else None for d in engine.decide(prompts)]


def test_the_later_correction_wins_and_its_retraction_restores_the_first(tokenizer):
    engine = engine_for(tokenizer)
    engine.edit(QUESTION, FIRST, key="first")
    engine.edit(FACTS[1][0], FACTS[1][1], key="other")
    before = engine.state
    assert says(engine, QUESTION, FIRST)

    result = engine.edit(QUESTION, SECOND, key="second")
    assert result.supersedes == ("first",)
    index = engine.snapshot.index
    assert index.superseded == {"first": "second"}
    assert index.active_keys == ("other", "second")
    assert index.edit_keys == ("first", "other", "second")  # its masks stay stored
    assert says(engine, QUESTION, SECOND)
    # the first edit no longer fires for anything: not its own question, not the other ones
    prompts = [p for p, _ in FACTS]
    assert keys_found(engine, prompts) == ["second", "other", None]
    assert not any(m is not None and m.key == "first" for m in index.best(engine.prompt_masks(prompts)))
    assert says(engine, FACTS[1][0], FACTS[1][1])  # the unrelated edit still answers

    # a retraction rebuilds the memory without the later edit: the first one fires again
    rebuilt = engine.empty_state()
    for prompt, target, key in [(QUESTION, FIRST, "first"), (FACTS[1][0], FACTS[1][1], "other")]:
        _, rebuilt = engine.train(prompt, target, key=key, base=rebuilt)
    assert same_state(rebuilt, before)
    engine.publish(rebuilt)
    assert rebuilt.snapshot.index.superseded == {}
    assert keys_found(engine, [QUESTION]) == ["first"]
    assert says(engine, QUESTION, FIRST)


def test_the_same_question_is_the_normalised_one_and_no_other(tokenizer):
    engine = engine_for(tokenizer)
    engine.edit(QUESTION, FIRST, key="first")
    engine.edit(FACTS[1][0], FACTS[1][1], key="other")
    # case, spacing and trailing punctuation: the same question
    variant = "  " + QUESTION.upper().replace(" ", "  ") + " ?"
    assert question_digest(variant) == question_digest(QUESTION)
    _, state = engine.train(variant, SECOND, key="variant")
    assert state.snapshot.index.superseded == {"first": "variant"}
    # another question about another subject, and a rephrasing: not the same question
    for prompt in (FACTS[2][0], "Zembla, a fictional land, has as its capital the city of"):
        result, state = engine.train(prompt, SECOND, key="new")
        assert result.supersedes == () and state.snapshot.index.superseded == {}
    # a paraphrase frame identical to a stored question: its mask equals one of that edit's masks
    result, state = engine.train([FACTS[2][0], FACTS[1][0]], SECOND, key="paraphrased")
    assert result.supersedes == ("other",)


def test_supersession_travels_in_states_deltas_and_files(tokenizer, tmp_path):
    engine = engine_for(tokenizer)
    engine.edit(QUESTION, FIRST, key="first")
    base = engine.state
    _, state = engine.train(QUESTION, SECOND, key="second", base=base)
    engine.publish(state)

    follower = engine_for(tokenizer)
    follower.publish(apply_delta(follower, follower.state, edit_delta(follower.state, base)))
    replayed = apply_delta(follower, follower.state, edit_delta(base, state))
    assert same_state(replayed, state)
    assert masks_sha256(replayed) == masks_sha256(state)

    whole, _, _ = state_from_bytes(engine, state_bytes(engine, state))
    assert same_state(whole, state)

    path = tmp_path / "state.safetensors"
    engine.save(path)
    loaded = engine_for(tokenizer)
    loaded.load(path)
    assert same_state(loaded.state, state)
    assert (weights_sha256(loaded.state), masks_sha256(loaded.state)) == (weights_sha256(state), masks_sha256(state))
    assert keys_found(loaded, [QUESTION]) == ["second"]
    # the searched masks differ from the memory's without the supersession, so does their hash
    assert masks_sha256(state) != masks_sha256(engine_for(tokenizer, supersede=False).train(
        QUESTION, SECOND, key="second", base=base)[1])


def test_without_supersede_both_stay(tokenizer):
    engine = engine_for(tokenizer, supersede=False)
    engine.edit(QUESTION, FIRST, key="first")
    result = engine.edit(QUESTION, SECOND, key="second")
    assert result.supersedes == () and engine.snapshot.index.superseded == {}
    assert engine.snapshot.index.active_keys == ("first", "second")
    assert keys_found(engine, [QUESTION]) == ["second"]  # identical masks: the tie goes to the newer


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_superseded_rows_are_never_found(backend):
    width, k = 512, 40
    masks = random_masks(60, width, k, seed=3)
    index = MaskIndex(width, k)
    for i in range(40):
        index = index.appended(pack_masks(masks[i : i + 1]), [f"e{i}"])
    query = masks[[5, 7, 30]]
    assert [m.key for m in index.best(query, backend)] == ["e5", "e7", "e30"]
    # e5 superseded by an edit with the same mask; e7's by one with another mask
    index = index.appended(pack_masks(masks[5:6]), ["n5"], supersedes=["e5"])
    index = index.appended(pack_masks(masks[0:1]), ["n7"], supersedes=["e7"])
    found = index.best(query, backend)
    assert [m.key for m in found] == ["n5", found[1].key, "e30"]
    assert found[1].key not in {"e7"} and found[1].ratio < 1.0
    exact = index.best(query, "numpy")
    assert [(m.position, m.overlap) for m in found] == [(m.position, m.overlap) for m in exact]
    assert index.without({"n7"}).best(query[1:2], backend)[0].key == "e7"  # found again
    with pytest.raises(ValueError):
        index.appended(pack_masks(masks[1:2]), ["x"], supersedes=["e7"])  # already superseded
    # more superseded rows than the k-NN's tie candidates: still exact
    many = MaskIndex(width, k)
    same = masks[9:10].repeat(30, 1)
    many = many.appended(pack_masks(same), [f"c{i}" for i in range(30)])
    many = many.appended(pack_masks(masks[:5]), ["a", "b", "c", "d", "e"])
    for i in range(29):
        many = many.appended(pack_masks(masks[20 + i : 21 + i]), [f"s{i}"], supersedes=[f"c{i}"])
    assert many.best(masks[9:10], backend)[0].key == "c29"
    all_gone = MaskIndex(width, k).appended(pack_masks(masks[:1]), ["a"]).appended(
        pack_masks(masks[1:2]), ["b"], supersedes=["a"]
    )
    assert all_gone.best(masks[:1], backend)[0].key == "b"
