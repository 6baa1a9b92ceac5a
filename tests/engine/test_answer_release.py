"""Answers that end: once a row has said the matched edit's target, it decodes as the unedited model."""

from __future__ import annotations

from memoir_core import GenerationRequest, MemoirConfig, MemoirEngine, SamplingParams
from memoir_core.generation import generate, says
from tests.conftest import TINY_HYPER, build_tiny
from tests.engine.checks import FACTS, UNRELATED

TOKENS = 14


def test_after_the_target_the_answer_goes_on_as_the_unedited_models_would(tokenizer):
    engine = MemoirEngine(build_tiny("llama", tokenizer), MemoirConfig(hyper=TINY_HYPER))
    assert engine.config.release_after_answer  # the served default
    prompt, target = FACTS[0]
    engine.edit(prompt, target)
    ids = tokenizer(prompt)["input_ids"]
    params = SamplingParams(max_new_tokens=TOKENS)
    # beside an unrelated row, as the service batches them
    released, unrelated = engine.generate(
        [GenerationRequest(ids, params=params), GenerationRequest(tokenizer(UNRELATED[0])["input_ids"], params=params)]
    )
    assert released.decision.active and released.text.strip().startswith(target)
    # the first tokens that say the target (a random model may glue the next token onto it)
    said = next(n for n in range(1, TOKENS + 1) if says(tokenizer.decode(released.token_ids[:n]), target))
    assert said < len(released.token_ids)  # something comes after the target
    own = engine.generate(
        [
            GenerationRequest(
                ids + released.token_ids[:said], params=SamplingParams(max_new_tokens=TOKENS - said), use_edits=False
            )
        ]
    )[0]
    assert released.token_ids[said:] == own.token_ids  # exactly the unedited model's continuation

    # with the memory on to the end (the paper's decoding) the same answer goes on otherwise
    kept, kept_unrelated = generate(
        engine.model,
        engine.tokenizer,
        engine.memory,
        engine.routing,
        [GenerationRequest(ids, params=params), GenerationRequest(tokenizer(UNRELATED[0])["input_ids"], params=params)],
        release_after_answer=False,
    )
    assert kept.token_ids[:said] == released.token_ids[:said]
    assert kept.token_ids[said:] != released.token_ids[said:]
    assert unrelated.token_ids == kept_unrelated.token_ids  # a row without an edit is untouched

