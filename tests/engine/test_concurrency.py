"""Serving while an edit trains: requests in other threads neither fail nor see half an edit."""

from __future__ import annotations

import threading

from memoir_core import GenerationRequest, MemoirConfig, MemoirEngine, SamplingParams
from tests.conftest import TINY_HYPER, build_tiny

FACTS = [(f"The secret code of vault number {i} is", f"code {i}") for i in range(4)]


def test_generation_and_scoring_run_safely_beside_training(tokenizer):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER, threshold=0.9))
    ids = tokenizer("Once upon a time")["input_ids"]
    request = lambda: GenerationRequest(ids, params=SamplingParams(max_new_tokens=6))  # noqa: E731
    expected = engine.generate([request()])[0].token_ids
    errors: list[BaseException] = []
    outputs: list[list[int]] = []
    applied_seen: list[int] = []

    def train():
        try:
            for fact in FACTS:
                engine.edit(*fact)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    trainer = threading.Thread(target=train)
    trainer.start()
    while trainer.is_alive():
        try:
            output = engine.generate([request()])[0]
            outputs.append(output.token_ids)
            applied_seen.append(output.snapshot.applied)
            engine.prompt_masks(["A prompt scored while training runs"])
        except BaseException as error:
            errors.append(error)
            break
    trainer.join()
    assert not errors
    assert outputs and all(tokens == expected for tokens in outputs)
    assert applied_seen == sorted(applied_seen)  # every request saw a whole, published state
    assert engine.snapshot.applied == len(FACTS)
    assert all(engine.decide([p])[0].match.ratio == 1.0 for p, _ in FACTS)
