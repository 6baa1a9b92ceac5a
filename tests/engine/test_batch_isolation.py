"""One failing row of a shared decoding batch fails only its own request.

The rows are built past the API's validation (which refuses such seeds) to reach the batcher with
what it must survive: a seed torch refuses, and a streaming callback that raises mid-way.
"""

from __future__ import annotations

import asyncio

import pytest

from app.services.batcher import GenerationBatcher
from memoir_core import GenerationRequest, MemoirConfig, MemoirEngine, SamplingParams
from tests.conftest import TINY_HYPER, build_tiny

PROMPTS = ["Once upon a time", "The capital of France is", "In the beginning there was", "My favourite colour is"]


def _explode(_text: str) -> None:
    raise ConnectionResetError("the client went away")


@pytest.fixture
def batcher(tokenizer):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER, threshold=0.9))
    batcher = GenerationBatcher(engine, max_batch_size=16, wait_ms=50.0)
    batcher.start()
    yield batcher
    batcher.stop()
    batcher.join(30)


def test_a_bad_row_among_good_ones_fails_alone(batcher, tokenizer):
    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(tokenizer(prompt)["input_ids"], params=SamplingParams(max_new_tokens=8))

    good = [request(p) for p in PROMPTS]
    bad_seed = request(PROMPTS[0])
    bad_seed.params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=99999999999999999999999)
    bad_stream = request(PROMPTS[1])
    bad_stream.on_text = _explode

    async def run(requests):
        return await asyncio.gather(*(batcher.generate(r) for r in requests), return_exceptions=True)

    alone = asyncio.run(run(good))
    batcher.largest_batch = 0
    together = asyncio.run(run([good[0], bad_seed, good[1], bad_stream, good[2], good[3]]))
    assert batcher.largest_batch == 6  # all six joined one batch
    assert isinstance(together[1], (ValueError, RuntimeError, OverflowError))
    assert isinstance(together[3], ConnectionResetError)
    outputs = [together[i] for i in (0, 2, 4, 5)]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) > 0 for o in outputs)
    # and the batcher keeps serving
    assert asyncio.run(run(good[:1]))[0].token_ids == alone[0].token_ids
