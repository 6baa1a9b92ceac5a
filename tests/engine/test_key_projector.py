"""The key projector router: edits found by cosine of projected keys, stored and applied by masks."""

from __future__ import annotations

import pytest
import torch

from memoir_core import MemoirConfig, MemoirEngine
from memoir_core.deltas import DeltaMismatch, apply_delta, edit_delta, state_bytes, state_from_bytes
from memoir_core.key_projector import load_projector, packaged_projector, save_projector, train_projector
from memoir_core.state import StateMismatch, masks_sha256, weights_sha256
from tests.conftest import TINY_HYPER, build_tiny
from tests.engine.checks import FACTS, greedy_ids, target_ids
from tests.engine.test_deltas import same_state

unit = torch.nn.functional.normalize


def projector_file(tmp_path, engine: MemoirEngine, seed: int = 0):
    """A random projector for this tiny model (no training data here: routing, not its quality)."""
    weight = torch.randn(engine.width, 32, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"projector-{seed}.safetensors"
    save_projector(path, weight, engine.weights_fingerprint, "test")
    return path


def engine_for(tokenizer, **config) -> MemoirEngine:
    return MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER, threshold=0.9, **config))


def test_edits_are_found_by_router_keys_and_answered_through_their_masks(tokenizer, tmp_path):
    plain = engine_for(tokenizer)
    path = projector_file(tmp_path, plain)
    engine = engine_for(tokenizer, key_projector=str(path))
    assert engine.layout.router == load_projector(path).digest and plain.layout.router is None
    for i, (prompt, target) in enumerate(FACTS):
        engine.edit(prompt, target, key=f"e{i}")
    index = engine.snapshot.index
    assert index.router.shape == (len(index), 32)
    # each edit prompt finds its own edit at cosine 1 (its own stored key), and answers its target
    decisions = engine.decide([p for p, _ in FACTS])
    assert [d.match.key for d in decisions] == [f"e{i}" for i in range(len(FACTS))]
    assert all(abs(d.match.ratio - 1.0) < 1e-5 and d.active for d in decisions)
    for prompt, target in FACTS:
        wanted = target_ids(engine, prompt, target)
        assert greedy_ids(engine, prompt, len(wanted)) == wanted
    # the match is by cosine of the projected keys, not by mask overlap
    probe = "An unrelated remark about the weather"
    query = engine.features.prompt_keys([probe])[1]
    assert engine.decide([probe])[0].match.ratio == pytest.approx((query @ torch.from_numpy(index.router).T).max().item(), abs=1e-5)
    # calibrated tau is the background prompts' best cosine plus the margin
    assert 0.0 < engine.calibrated_threshold(index) <= 1.0


def test_router_keys_travel_in_states_deltas_and_files_and_a_mismatch_is_refused(tokenizer, tmp_path):
    plain = engine_for(tokenizer)
    path = projector_file(tmp_path, plain)
    engine = engine_for(tokenizer, key_projector=str(path))
    engine.edit(*FACTS[0], key="first")
    base = engine.state
    _, state = engine.train(*FACTS[1], key="second", base=base)
    engine.publish(state)

    replayed = apply_delta(engine, base, edit_delta(base, state))
    assert same_state(replayed, state) and (replayed.snapshot.index.router == state.snapshot.index.router).all()
    whole, _, _ = state_from_bytes(engine, state_bytes(engine, state))
    assert (whole.snapshot.index.router == state.snapshot.index.router).all()

    file = tmp_path / "state.safetensors"
    engine.save(file)
    again = engine_for(tokenizer, key_projector=str(path))
    again.load(file)
    assert (weights_sha256(again.state), masks_sha256(again.state)) == (weights_sha256(state), masks_sha256(state))
    assert [d.match.key for d in again.decide([FACTS[0][0], FACTS[1][0]])] == ["first", "second"]
    # a memory routed by one rule cannot be served by another: its keys cannot be made again
    with pytest.raises(StateMismatch, match="key projector"):
        plain.load(file)
    other = engine_for(tokenizer, key_projector=str(projector_file(tmp_path, plain, seed=1)))
    with pytest.raises(StateMismatch, match="key projector"):
        other.load(file)
    plain.edit(*FACTS[0])
    plain.save(tmp_path / "masks.safetensors")
    with pytest.raises(StateMismatch, match="TopHash masks"):
        engine.load(tmp_path / "masks.safetensors")


def test_superseded_and_retracted_edits_are_not_found_by_the_router(tokenizer, tmp_path):
    engine = engine_for(tokenizer, key_projector=str(projector_file(tmp_path, engine_for(tokenizer))))
    engine.edit(*FACTS[0], key="first")
    engine.edit(*FACTS[1], key="other")
    engine.edit(FACTS[0][0], "Kalinin", key="second")  # the same question again
    assert engine.snapshot.index.superseded == {"first": "second"}
    assert [d.match.key for d in engine.decide([FACTS[0][0], FACTS[1][0]])] == ["second", "other"]
    without = engine.snapshot.index.without({"second"})
    assert without.router.shape[0] == len(without)
    keys = engine.features.prompt_keys([FACTS[0][0]])[1]
    assert without.best_by_router(keys)[0].key == "first"  # found again once the later one is gone


def test_a_projector_for_another_model_is_refused_and_auto_falls_back_to_masks(tokenizer, tmp_path):
    other = MemoirEngine(build_tiny("llama", tokenizer, seed=1), MemoirConfig(hyper=TINY_HYPER))
    path = projector_file(tmp_path, other)
    with pytest.raises(ValueError, match="another model"):
        engine_for(tokenizer, key_projector=str(path))
    engine = engine_for(tokenizer, key_projector="auto")  # nothing ships for a random tiny model
    assert packaged_projector(engine.weights_fingerprint) is None and engine.layout.router is None


def test_training_separates_paraphrases_from_neighbours():
    """Synthetic keys: a record's prompt and paraphrase share its subject's direction but are worded
    by different templates of its relation; its neighbour is another subject worded by the
    prompt's template. Wording outweighs the subject, so raw cosine prefers the neighbour; the
    trained projector, on records it never saw, prefers the paraphrase."""
    generator = torch.Generator().manual_seed(0)
    width, relations = 64, 4
    prompt_wording = 3 * torch.randn(relations, width, generator=generator)
    paraphrase_wording = 3 * torch.randn(relations, width, generator=generator)

    def records(n: int):
        subjects, others = torch.randn(n, width, generator=generator), torch.randn(n, width, generator=generator)
        relation = torch.arange(n) % relations
        jitter = lambda: 0.2 * torch.randn(n, width, generator=generator)
        return (subjects + prompt_wording[relation] + jitter(), subjects + paraphrase_wording[relation] + jitter(),
                others + prompt_wording[relation] + jitter())

    def prefers_paraphrase(p, q, n) -> float:
        p, q, n = (unit(x, dim=-1) for x in (p, q, n))
        return ((p * q).sum(-1) > (p * n).sum(-1)).float().mean().item()

    weight = train_projector(*records(1200), dim=16, epochs=30)
    prompt, paraphrase, neighbour = records(200)
    assert prefers_paraphrase(prompt, paraphrase, neighbour) < 0.2
    assert prefers_paraphrase(prompt @ weight, paraphrase @ weight, neighbour @ weight) > 0.95


def test_a_delta_routed_by_another_rule_is_refused(tokenizer, tmp_path):
    plain = engine_for(tokenizer)
    routed = engine_for(tokenizer, key_projector=str(projector_file(tmp_path, plain)))
    for source, target in ((plain, routed), (routed, plain)):
        base = source.state
        _, state = source.train(*FACTS[0], key="e0", base=base)
        with pytest.raises(DeltaMismatch, match="another rule"):
            apply_delta(target, target.empty_state(), edit_delta(base, state))
