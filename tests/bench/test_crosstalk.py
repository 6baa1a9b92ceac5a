"""bench.crosstalk: the keys it reads from a model and the cross-talk sums it reports."""

from __future__ import annotations

import pytest
import torch

from bench.crosstalk import accumulated, protected_updates, target_keys
from memoir_core import MemoirConfig, MemoirEngine
from tests.conftest import TINY_HYPER, build_tiny

TEXTS = ["The capital of the fictional land of Zembla is Vostok", "The glass harmonica was invented by Marie Curie"]


def test_target_keys_average_the_positions_that_predict_the_target_with_padding_excluded(tokenizer):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER))
    starts = [3, 5]
    seen = []
    hook = engine.memory.projection.register_forward_hook(lambda module, args, output: seen.append(args[0][0]))
    try:
        batched = target_keys(engine, TEXTS, starts)  # one left-padded batch of both texts
        alone = [target_keys(engine, [text], [start])[0] for text, start in zip(TEXTS, starts)]
    finally:
        hook.remove()
    activations = seen[-2:]  # each text alone, [T, D]
    for key, single, acts, start in zip(batched, alone, activations, starts):
        expected = acts[start:-1].float().mean(dim=0)  # positions start .. len-2 predict the tokens after them
        torch.testing.assert_close(single, expected)
        torch.testing.assert_close(key, expected, rtol=1e-4, atol=1e-5)


def test_crosstalk_is_zero_for_disjoint_masks_and_one_per_edit_for_identical_ones():
    keys = torch.randn(3, 8)
    disjoint = torch.zeros(3, 8)
    for row in range(3):
        disjoint[row, 2 * row : 2 * row + 2] = 1.0
    result = accumulated(keys, disjoint, old=1, paraphrase_keys=keys)
    assert result["root_sum_squares"] == 0.0 and result["sum"] == 0.0
    assert result["paraphrase_reach"] == pytest.approx(1.0)  # a paraphrase with the edit's own key

    same = keys[:1].repeat(3, 1)
    result = accumulated(same, disjoint[:1].repeat(3, 1), old=1, paraphrase_keys=same)
    # each of the two later edits writes at the first edit's key exactly what it writes at its own
    assert result["mean_ratio"] == pytest.approx(1.0)
    assert result["root_sum_squares"] == pytest.approx(2**0.5)
    assert result["sum"] == pytest.approx(2.0)


def test_protected_updates_leave_the_first_edit_alone_and_steer_later_ones_off_stored_keys():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(4, 16, generator=generator)
    keys[1:] += 3 * keys[0]  # later keys lean on the first one, as this model's keys do
    masks = torch.ones(4, 16)
    plain = accumulated(keys, masks, old=1, paraphrase_keys=keys)
    updates = protected_updates(keys, masks, ridge=1e-4)
    torch.testing.assert_close(updates[0], keys[0])  # nothing stored yet: the plain step
    protected = accumulated(keys, masks, old=1, paraphrase_keys=keys, updates=updates)
    assert protected["root_sum_squares"] < 0.1 * plain["root_sum_squares"]
    assert torch.allclose(protected_updates(keys, masks, ridge=1e6), keys, rtol=1e-3, atol=1e-3)  # no steering
