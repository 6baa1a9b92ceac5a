"""POST /generate: text from the model, with the memory switched on only for matching prompts."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from memoir_core import GenerationOutput, GenerationRequest

from ...runtime import Runtime
from ...schemas import FiredEdit, GenerateRequest, GenerateResponse
from ...services.prompts import Message, PromptError, chat_prompt, plain_prompt
from ...services.freshness import wait_for_edit_seq
from ...services.requests import LimitExceeded, generation_request
from ...services.streaming import sse, stream_text
from ..deps import GenerateCaller, ReadyRuntime

router = APIRouter(tags=["generation"])
log = logging.getLogger(__name__)


def fired_edit(output: GenerationOutput) -> FiredEdit | None:
    decision = output.decision
    if decision is None or not decision.active:
        return None
    return FiredEdit(id=decision.match.key, match_ratio=round(decision.match.ratio, 6))


def build_generation(runtime: Runtime, body: GenerateRequest) -> GenerationRequest:
    try:
        if body.chat:
            prompt = chat_prompt(runtime.engine.tokenizer, [Message("user", body.prompt)])
        else:
            prompt = plain_prompt(body.prompt)
        return generation_request(
            runtime, prompt, body.max_new_tokens, body.temperature, body.top_p, body.stop or [], body.seed, body.use_edits
        )
    except (PromptError, LimitExceeded) as error:
        raise HTTPException(status_code=422, detail=str(error)) from None


def response_of(runtime: Runtime, output: GenerationOutput) -> GenerateResponse:
    return GenerateResponse(
        text=output.text,
        finish_reason="stop" if output.finish_reason == "cancelled" else output.finish_reason,
        prompt_tokens=output.prompt_tokens,
        completion_tokens=len(output.token_ids),
        edit=fired_edit(output),
        edit_seq=runtime.last_seq(output.snapshot),
    )


async def _events(runtime: Runtime, request: GenerationRequest, started: float) -> AsyncIterator[str]:
    try:
        async for item in stream_text(runtime, request):
            if isinstance(item, str):
                yield sse({"text": item})
            else:
                final = response_of(runtime, item)
                runtime.metrics.observe_generation(
                    "generate", time.perf_counter() - started, item.decision, final.completion_tokens
                )
                yield sse({"text": "", **final.model_dump(exclude={"text"})})
    except Exception as error:  # the status line is already sent: report the failure in-band
        log.exception("streamed generation failed")
        yield sse({"error": {"message": str(error), "type": "server_error"}})
    yield sse("[DONE]")


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate text",
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
)
async def generate(body: GenerateRequest, runtime: ReadyRuntime, caller: GenerateCaller):
    started = time.perf_counter()
    request = build_generation(runtime, body)  # bad input fails here, before any streaming starts
    await wait_for_edit_seq(runtime, body.min_edit_seq)
    if body.stream:
        return StreamingResponse(_events(runtime, request, started), media_type="text/event-stream")
    output = await runtime.batcher.generate(request)
    response = response_of(runtime, output)
    runtime.metrics.observe_generation(
        "generate", time.perf_counter() - started, output.decision, response.completion_tokens
    )
    return response
