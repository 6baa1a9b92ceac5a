"""The MEMOIR engine on tiny randomly initialised Llama and GPT-2 models (the checks every model
family passes are in test_families.py)."""

from __future__ import annotations

from dataclasses import replace
import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
import torch
from transformers import OPTConfig, OPTForCausalLM

from memoir_core import (
    GenerationRequest,
    Prompt,
    MemoirConfig,
    MemoirEngine,
    SamplingParams,
    StateMismatch,
    load_model,
)
from memoir_core.arch import UnsupportedArchitecture
from memoir_core.state import StateCorrupt, read_state
from memoir_core.models import LoadedModel, prepare_model
from tests.conftest import TINY_HYPER, build_tiny
from tests.engine.checks import FACTS, UNRELATED, assert_same_edit, assert_same_memory


ARCHS = ["llama", "gpt2"]


def engine_for(loaded, **config) -> MemoirEngine:
    return MemoirEngine(loaded, MemoirConfig(hyper=TINY_HYPER, **config))


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_are_deterministic_for_a_seed(arch, tokenizer):
    first = engine_for(build_tiny(arch, tokenizer))
    second = engine_for(build_tiny(arch, tokenizer))
    prompts = [p for p, _ in FACTS] + UNRELATED
    masks = first.prompt_masks(prompts)
    assert torch.equal(first.hasher.permutation, second.hasher.permutation)
    assert torch.equal(first.hasher.background_mean, second.hasher.background_mean)
    assert torch.equal(masks, second.prompt_masks(prompts))
    assert torch.equal(masks, first.prompt_masks(prompts))
    assert (masks.sum(dim=1) == first.top_k).all()
    other_seed = engine_for(build_tiny(arch, tokenizer), seed=7)
    assert not torch.equal(other_seed.hasher.permutation, first.hasher.permutation)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_edited_prompt_matches_its_own_mask_exactly(arch, tokenizer):
    engine = engine_for(build_tiny(arch, tokenizer))
    assert engine.decide([FACTS[0][0]])[0].match is None
    for prompt, target in FACTS:
        engine.edit(prompt, target, key=prompt)
    for prompt, _ in FACTS:
        decision = engine.decide([prompt])[0]
        assert decision.active
        assert decision.match.key == prompt
        assert decision.match.ratio == 1.0


def decaying_hyper(decay: str, **changes):
    """Weight decay strong enough (1 % a step) that its two scopes give clearly different weights."""
    return replace(TINY_HYPER, weight_decay=1e-3, decay=decay, **changes)


@pytest.mark.parametrize(
    "hyper",
    [
        decaying_hyper("all"),
        decaying_hyper("edited"),
        # 10 steps for these three: later on, rounding differences between the two paths grow past
        # the tolerance on a tiny model at lr 10 once nothing damps the weights (no decay), once
        # its loss spikes under the usage step's larger share for fresh columns, or once the
        # protecting map, near-singular for a repeat whose key is stored, magnifies them
        decaying_hyper("none", max_iterations=10),
        decaying_hyper("edited", column_step="usage", max_iterations=10),
        decaying_hyper("edited", protect=0.1, max_iterations=10),
    ],
    ids=["decay-all", "decay-edited", "decay-none", "usage-step", "protect"],
)
@pytest.mark.parametrize("layer", [None, 1], ids=["last-block", "middle-block"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_the_reference_loop(arch, layer, hyper, tokenizer):
    fast = MemoirEngine(build_tiny(arch, tokenizer), MemoirConfig(layer=layer, hyper=hyper))
    reference = MemoirEngine(
        build_tiny(arch, tokenizer),
        MemoirConfig(layer=layer, fast_edit=False, hyper=hyper),
        context_templates=fast.context_templates,
    )
    # for the usage step and key protection, a repeat trains columns that every stored mask holds
    facts = [*FACTS, FACTS[0]] if hyper.column_step == "usage" or hyper.protect else FACTS
    for prompt, target in facts:
        assert_same_edit(fast.edit(prompt, target), reference.edit(prompt, target))
    assert_same_memory(fast, reference)
    assert (reference.state.key_moments is not None) == bool(hyper.protect)


def test_key_protection_writes_less_onto_stored_keys(tokenizer, tmp_path):
    """A second edit sharing columns with the first: with protection, what it writes onto the
    first edit's keys (relative to its own) shrinks; the first edit, with nothing stored yet, trains
    exactly as without protection; the key moments survive a save and load."""
    runs = {}
    for protect in (None, 0.1):
        hyper = replace(TINY_HYPER, decay="edited", protect=protect)
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        engine.edit(*FACTS[0])
        first = engine.state
        engine.edit(*FACTS[1])
        runs[protect] = (first, engine.state, engine)
    (plain_first, plain, _), (first, protected, engine) = runs[None], runs[0.1]
    assert plain_first.key_moments is None and plain.key_moments is None
    assert torch.equal(first.master, plain_first.master)
    old_keys = first.key_moments  # the first edit's second moments, [D, D]
    new_keys = protected.key_moments - old_keys
    old, new = engine.prompt_masks([FACTS[0][0], FACTS[1][0]]).bool()
    assert (old & new).any() and old_keys.abs().sum() > 0 and new_keys.abs().sum() > 0

    def onto_old_relative_to_own(before, after):
        step = after.master - before.master
        return float(torch.trace(step @ old_keys @ step.T) / torch.trace(step @ new_keys @ step.T))

    assert onto_old_relative_to_own(first, protected) < 0.5 * onto_old_relative_to_own(plain_first, plain)
    engine.save(tmp_path / "state.safetensors")
    engine.reset()
    assert engine.state.key_moments is None
    engine.load(tmp_path / "state.safetensors")
    assert torch.equal(engine.state.key_moments, protected.key_moments)


def test_usage_step_moves_columns_that_stored_masks_hold_less(tokenizer):
    """Three stored copies of one mask, then a new edit: with the usage step its update on the
    columns those masks hold is smaller, relative to its update on fresh columns."""
    shared_to_fresh = {}
    for column_step in ("uniform", "usage"):
        hyper = replace(TINY_HYPER, column_step=column_step)
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        for _ in range(3):
            engine.edit(*FACTS[0])
        before = engine.master_weight.clone()
        engine.edit(*FACTS[1])
        step = (engine.master_weight - before).abs().mean(dim=0)  # per column
        old, new = engine.prompt_masks([FACTS[0][0], FACTS[1][0]]).bool()
        shared, fresh = new & old, new & ~old
        assert shared.any() and fresh.any()
        shared_to_fresh[column_step] = float(step[shared].mean() / step[fresh].mean())
    # a column held by 3 of 3 stored masks gets (1 + 3k/D) / 4 of its gradient, about 0.46 here
    assert shared_to_fresh["usage"] < 0.7 * shared_to_fresh["uniform"]


def test_weight_decay_reaches_stored_edits_only_when_it_decays_all_columns(tokenizer):
    weights = {}
    for decay in ("all", "edited"):
        hyper = decaying_hyper(decay)
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        engine.edit(*FACTS[0])
        before = engine.master_weight.clone()
        second = engine.edit(*FACTS[1])
        untouched = ~engine.prompt_masks([FACTS[1][0]])[0].bool()  # columns the second edit does not train
        assert before[:, untouched].abs().sum() > 0  # the first edit stored something there
        weights[decay] = (before[:, untouched], engine.master_weight[:, untouched], second.iterations)
    before, after, steps = weights["edited"]
    assert torch.equal(after, before)  # stored edits keep their size
    before, after, steps = weights["all"]
    shrink = (1 - TINY_HYPER.lr * 1e-3) ** steps  # the paper: every step shrinks all of W_m
    assert steps > 0 and shrink < 0.99
    torch.testing.assert_close(after, before * shrink)


def test_no_decay_trains_as_if_weight_decay_were_zero(tokenizer):
    """decay "none" ignores the weight decay it is given: the same weights as a zero rate, and
    different from decaying the edited columns at that rate."""
    weights = {}
    for name, hyper in {
        "none": decaying_hyper("none"),
        "zero": replace(decaying_hyper("edited"), weight_decay=0.0),
        "edited": decaying_hyper("edited"),
    }.items():
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        for prompt, target in FACTS[:2]:
            engine.edit(prompt, target)
        weights[name] = engine.master_weight
    assert torch.equal(weights["none"], weights["zero"])
    assert not torch.allclose(weights["none"], weights["edited"])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tokenizer, tmp_path):
    engine = engine_for(build_tiny(arch, tokenizer), threshold=0.45)
    engine.add_background("framed", [Prompt(f"Question: {t}", 10, "framed") for t in UNRELATED])
    for prompt, target in FACTS[:2]:
        engine.edit(prompt, target, key=target)
    engine.edit(Prompt(f"Question: {FACTS[2][0]}", 10, "framed"), FACTS[2][1], key="framed")
    sha = engine.save(tmp_path / "memory.safetensors")
    assert len(sha) == 64

    restored = engine_for(build_tiny(arch, tokenizer), seed=99)  # different seed: load must win
    restored.load(tmp_path / "memory.safetensors")
    assert torch.equal(restored.master_weight, engine.master_weight)
    assert (restored.snapshot.index.packed == engine.snapshot.index.packed).all()
    assert restored.snapshot.index.keys == ("Vostok", "Marie Curie", "framed")
    assert restored.snapshot.applied == 3
    assert set(restored.hasher.backgrounds) == {"text", "framed"}
    assert torch.equal(restored.hasher.backgrounds["framed"], engine.hasher.backgrounds["framed"])
    assert restored.threshold == 0.45
    assert restored.context_templates == engine.context_templates
    assert torch.equal(restored.hasher.permutation, engine.hasher.permutation)
    texts = [p for p, _ in FACTS] + UNRELATED + [Prompt(f"Question: {FACTS[2][0]}", 10, "framed")]
    assert torch.equal(restored.logits(texts)[0], engine.logits(texts)[0])
    assert restored.decide(texts[-1:])[0].match.key == "framed"
    # and it keeps editing from there exactly as the original would
    assert restored.edit(*FACTS[2]).mask_fingerprint == engine.edit(*FACTS[2]).mask_fingerprint


def test_a_loaded_memory_owns_its_bytes_and_a_corrupt_file_is_refused_by_its_hash(tokenizer, tmp_path):
    """bench.chaos flipped bytes of a checkpoint after a replica had loaded it, and the replica's
    hasher changed with the file (safetensors maps it into memory): loading must copy, and a hash
    check must be of the bytes that are parsed."""
    engine = engine_for(build_tiny("llama", tokenizer))
    for prompt, target in FACTS[:2]:
        engine.edit(prompt, target, key=target)
    path = tmp_path / "memory.safetensors"
    sha = engine.save(path)
    restored = engine_for(build_tiny("llama", tokenizer))
    state, hasher, _ = read_state(restored.layout, path, restored.memory_state, sha256=sha)
    permutation, weight = hasher.permutation.clone(), state.master.clone()

    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data)):  # the tensors' bytes, in place (same inode)
        data[i] ^= 0xFF
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    assert torch.equal(hasher.permutation, permutation) and torch.equal(state.master, weight)
    with pytest.raises(StateCorrupt, match="sha256 differs"):
        read_state(restored.layout, path, restored.memory_state, sha256=sha)


def test_prompt_formats_are_centred_by_their_own_background(tokenizer):
    engine = engine_for(build_tiny("llama", tokenizer))
    framed = Prompt(f"Question: {FACTS[0][0]}", 10, "framed")
    with pytest.raises(ValueError, match="no background mean for prompt format 'framed'"):
        engine.prompt_masks([framed])
    engine.add_background("framed", [Prompt(f"Question: {t}", 10, "framed") for t in UNRELATED])
    as_text = Prompt(framed.text, framed.feature_start)
    assert not torch.equal(engine.prompt_masks([framed]), engine.prompt_masks([as_text]))


def test_loading_onto_another_model_or_layer_fails_clearly(tokenizer, tmp_path):
    engine = engine_for(build_tiny("llama", tokenizer))
    engine.edit(*FACTS[0])
    path = tmp_path / "memory.safetensors"
    engine.save(path)

    other_weights = engine_for(build_tiny("llama", tokenizer, seed=1))
    with pytest.raises(StateMismatch, match="weights differ"):
        other_weights.load(path)

    other_layer = engine_for(build_tiny("llama", tokenizer), layer=1)
    with pytest.raises(StateMismatch, match="edits layer 3, the engine edits layer 1"):
        other_layer.load(path)
    assert len(other_layer.snapshot.index) == 0  # nothing was half-loaded

    # a version-2 file (the memory applied over a chat prompt's whole template) means something else: refused
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    header = json.loads(metadata["memoir"])
    save_file(tensors, str(path), metadata={**metadata, "memoir": json.dumps({**header, "format_version": 2})})
    same = engine_for(build_tiny("llama", tokenizer))
    with pytest.raises(StateMismatch, match="state format version 2 is not supported"):
        same.load(path)


def test_generation_rows_decide_independently_and_can_skip_edits(tokenizer):
    engine = engine_for(build_tiny("llama", tokenizer))
    engine.edit(*FACTS[0], key="zembla")
    ids = tokenizer(FACTS[0][0])["input_ids"]
    params = SamplingParams(max_new_tokens=4)
    with_edit, without_edit, unrelated = engine.generate(
        [
            GenerationRequest(ids, params=params),
            GenerationRequest(ids, params=params, use_edits=False),
            GenerationRequest(tokenizer(UNRELATED[0])["input_ids"], params=params),
        ]
    )
    assert with_edit.decision.active and with_edit.decision.match.key == "zembla"
    assert not without_edit.decision.active
    assert not unrelated.decision.active
    base = engine.generate([GenerationRequest(ids, params=params, use_edits=False)])[0]
    assert without_edit.token_ids == base.token_ids
    assert with_edit.token_ids != base.token_ids


def test_sampling_is_reproducible_with_a_seed_and_stops_on_stop_strings(tokenizer):
    engine = engine_for(build_tiny("llama", tokenizer))
    ids = tokenizer("Once upon a time")["input_ids"]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    a, b = engine.generate([GenerationRequest(ids, params=sampled), GenerationRequest(ids, params=sampled)])
    assert a.token_ids == b.token_ids and a.finish_reason == "length"
    greedy = engine.generate([GenerationRequest(ids, params=SamplingParams(max_new_tokens=12))])[0]
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    assert stop
    pieces: list[str] = []
    stopped = engine.generate(
        [GenerationRequest(ids, params=SamplingParams(max_new_tokens=12, stop=(stop,)), on_text=pieces.append)]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and greedy.text.startswith(stopped.text)
    assert "".join(pieces) == stopped.text
    # a vanishing temperature samples the greedy answer (it once overflowed to inf / inf = nan)
    cold = SamplingParams(max_new_tokens=12, temperature=1e-30, seed=1)
    assert engine.generate([GenerationRequest(ids, params=cold)])[0].token_ids == greedy.token_ids


def test_a_block_without_a_feed_forward_module_is_refused_with_the_reason(tokenizer):
    model = OPTForCausalLM(
        OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32)
    )  # OPT's fc1 and fc2 sit in the decoder layer itself
    with pytest.raises(UnsupportedArchitecture, match="cannot find the feed-forward of OPTDecoderLayer"):
        MemoirEngine(LoadedModel(prepare_model(model), tokenizer, "tiny-opt"))


def test_any_local_model_directory_loads_and_edits(tokenizer, tmp_path):
    tiny = build_tiny("llama", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="fp32")
    assert loaded.model_id == tmp_path.name
    engine = MemoirEngine(loaded, MemoirConfig(hyper=TINY_HYPER))
    engine.edit(*FACTS[0])
    assert engine.score([FACTS[0]])[0].accuracy == 1.0
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(str(tmp_path / "missing"), device="cpu")


def test_routing_follows_rows_dropped_from_the_batch(tokenizer):
    engine = engine_for(build_tiny("llama", tokenizer, dtype=torch.float64))
    engine.edit(*FACTS[0], key="a")
    engine.edit(*FACTS[1], key="b")
    # the first request stops at once, the others keep their own decisions after it leaves
    prompts = [UNRELATED[0], FACTS[1][0], FACTS[0][0]]
    requests = [GenerationRequest(tokenizer(p)["input_ids"], params=SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, [1, 6, 6])]
    outputs = engine.generate(requests)
    assert [o.decision.match.key if o.decision.active else None for o in outputs] == [None, "b", "a"]
    for prompt, output in zip(prompts[1:], outputs[1:]):
        alone = engine.generate([GenerationRequest(tokenizer(prompt)["input_ids"], params=SamplingParams(max_new_tokens=6))])[0]
        assert output.token_ids == alone.token_ids


def test_rows_joining_a_running_batch_decode_as_they_would_alone(tokenizer):
    # continuous batching: requests join between decoding steps, each with its own prefill and decision
    engine = engine_for(build_tiny("llama", tokenizer, dtype=torch.float64))
    engine.edit(*FACTS[0], key="a")
    engine.edit(*FACTS[1], key="b")

    def request(prompt: str, steps: int) -> GenerationRequest:
        return GenerationRequest(tokenizer(prompt)["input_ids"], params=SamplingParams(max_new_tokens=steps))

    batch = engine.decode_batch()
    first = batch.add([request(UNRELATED[0], 10)])
    for _ in range(3):
        batch.step()
    # one joiner has a longer prompt than the cached width, one a shorter one; both edits are among them
    joined = batch.add([request(FACTS[2][0] + " and also " + FACTS[0][0], 6), request(FACTS[1][0], 6)])
    batch.step()
    late = batch.add([request(FACTS[0][0], 4)])
    rows = first + joined + late
    while len(batch):
        batch.step()
    assert all(row.finished for row in rows)
    outputs = [row.output() for row in rows]
    assert [o.decision.match.key if o.decision.active else None for o in outputs[2:]] == ["b", "a"]
    prompts = [(UNRELATED[0], 10), (FACTS[2][0] + " and also " + FACTS[0][0], 6), (FACTS[1][0], 6), (FACTS[0][0], 4)]
    for (prompt, steps), output in zip(prompts, outputs):
        alone = engine.generate([request(prompt, steps)])[0]
        assert output.token_ids == alone.token_ids
        assert output.decision.active == alone.decision.active


def test_calibrated_mode_gives_each_memory_a_tau_above_the_background_prompts(tokenizer, tmp_path):
    background = [f"Background sentence number {i} talks about the weather and cooking." for i in range(12)]
    engine = MemoirEngine(
        build_tiny("llama", tokenizer),
        MemoirConfig(hyper=TINY_HYPER, calibrate_threshold=True, threshold=0.01),
        background_prompts=background,
    )
    chance = engine.top_k / engine.width
    assert engine.threshold == 0.01  # nothing published yet: the configured value
    engine.edit(*FACTS[0], key="a")
    first = engine.threshold
    ratios = engine.best_ratios(background)
    assert first == pytest.approx(min(1.0, max(max(ratios), chance) + 0.05))
    assert all(r < first for r in ratios)  # no background prompt fires
    assert engine.decide([FACTS[0][0]])[0].active  # the edited prompt does (ratio 1)
    engine.edit(*FACTS[1], key="b")
    assert engine.threshold >= first  # more masks can only raise the best background overlap
    engine.save(tmp_path / "state.safetensors")
    restored = MemoirEngine(
        build_tiny("llama", tokenizer),
        MemoirConfig(hyper=TINY_HYPER, calibrate_threshold=True),
        background_prompts=background,
    )
    restored.load(tmp_path / "state.safetensors")
    assert restored.threshold == engine.threshold


def test_an_edit_not_yet_right_after_its_step_cap_trains_until_greedy_decoding_gives_the_target(tokenizer):
    """fit_iterations: past max_iterations, an edit keeps training only while its bare row does not
    yet predict every target token (EOS included) greedily; one that is right by then is untouched.
    The fast path only: both loops share `_sgd`, and their equality is tested above."""
    prompt, target = FACTS[1]
    answers, results = {}, {}
    for name, hyper in {
        "capped": replace(TINY_HYPER, max_iterations=2),
        "extended": replace(TINY_HYPER, max_iterations=2, fit_iterations=60),
    }.items():
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        results[name] = engine.edit(prompt, target, append_eos=True)
        ids, start = engine.encode(prompt)
        answers[name] = engine.generate([GenerationRequest(ids, start, SamplingParams(max_new_tokens=20))])[0]
    assert results["capped"].iterations == 2 and answers["capped"].text != " " + target
    assert 2 < results["extended"].iterations < 60
    assert answers["extended"].decision.active
    assert answers["extended"].text == " " + target and answers["extended"].finish_reason == "stop"

    # an edit that is right within the paper's budget trains exactly as without the extension
    weights = []
    for hyper in (TINY_HYPER, replace(TINY_HYPER, fit_iterations=60)):
        engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=hyper))
        result = engine.edit(prompt, target, append_eos=True)
        weights.append((result.iterations, engine.master_weight.clone()))
    assert weights[0][0] == weights[1][0] == TINY_HYPER.max_iterations
    assert torch.equal(weights[0][1], weights[1][1])


def test_fit_iterations_must_extend_the_step_cap():
    with pytest.raises(ValueError, match="fit_iterations"):
        replace(TINY_HYPER, fit_iterations=TINY_HYPER.max_iterations)
