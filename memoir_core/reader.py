"""Reader: batched forwards through the memory for logits and teacher-forced scores.

It is separate from the engine because it only reads: each call routes through one snapshot of the
published memory, which the engine's `routing` supplies, and never changes what is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .editor import EditInputError
from .featurizer import Featurizer
from .frames import Prompt, PromptLike, as_prompt
from .generation import input_device
from .memory import Decision, ResidualMemory, Routing
from .tokens import left_pad


@dataclass(frozen=True)
class ScoredContinuation:
    """Teacher-forced scoring of a target after a prompt (the paper's evaluation)."""

    predicted: list[int]  # argmax at each target position
    labels: list[int]  # the target tokens
    nll: float  # mean negative log-likelihood of the target tokens
    decision: Decision | None

    @property
    def accuracy(self) -> float:
        return sum(p == t for p, t in zip(self.predicted, self.labels)) / len(self.labels)


class Reader:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        memory: ResidualMemory,
        features: Featurizer,
        routing: Callable[..., Routing],
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.memory = memory
        self.features = features
        self.routing = routing  # the engine's: one snapshot of the published memory per call

    @torch.no_grad()
    def logits(
        self, texts: list[PromptLike], prompt_lengths: list[int] | None = None, use_edits: bool = True, keep: int = 0
    ) -> tuple[torch.Tensor, list[Decision]]:
        """One batched forward: logits [B, T or keep, V] and each row's decision (`MemoirEngine.logits`)."""
        encoded = [self.features.encode(t) for t in texts]
        rows = [ids for ids, _ in encoded]
        ends = prompt_lengths or [len(ids) for ids in rows]
        batch = left_pad(rows, self.tokenizer.pad_token_id, input_device(self.model))
        formats = [as_prompt(t).format for t in texts]
        routing = self.routing(batch.window([s for _, s in encoded], ends), torch.full((len(rows),), use_edits), formats)
        with self.memory.using(routing):
            logits = self.model(**batch.model_inputs(), use_cache=False, logits_to_keep=keep).logits
        return logits, routing.decisions

    def score(
        self, pairs: list[tuple[PromptLike, str]], use_edits: bool = True, batch_size: int = 16
    ) -> list[ScoredContinuation]:
        """Teacher-forced scoring (see `MemoirEngine.score`)."""
        results: list[ScoredContinuation] = []
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            texts, prompt_lens, targets = [], [], []
            for prompt, target in chunk:
                prompt = as_prompt(prompt)
                ids, start = self.features.encode(prompt)
                texts.append(Prompt(f"{prompt.text}{prompt.answer_separator}{target}", prompt.feature_start, prompt.format))
                full = self.tokenizer(texts[-1].text)["input_ids"]
                if len(full) <= len(ids):
                    raise EditInputError(f"target {target!r} adds no tokens to its prompt")
                prompt_lens.append(len(ids))
                targets.append(full[len(ids) :])
            keep = max(len(t) for t in targets) + 1
            logits, decisions = self.logits(texts, prompt_lens, use_edits, keep)
            for row, labels in enumerate(targets):
                predicting = logits[row, keep - len(labels) - 1 : keep - 1].float()
                label_tensor = torch.tensor(labels, device=predicting.device)
                nll = torch.nn.functional.cross_entropy(predicting, label_tensor).item()
                results.append(ScoredContinuation(predicting.argmax(-1).tolist(), labels, nll, decisions[row]))
        return results
