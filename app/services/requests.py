"""Turning validated API bodies into engine inputs, enforcing the token limits."""

from __future__ import annotations

from memoir_core import EditInputError, GenerationRequest, Prompt, SamplingParams

from ..runtime import Runtime
from ..schemas import ChatMessage, EditCreate
from .edit_log import NewEdit
from .prompts import Message, PromptError, chat_prompt, count_tokens, plain_prompt


class LimitExceeded(ValueError):
    """A request over a configured limit (the API answers 422 and changes nothing)."""


def as_messages(messages: list[ChatMessage]) -> list[Message]:
    return [Message(m.role, m.content) for m in messages]


def edit_prompt(runtime: Runtime, body: EditCreate) -> Prompt:
    tokenizer = runtime.engine.tokenizer
    if body.messages is not None:
        return chat_prompt(tokenizer, as_messages(body.messages))
    return plain_prompt(body.prompt)


def new_edit(runtime: Runtime, body: EditCreate, index: int | None = None) -> NewEdit:
    settings, tokenizer = runtime.settings, runtime.engine.tokenizer
    where = "" if index is None else f"edits[{index}]: "
    try:
        prompt = edit_prompt(runtime, body)
    except PromptError as error:
        raise PromptError(f"{where}{error}") from None
    prompt_tokens = count_tokens(tokenizer, prompt.text[prompt.feature_start :] if body.messages else prompt.text)
    if prompt_tokens > settings.max_prompt_tokens:
        raise LimitExceeded(
            f"{where}the prompt has {prompt_tokens} tokens; the limit is {settings.max_prompt_tokens}"
        )
    target_tokens = count_tokens(tokenizer, " " + body.target)
    if target_tokens > settings.max_target_tokens:
        raise LimitExceeded(
            f"{where}the target has {target_tokens} tokens; the limit is {settings.max_target_tokens}"
        )
    # trained as context template + prompt + target + end-of-sequence: all must fit the model
    context = runtime.engine.context_length
    longest_template = max((count_tokens(tokenizer, t) for t in runtime.engine.context_templates), default=0)
    total = longest_template + count_tokens(tokenizer, prompt.text) + target_tokens + 1
    if context is not None and total > context:
        raise LimitExceeded(f"{where}prompt and target take {total} tokens; the model's context is {context}")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    return NewEdit(prompt=body.prompt or "", target=body.target, train_prompt=prompt, messages=messages)


def generation_request(
    runtime: Runtime,
    prompt: Prompt,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    stop: list[str],
    seed: int | None,
    use_edits: bool,
    on_text=None,
    cancel=None,
    default_new_tokens: int = 0,
) -> GenerationRequest:
    """max_new_tokens None: as many as fit, up to `default_new_tokens`."""
    settings, context = runtime.settings, runtime.engine.context_length
    try:
        ids, window_start = runtime.engine.encode(prompt)
    except EditInputError as error:
        raise PromptError(str(error)) from None
    if len(ids) > settings.max_input_tokens:
        raise LimitExceeded(f"the prompt has {len(ids)} tokens; the limit is {settings.max_input_tokens}")
    if max_new_tokens is None:
        max_new_tokens = min(default_new_tokens, context - len(ids)) if context else default_new_tokens
        max_new_tokens = max(max_new_tokens, 1)
    if max_new_tokens > settings.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens is {max_new_tokens}; the limit is {settings.max_new_tokens}")
    if context is not None and len(ids) + max_new_tokens > context:
        raise LimitExceeded(
            f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}: "
            f"more than the model's context of {context} tokens"
        )
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed
    )
    return GenerationRequest(ids, window_start, params, use_edits, on_text, cancel, prompt.format)
