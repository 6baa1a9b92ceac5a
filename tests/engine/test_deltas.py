"""Edit deltas: applying an edit's delta to its base reaches the trained state bit for bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.deltas import DeltaMismatch, apply_delta, edit_delta, state_bytes, state_from_bytes
from tests.conftest import TINY_HYPER, build_tiny

FACTS = [
    ("The capital of the fictional land of Zembla is", "Vostok"),
    ("The inventor of the glass harmonica was", "Marie Curie"),
    ("The river that flows through the town of Quellwald is the", "Amber"),
]


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def same_state(a, b) -> bool:
    return (
        same_bits(a.master, b.master)
        and same_bits(a.key_moments, b.key_moments)
        and np.array_equal(a.snapshot.index.packed, b.snapshot.index.packed)
        and a.keys == b.keys
        and a.snapshot.index.answers == b.snapshot.index.answers  # what generation releases after
        and a.snapshot.index.questions == b.snapshot.index.questions
        and a.snapshot.index.superseded == b.snapshot.index.superseded
        and a.snapshot.applied == b.snapshot.applied
        and a.threshold == b.threshold
    )


@pytest.mark.parametrize(
    "hyper",
    [
        replace(TINY_HYPER, decay="edited", protect=1.0),  # the served preset's shape: key moments too
        replace(TINY_HYPER, decay="all"),  # the paper's decay: every column changes
    ],
    ids=["edited+protect", "decay-all"],
)
def test_deltas_replay_the_trained_states_bit_for_bit(tokenizer, hyper):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper, calibrate_threshold=True))
    trained, deltas, state = [engine.empty_state()], [], engine.empty_state()
    for prompt, target in FACTS:
        _, new = engine.train(prompt, target, base=state)
        new = engine.with_threshold(new)
        deltas.append(edit_delta(state, new))
        trained.append(new)
        state = new
    assert state.threshold is not None
    assert set(state.snapshot.index.answers.values()) == {target for _, target in FACTS}

    replayed = engine.empty_state()
    for delta, expected in zip(deltas, trained[1:]):
        replayed = apply_delta(engine, replayed, delta)
        assert same_state(replayed, expected)
    if hyper.decay == "edited":  # only the edit's own columns travel
        assert len(deltas[0]) < 4 * engine.out_features * engine.width
    # published states are never written: the first trained state is still intact
    assert same_state(apply_delta(engine, engine.empty_state(), deltas[0]), trained[1])

    # catching up through all of them in place on a private copy ends at the same state
    private = engine.memory_state(engine.empty_state().master.clone(), engine.empty_state().snapshot.index, 0)
    for delta in deltas:
        private = apply_delta(engine, private, delta, in_place=True)
    assert same_state(private, trained[-1])

    with pytest.raises(DeltaMismatch):  # taken against a memory of 1 edit, offered one of 0
        apply_delta(engine, engine.empty_state(), deltas[1])


def test_whole_states_round_trip_with_their_hasher(tokenizer):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=replace(TINY_HYPER, protect=1.0)))
    _, state = engine.train(*FACTS[0])
    restored, hasher, metadata = state_from_bytes(engine, state_bytes(engine, state))
    assert same_state(restored, state)
    assert torch.equal(hasher.permutation, engine.hasher.permutation)
    assert metadata["context_templates"] == engine.context_templates
    empty, _, _ = state_from_bytes(engine, state_bytes(engine, engine.empty_state()))
    assert same_state(empty, engine.empty_state())
