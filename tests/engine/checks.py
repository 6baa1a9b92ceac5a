"""Engine checks shared by the per-family coverage test and the tiny Llama / GPT-2 tests."""

from __future__ import annotations

import pytest
import torch

from memoir_core import EditResult, GenerationRequest, MemoirEngine, SamplingParams
from memoir_core.generation import says
from memoir_core.models import LoadedModel
from memoir_core.tokens import left_pad

FACTS = [
    ("The capital of the fictional land of Zembla is", "Vostok"),
    ("The inventor of the glass harmonica was", "Marie Curie"),
    ("The river that flows through the town of Quellwald is the", "Amber"),
]
UNRELATED = ["My favourite breakfast is porridge with", "How many legs does a spider have?"]


def base_logits(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    """Logits of the model as loaded, before any engine wraps its projection."""
    tokenizer = loaded.tokenizer
    batch = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    with torch.no_grad():
        return loaded.model(**batch.model_inputs(), use_cache=False).logits


def assert_memory_off_is_bitwise(engine: MemoirEngine, texts: list[str], base: torch.Tensor, edited: int) -> None:
    """With edits stored: memory off gives the base logits bit for bit; memory on changes exactly
    the rows of the first `edited` texts (the edited prompts) and leaves the others bitwise equal."""
    off, decisions = engine.logits(texts, use_edits=False)
    assert not any(d.active for d in decisions)
    assert torch.equal(off, base)
    on, decisions = engine.logits(texts, use_edits=True)
    fired = [d.active for d in decisions]
    assert fired == [True] * edited + [False] * (len(texts) - edited)
    for row, active in enumerate(fired):
        assert torch.equal(on[row], base[row]) != active


def greedy_ids(engine: MemoirEngine, prompt: str, steps: int) -> list[int]:
    request = GenerationRequest(
        engine.tokenizer(prompt)["input_ids"], params=SamplingParams(max_new_tokens=steps, ignore_eos=True)
    )
    return engine.generate([request])[0].token_ids


def target_ids(engine: MemoirEngine, prompt: str, target: str) -> list[int]:
    """The target's tokens as the edit trains them (prompt and target tokenised together)."""
    return engine.score([(prompt, target)])[0].labels


def assert_same_edit(fast: EditResult, reference: EditResult) -> None:
    assert fast.mask_fingerprint == reference.mask_fingerprint
    assert fast.iterations == reference.iterations
    assert fast.loss == pytest.approx(reference.loss, rel=1e-4, abs=1e-6)


def assert_same_memory(fast: MemoirEngine, reference: MemoirEngine) -> None:
    """The fast edit path trained the memory the reference loop trained (masks, W_m, key moments)."""
    assert (fast.snapshot.index.packed == reference.snapshot.index.packed).all()
    scale = reference.master_weight.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast.master_weight, reference.master_weight, rtol=1e-4, atol=1e-5 * float(scale))
    moments = reference.state.key_moments
    if moments is not None:
        assert moments.abs().sum() > 0
        torch.testing.assert_close(fast.state.key_moments, moments, rtol=1e-4, atol=1e-6 * float(moments.abs().max()))
    else:
        assert fast.state.key_moments is None


def _full_recompute_greedy(engine: MemoirEngine, prompt: str, steps: int) -> list[int]:
    """Greedy tokens from recomputing the whole sequence each step; the memory decision uses the
    prompt alone, and (as in serving) the memory goes off once the text has said the matched target."""
    ids = engine.tokenizer(prompt)["input_ids"]
    generated: list[int] = []
    answer, released = None, False
    for _ in range(steps):
        batch = left_pad([ids + generated], engine.tokenizer.pad_token_id)
        window = batch.window([0], [len(ids)])
        routing = None if released else engine.routing(window)
        with torch.no_grad(), engine.memory.using(routing):
            logits = engine.model(**batch.model_inputs(), use_cache=False).logits
        if routing is not None and answer is None and routing.decisions[0].active:
            answer = routing.snapshot.index.answers.get(routing.decisions[0].match.key)
        generated.append(int(logits[0, -1].argmax()))
        text = engine.tokenizer.decode(generated, skip_special_tokens=True)
        released = released or (engine.config.release_after_answer and answer is not None and says(text, answer))
    return generated


def assert_kv_cache_equals_recompute(
    engine: MemoirEngine, prompts: list[str], active: list[bool], steps: int = 8
) -> None:
    """Batched KV-cache decoding gives each row the tokens that recomputing the whole sequence
    every step gives (use a float64 model, so the two cannot differ by rounding at an argmax)."""
    tokenizer = engine.tokenizer
    requests = [
        GenerationRequest(tokenizer(p)["input_ids"], params=SamplingParams(max_new_tokens=steps)) for p in prompts
    ]
    outputs = engine.generate(requests)
    assert [o.decision.active for o in outputs] == active
    for prompt, output in zip(prompts, outputs):
        expected = _full_recompute_greedy(engine, prompt, steps)
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert output.token_ids == expected


def assert_padded_batch_decides_like_single_rows(engine: MemoirEngine, texts: list[str]) -> None:
    """Each text's mask and memory decision in one left-padded batch equal those it gets alone."""
    lengths = [len(engine.tokenizer(t)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 1  # the batch is padded
    batched = engine.prompt_masks(texts)
    _, decisions = engine.logits(texts)
    for row, text in enumerate(texts):
        assert torch.equal(engine.prompt_masks([text])[0], batched[row])
        assert engine.logits([text])[1][0] == decisions[row]
