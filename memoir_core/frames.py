"""The frames a question is asked in: plain text, and the model's chat template.

A fact corrected in one frame only is not corrected in the other: the chat template changes every
activation of the question and the answer starts in a different place, so an edit trained on
"Q A" does not make the chat model answer A (and the reverse). An edit is therefore trained and
keyed in every frame the service serves, whichever frame it was submitted in, and in the same
frames for each of its paraphrases (`edit_frames`).

Chat prompts keep their memory decision to the tokens from the last user message on: the
template's shared preamble would otherwise dominate every prompt's mean activation and make
unrelated questions look alike. The memory itself also applies from there on (`memory.Routing`,
`editor.EditBatch.memory_on`): the template and earlier turns keep the base model's states, in
serving as in training, which lets training compute them once (`split_pass`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .tophash import TEXT_FORMAT

CHAT_FORMAT = "chat"


@dataclass(frozen=True)
class Prompt:
    """Prompt text, where its feature window starts (characters; chat: the user's message), and
    its format (which background mean de-centres it: "text", or "chat")."""

    text: str
    feature_start: int = 0
    format: str = TEXT_FORMAT

    @property
    def answer_separator(self) -> str:
        """What goes between the prompt and its answer: a space in text, nothing after the
        chat template's assistant header (the chat model starts its answer right there)."""
        return "" if self.format == CHAT_FORMAT else " "


PromptLike = str | Prompt


def as_prompt(prompt: PromptLike) -> Prompt:
    return prompt if isinstance(prompt, Prompt) else Prompt(prompt)


class PromptError(ValueError):
    """Input that cannot become a prompt (the API answers 4xx)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Question = str | Sequence[Message]  # a plain question, or chat messages ending with the user's


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, messages: Sequence[Message]) -> Prompt:
    if not has_chat_template(tokenizer):
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


def question_frames(tokenizer, question: Question) -> list[Prompt]:
    """The question in its submitted frame first, then in the other frame the model serves: a
    plain question also as a chat user message, chat messages also as their last user message."""
    if isinstance(question, str):
        plain = Prompt(question)
        return [plain, chat_prompt(tokenizer, [Message("user", question)])] if has_chat_template(tokenizer) else [plain]
    return [chat_prompt(tokenizer, question), Prompt(question[-1].content)]


def edit_frames(tokenizer, question: Question, paraphrases: Sequence[Question] = ()) -> list[Prompt]:
    """Every frame an edit is trained and keyed in: the question's, then each paraphrase's, without
    repeats. The first is the submitted prompt itself."""
    frames: list[Prompt] = []
    for asked in (question, *paraphrases):
        frames += [f for f in question_frames(tokenizer, asked) if f not in frames]
    return frames
