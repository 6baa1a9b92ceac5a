"""Featurizer: from prompts to the features and masks that decide which edit fires.

It owns the tokenizer side (a prompt's ids and feature window), the activation side (token means
of a(x) at the edited layer, memory off), the hasher that turns means into masks, the background
prompts and their cached masks, and the calibrated tau that those masks give. It is separate from
the engine because none of this depends on the published memory: the engine reads and publishes
memories, the featurizer only describes prompts.
"""

from __future__ import annotations

import threading

import torch

from .editor import EditInputError
from .frames import CHAT_FORMAT, Message, PromptLike, as_prompt, chat_prompt, has_chat_template
from .generation import input_device
from .hooks import thread_hooks
from .key_projector import ROUTER_MARGIN, KeyProjector
from .mask_index import MaskIndex
from .memory import CaptureMeans, ResidualMemory
from .tokens import left_pad
from .tophash import TopHasher


class _StopAfterBlock(Exception):
    pass


class Featurizer:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        blocks: list[torch.nn.Module],
        layer: int,
        memory: ResidualMemory,
        device: torch.device,
        width: int,
        seed: int,
        top_k: int,
        calibration_margin: float,
        background_prompts: list[PromptLike],
        lock: threading.RLock,
        projector: KeyProjector | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.layer = layer
        self.memory = memory
        self.device = device
        self.width = width
        self.calibration_margin = calibration_margin
        # the engine's write lock: hasher changes and the background-mask cache are serialised
        # with edits and publishing, as they were when the engine did this itself
        self._lock = lock
        permutation = TopHasher.new_permutation(width, seed)
        self.hasher = TopHasher(permutation, top_k, self.prompt_means(background_prompts).mean(dim=0).cpu())
        self.hasher_on_device = self.hasher.to(device)
        self.background_prompts: list[PromptLike] = list(background_prompts)  # every format's, for calibration
        self._background_masks: torch.Tensor | None = None  # their masks under the current hasher
        # set: edits are found by router keys (key_projector), matched by cosine, not by masks
        self.projector = projector.to(device) if projector is not None else None
        self._background_router_keys: torch.Tensor | None = None

    def encode(self, prompt: PromptLike) -> tuple[list[int], int]:
        """Token ids of a prompt and the index of the first token of its feature window."""
        prompt = as_prompt(prompt)
        ids = self.tokenizer(prompt.text)["input_ids"]
        start = len(self.tokenizer(prompt.text[: prompt.feature_start])["input_ids"]) if prompt.feature_start else 0
        if not ids:
            raise EditInputError("the prompt is empty")
        if start >= len(ids):
            raise EditInputError("the prompt has no tokens after its feature start")
        return ids, start

    def prompt_means(self, prompts: list[PromptLike], batch_size: int = 16) -> torch.Tensor:
        """[N, D] plain token means of a(x) over each prompt's feature window (memory off)."""
        encoded = [self.encode(p) for p in prompts]
        return self.window_means([ids for ids, _ in encoded], [s for _, s in encoded], [len(ids) for ids, _ in encoded], batch_size)

    @torch.no_grad()
    def window_means(self, rows: list[list[int]], starts: list[int], stops: list[int], batch_size: int = 16) -> torch.Tensor:
        """[N, D] token means of a(x) over positions starts[n]..stops[n]-1 of each token row (memory off)."""
        means = []
        block = self.blocks[self.layer]

        def stop(*_, **__):
            raise _StopAfterBlock

        for first in range(0, len(rows), batch_size):
            part = slice(first, first + batch_size)
            batch = left_pad(rows[part], self.tokenizer.pad_token_id, input_device(self.model))
            capture = CaptureMeans(batch.window(starts[part], stops[part]))
            try:  # the blocks above the edited one cannot change a(x): stop after it
                with self.memory.using(capture), thread_hooks(post=[(block, stop)]):
                    self.model(**batch.model_inputs(), use_cache=False)
            except _StopAfterBlock:
                pass
            means.append(capture.means)
        return torch.cat(means)

    def prompt_masks(self, prompts: list[PromptLike]) -> torch.Tensor:
        return self.prompt_keys(prompts)[0]

    def prompt_keys(self, prompts: list[PromptLike]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, D] masks and [N, d] router keys of prompts (None without a projector)."""
        formats = [as_prompt(p).format for p in prompts]
        means = self.prompt_means(prompts)
        return self.hasher_on_device.masks(means, formats), self.router_keys(self.hasher_on_device, means, formats)

    def router_keys(self, hasher: TopHasher, means: torch.Tensor, formats: list[str] | None) -> torch.Tensor | None:
        """[B, d] router keys of token means, de-centred as their masks are (None without a projector)."""
        if self.projector is None:
            return None
        return self.projector.keys(means.to(torch.float32) - hasher.centres(formats, means.shape[0], means.device))

    def add_background(self, format: str, prompts: list[PromptLike]) -> None:
        """Background mean for another prompt format, from irrelevant prompts in that format."""
        mean = self.prompt_means(prompts).mean(dim=0).cpu()
        with self._lock:
            self.hasher = self.hasher.with_background(format, mean)
            self.hasher_on_device = self.hasher.to(self.device)
            self.background_prompts += list(prompts)
            self._background_masks = self._background_router_keys = None

    def add_chat_background(self, prompts: list[str]) -> None:
        """The chat frame's background mean: the same irrelevant prompts as chat user messages
        (nothing when the model has no chat template)."""
        if has_chat_template(self.tokenizer):
            self.add_background(CHAT_FORMAT, [chat_prompt(self.tokenizer, [Message("user", p)]) for p in prompts])

    def adopt_hasher(self, hasher: TopHasher) -> None:
        """Take over a persisted permutation, k and background means (the caller holds the lock)."""
        self.hasher = hasher
        self.hasher_on_device = hasher.to(self.device)
        self._background_masks = self._background_router_keys = None

    def calibrated_threshold(self, index: MaskIndex) -> float:
        """Tau for a memory with these masks, from the background prompts (calibrated mode, eval)."""
        if index.router is not None:
            return self._router_threshold(index)
        with self._lock:
            if self._background_masks is None:  # the prompts' masks do not depend on W_m
                self._background_masks = self.prompt_masks(self.background_prompts).cpu()
            masks = self._background_masks
        # just above the highest ratio they reach, never below chance overlap (k / D) plus the margin
        highest = max((m.ratio for m in index.best(masks) if m), default=0.0)
        return min(1.0, max(highest, self.hasher.top_k / self.width) + self.calibration_margin)

    def _router_threshold(self, index: MaskIndex) -> float:
        """Tau of router matching: just above the best cosine the background prompts reach."""
        with self._lock:
            if self._background_router_keys is None:
                self._background_router_keys = self.prompt_keys(self.background_prompts)[1].cpu()
            keys = self._background_router_keys
        highest = max((m.ratio for m in index.best_by_router(keys) if m), default=0.0)
        return min(1.0, highest + ROUTER_MARGIN)
