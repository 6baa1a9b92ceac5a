"""The exact prompt text the model sees, for plain prompts and for chat messages (rendered by
`memoir_core.frames`, which also trains every edit in both frames)."""

from __future__ import annotations

from memoir_core.frames import CHAT_FORMAT, Message, Prompt, PromptError, chat_prompt

__all__ = ["CHAT_FORMAT", "Message", "PromptError", "chat_prompt", "count_tokens", "plain_prompt"]


def plain_prompt(text: str) -> Prompt:
    return Prompt(text)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
