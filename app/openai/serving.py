"""OpenAI-compatible chat and text completions on top of the runtime's batcher.

The served model appears twice: `<name>` answers with the edits, `<name>:base` without them.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator
import uuid

from fastapi.responses import StreamingResponse

from memoir_core import GenerationOutput, GenerationRequest, Prompt

from ..runtime import Runtime
from ..services.prompts import Message, PromptError, chat_prompt, plain_prompt
from ..services.requests import LimitExceeded, generation_request
from ..services.streaming import sse, stream_text
from .protocol import ChatCompletionRequest, CompletionRequest, MemoirInfo, ModelCard, ModelList, Usage

log = logging.getLogger(__name__)

BASE_SUFFIX = ":base"
DEFAULT_MAX_TOKENS = 256


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class OpenAIServing:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.runtime.settings.model_name or self.runtime.engine.model_id

    def models(self) -> ModelList:
        return ModelList(
            data=[ModelCard(id=self.name, created=self.created), ModelCard(id=self.name + BASE_SUFFIX, created=self.created)]
        )

    def _use_edits(self, model: str) -> bool:
        if model == self.name:
            return True
        if model == self.name + BASE_SUFFIX:
            return False
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist; this server serves {self.name!r} and {self.name + BASE_SUFFIX!r}",
            param="model",
            code="model_not_found",
        )

    def _request(self, body: ChatCompletionRequest | CompletionRequest, prompt: Prompt) -> GenerationRequest:
        use_edits = self._use_edits(body.model)
        default = min(DEFAULT_MAX_TOKENS, self.runtime.settings.max_new_tokens)
        try:
            return generation_request(
                self.runtime,
                prompt,
                body.token_limit,
                body.temperature,
                body.top_p,
                body.stop or [],
                body.seed,
                use_edits,
                default_new_tokens=default,
            )
        except PromptError as error:
            raise OpenAIError(400, str(error), param="messages" if hasattr(body, "messages") else "prompt") from None
        except LimitExceeded as error:
            param = "max_tokens" if "max_new_tokens" in str(error) else "messages"
            raise OpenAIError(400, str(error).replace("max_new_tokens", "max_tokens"), param=param) from None

    def _memoir(self, output: GenerationOutput) -> dict:
        decision = output.decision
        edit = None
        if decision is not None and decision.active:
            edit = {"id": decision.match.key, "match_ratio": round(decision.match.ratio, 6)}
        return MemoirInfo(edit=edit, edit_seq=self.runtime.last_seq(output.snapshot)).model_dump()

    @staticmethod
    def _usage(output: GenerationOutput) -> dict:
        completion = len(output.token_ids)
        return Usage(
            prompt_tokens=output.prompt_tokens, completion_tokens=completion, total_tokens=output.prompt_tokens + completion
        ).model_dump()

    def _observe(self, started: float, output: GenerationOutput, endpoint: str) -> None:
        self.runtime.metrics.observe_generation(
            endpoint, time.perf_counter() - started, output.decision, len(output.token_ids)
        )

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest):
        started = time.perf_counter()
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        try:
            prompt = chat_prompt(self.runtime.engine.tokenizer, messages)
        except PromptError as error:
            raise OpenAIError(400, str(error), param="messages") from None
        request = self._request(body, prompt)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(self._chat_stream(body, request, response_id, started), media_type="text/event-stream")
        output = await self.runtime.batcher.generate(request)
        self._observe(started, output, "chat")
        return {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": output.text},
                    "finish_reason": _finish(output.finish_reason),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(output),
            "memoir": self._memoir(output),
        }

    async def _chat_stream(self, body, request, response_id: str, started: float) -> AsyncIterator[str]:
        created = int(time.time())
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(delta: dict, finish=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            payload = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [choice],
                **usage_field,
                **extra,
            }
            return sse(payload)

        yield chunk({"role": "assistant", "content": ""})
        async for event in self._guarded(request, started, "chat"):
            if isinstance(event, OpenAIError):
                yield sse(event.body())
                break
            if isinstance(event, str):
                yield chunk({"content": event})
                continue
            yield chunk({}, _finish(event.finish_reason), memoir=self._memoir(event))
            if body.include_usage:
                yield sse(
                    {
                        "id": response_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": self._usage(event),
                    }
                )
        yield sse("[DONE]")

    # ---- text completions ---------------------------------------------------------------------

    async def completion(self, body: CompletionRequest):
        started = time.perf_counter()
        try:
            prompt = plain_prompt(body.prompt)
        except PromptError as error:
            raise OpenAIError(400, str(error), param="prompt") from None
        request = self._request(body, prompt)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                self._completion_stream(body, request, response_id, started), media_type="text/event-stream"
            )
        output = await self.runtime.batcher.generate(request)
        self._observe(started, output, "completions")
        text = (body.prompt + output.text) if body.echo else output.text
        return {
            "id": response_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "text": text, "finish_reason": _finish(output.finish_reason), "logprobs": None}],
            "usage": self._usage(output),
            "memoir": self._memoir(output),
        }

    async def _completion_stream(self, body, request, response_id: str, started: float) -> AsyncIterator[str]:
        created = int(time.time())
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(text: str, finish=None, choices=True, **extra) -> str:
            payload = {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}] if choices else [],
                **usage_field,
                **extra,
            }
            return sse(payload)

        if body.echo:
            yield chunk(body.prompt)
        async for event in self._guarded(request, started, "completions"):
            if isinstance(event, OpenAIError):
                yield sse(event.body())
                break
            if isinstance(event, str):
                yield chunk(event)
                continue
            yield chunk("", _finish(event.finish_reason), memoir=self._memoir(event))
            if body.include_usage:
                yield chunk("", choices=False, usage=self._usage(event))
        yield sse("[DONE]")

    async def _guarded(self, request: GenerationRequest, started: float, endpoint: str):
        """Text pieces, then the output; a failure mid-stream is yielded as an OpenAIError."""
        try:
            async for item in stream_text(self.runtime, request):
                if isinstance(item, GenerationOutput):
                    self._observe(started, item, endpoint)
                yield item
        except Exception as error:
            log.exception("streamed completion failed")
            yield OpenAIError(500, f"generation failed: {error}", type="server_error")
