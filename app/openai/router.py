"""/v1 routes and the OpenAI error envelope for everything under /v1."""

from __future__ import annotations

import json

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api.deps import GenerateCaller, ReadyRuntime
from ..services.freshness import wait_for_edit_seq
from .protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList
from .serving import OpenAIError, OpenAIServing

router = APIRouter(prefix="/v1", tags=["openai"], responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def serving(runtime) -> OpenAIServing:
    if getattr(runtime, "openai", None) is None:
        runtime.openai = OpenAIServing(runtime)
    return runtime.openai


@router.get("/models", response_model=ModelList, summary="The model with edits, and ':base' without")
def list_models(runtime: ReadyRuntime, caller: GenerateCaller) -> ModelList:
    return serving(runtime).models()


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, runtime: ReadyRuntime, caller: GenerateCaller):
    await wait_for_edit_seq(runtime, body.min_edit_seq)
    return await serving(runtime).chat(body)


@router.post("/completions", summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionRequest, runtime: ReadyRuntime, caller: GenerateCaller):
    await wait_for_edit_seq(runtime, body.min_edit_seq)
    return await serving(runtime).completion(body)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error that quotes the input must render even when the
    input holds a lone surrogate, which UTF-8 cannot encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _envelope(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    error = OpenAIError(status, message, _TYPES.get(status, "server_error"), param, code)
    return AsciiJSONResponse(status_code=status, content=error.body(), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI's envelope under /v1; FastAPI's usual bodies everywhere else."""
    default_http = app.exception_handlers.get(StarletteHTTPException)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return JSONResponse(status_code=error.status, content=error.body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        if not request.url.path.startswith("/v1"):  # FastAPI's own body, safely rendered
            return AsciiJSONResponse(status_code=422, content={"detail": jsonable_encoder(error.errors())})
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", []) if part != "body"]
        message = first.get("msg", "invalid request")
        param = ".".join(location) or None
        return _envelope(400, f"{param}: {message}" if param else message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if not request.url.path.startswith("/v1"):
            return await default_http(request, error)
        return _envelope(error.status_code, str(error.detail), headers=getattr(error, "headers", None))
