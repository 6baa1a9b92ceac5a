"""POST /generate: text from the model, with the memory switched on only for matching prompts."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException

from memoir_core import GenerationOutput

from ...runtime import Runtime
from ...schemas import FiredEdit, GenerateRequest, GenerateResponse
from ...services.prompts import Message, PromptError, chat_prompt, plain_prompt
from ...services.requests import LimitExceeded, generation_request
from ..deps import ReadyRuntime

router = APIRouter(tags=["generation"])


def fired_edit(output: GenerationOutput) -> FiredEdit | None:
    decision = output.decision
    if decision is None or not decision.active:
        return None
    return FiredEdit(id=decision.match.key, match_ratio=round(decision.match.ratio, 6))


def build_generation(runtime: Runtime, body: GenerateRequest, on_text=None):
    try:
        if body.chat:
            prompt = chat_prompt(runtime.engine.tokenizer, [Message("user", body.prompt)])
        else:
            prompt = plain_prompt(body.prompt)
        return generation_request(
            runtime,
            prompt,
            body.max_new_tokens,
            body.temperature,
            body.top_p,
            body.stop or [],
            body.seed,
            body.use_edits,
            on_text,
        )
    except (PromptError, LimitExceeded) as error:
        raise HTTPException(status_code=422, detail=str(error)) from None


@router.post("/generate", response_model=GenerateResponse, summary="Generate text")
async def generate(body: GenerateRequest, runtime: ReadyRuntime) -> GenerateResponse:
    started = time.perf_counter()
    request = build_generation(runtime, body)
    output = await runtime.batcher.generate(request)
    edit = fired_edit(output)
    runtime.metrics.observe_generation("generate", time.perf_counter() - started, edit is not None, len(output.token_ids))
    return GenerateResponse(
        text=output.text,
        finish_reason=output.finish_reason,
        prompt_tokens=output.prompt_tokens,
        completion_tokens=len(output.token_ids),
        edit=edit,
        edit_seq=runtime.last_seq(output.snapshot),
    )
