"""Turning validated API bodies into engine inputs, enforcing the token limits."""

from __future__ import annotations

from memoir_core import EditInputError, GenerationRequest, Prompt, SamplingParams, edit_frames

from ..runtime import Runtime
from ..schemas import ChatMessage, EditCreate, PromptInput
from .edit_log import NewEdit
from .prompts import Message, PromptError, chat_prompt, count_tokens, plain_prompt


class LimitExceeded(ValueError):
    """A request over a configured limit (the API answers 422 and changes nothing)."""


def as_messages(messages: list[ChatMessage]) -> list[Message]:
    return [Message(m.role, m.content) for m in messages]


def _question(asked: str | list[ChatMessage]) -> str | list[Message]:
    return asked if isinstance(asked, str) else as_messages(asked)


def _question_tokens(tokenizer, asked: str | list[ChatMessage]) -> int:
    """Tokens of the question itself (a chat question: its last user message)."""
    return count_tokens(tokenizer, asked if isinstance(asked, str) else asked[-1].content)


def edit_prompt(runtime: Runtime, body: PromptInput) -> Prompt:
    tokenizer = runtime.engine.tokenizer
    if body.messages is not None:
        return chat_prompt(tokenizer, as_messages(body.messages))
    return plain_prompt(body.prompt)


def new_edit(runtime: Runtime, body: EditCreate, index: int | None = None) -> NewEdit:
    """The edit to queue: the question and each paraphrase rendered in every frame the model serves."""
    settings, tokenizer = runtime.settings, runtime.engine.tokenizer
    where = "" if index is None else f"edits[{index}]: "
    asked = body.prompt if body.messages is None else body.messages
    paraphrases = body.paraphrases or []
    try:
        frames = edit_frames(tokenizer, _question(asked), [_question(p) for p in paraphrases])
    except PromptError as error:
        raise PromptError(f"{where}{error}") from None
    for name, question in [("the prompt", asked), *((f"paraphrases[{i}]", p) for i, p in enumerate(paraphrases))]:
        prompt_tokens = _question_tokens(tokenizer, question)
        if prompt_tokens > settings.max_prompt_tokens:
            raise LimitExceeded(
                f"{where}{name} has {prompt_tokens} tokens; the limit is {settings.max_prompt_tokens}"
            )
    target_tokens = count_tokens(tokenizer, " " + body.target)
    if target_tokens > settings.max_target_tokens:
        raise LimitExceeded(
            f"{where}the target has {target_tokens} tokens; the limit is {settings.max_target_tokens}"
        )
    # trained as context template + prompt + target + end-of-sequence: all must fit the model
    context = runtime.engine.context_length
    longest_template = max((count_tokens(tokenizer, t) for t in runtime.engine.context_templates), default=0)
    total = longest_template + max(count_tokens(tokenizer, f.text) for f in frames) + target_tokens + 1
    if context is not None and total > context:
        raise LimitExceeded(f"{where}prompt and target take {total} tokens; the model's context is {context}")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    submitted = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in paraphrases] or None
    return NewEdit(
        prompt=body.prompt or "", target=body.target, frames=frames, messages=messages, paraphrases=submitted
    )


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
    ids, window_start = input_ids(runtime, prompt)
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


def input_ids(runtime: Runtime, prompt: Prompt) -> tuple[list[int], int]:
    """Token ids of a prompt to decide or generate for, and its feature window start, within the limit."""
    try:
        ids, window_start = runtime.engine.encode(prompt)
    except EditInputError as error:
        raise PromptError(str(error)) from None
    if len(ids) > runtime.settings.max_input_tokens:
        raise LimitExceeded(f"the prompt has {len(ids)} tokens; the limit is {runtime.settings.max_input_tokens}")
    return ids, window_start


def decision_prompt(runtime: Runtime, body: PromptInput) -> Prompt:
    """What /explain decides for: a plain prompt as /generate renders it, messages as chat does."""
    prompt = edit_prompt(runtime, body)
    input_ids(runtime, prompt)
    return prompt
