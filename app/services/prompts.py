"""The exact prompt text the model sees, for plain prompts and for chat messages.

Chat prompts are rendered with the tokenizer's chat template. Their memory decision uses only the
tokens from the last user message on: the template's shared system preamble would otherwise
dominate every prompt's mean activation and make unrelated questions look alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from memoir_core import Prompt

CHAT_FORMAT = "chat"


class PromptError(ValueError):
    """Input that cannot become a prompt (the API answers 4xx)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def plain_prompt(text: str) -> Prompt:
    return Prompt(text)


def chat_prompt(tokenizer, messages: list[Message]) -> Prompt:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; send a plain prompt instead")
    if not messages or messages[-1].role != "user":
        raise PromptError("the last message must have role 'user'")
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
    )
    start = rendered.rfind(messages[-1].content)
    if start < 0:
        raise PromptError("the chat template dropped the user's message")
    return Prompt(rendered, start, CHAT_FORMAT)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
