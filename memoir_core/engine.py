"""MemoirEngine: one object that owns the model, the residual memory, the masks and the hasher.

Reads (generation, scoring, routing) take an immutable snapshot of the memory once per call, so a
request sees the state before or after an edit, never half of one. Writes (edit, reset, load) are
serialised by one lock and publish a new snapshot atomically when they finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
import hashlib
import logging
import threading
import time
from typing import Sequence

import torch

from . import arch
from .arch_check import check_fast_path
from .background import default_background_prompts
from .families import covered
from .editor import (
    EditHyperParams,
    EditInputError,
    build_edit_batch,
    generate_context_templates,
    train_fast,
    train_reference,
    usage_scale,
)
from .hooks import thread_hooks
from .generation import DecodeBatch, GenerationOutput, GenerationRequest, generate, input_device
from .mask_index import MaskIndex, distinct_rows, mask_fingerprint, pack_masks
from .memory import CaptureMeans, Decision, MemorySnapshot, ResidualMemory, Routing
from .frames import CHAT_FORMAT, Message, Prompt, PromptLike, as_prompt, chat_prompt, has_chat_template
from .models import LoadedModel, load_model
from .tokens import left_pad
from .tophash import TopHasher

log = logging.getLogger(__name__)
# tokens of the one forward pass that checks the fast edit path's relations on a loaded model
_CHECK_TEXT = "MEMOIR checks where its memory sits on this short sentence."


@dataclass(frozen=True)
class PresetChoice:
    """Which preset a configuration's values come from, and why (presets.recommended_config)."""

    name: str
    reason: str


@dataclass(frozen=True)
class MemoirConfig:
    layer: int | None = None  # default: round(27/32 * number of blocks)
    top_k: int | None = None  # default: round(4096/14336 * D)
    threshold: float = 0.4  # tau: the memory fires when the best match ratio is >= tau
    # True: every published memory gets its own tau, just above the best ratio that the background
    # (irrelevant) prompts reach against its masks; `threshold` is then unused
    calibrate_threshold: bool = False
    calibration_margin: float = 0.05
    seed: int = 42  # permutation seed
    fast_edit: bool = True  # False: the straightforward full-model loop (reference)
    hyper: EditHyperParams = field(default_factory=EditHyperParams)
    preset: PresetChoice | None = None  # where these values come from (reported, not used here)


@dataclass(frozen=True)
class EditResult:
    key: str
    mask_fingerprint: str  # of the first frame's mask (the submitted prompt's)
    masks: int  # masks stored for the edit: one per frame, identical ones once
    loss: float
    iterations: int
    losses: list[float]
    seconds: float
    applied: int  # edits in the memory after this one


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


@dataclass(frozen=True)
class MemoryState:
    """A complete memory: float32 W_m (never modified in place) and what readers see of it."""

    master: torch.Tensor  # float32 W_m [out, D]
    snapshot: MemorySnapshot
    threshold: float | None = None  # this memory's own tau (calibrated mode), else the engine's
    # float32 [D, D] sum of the stored edits' key second moments on their own columns; kept
    # only while edits are trained with hyper.protect (the editor steers new steps away from them)
    key_moments: torch.Tensor | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The edit key of every stored mask, in storage order (an edit owns one mask per frame)."""
        return self.snapshot.index.keys

    @property
    def edit_keys(self) -> tuple[str, ...]:
        """Each stored edit's key once, in apply order."""
        return self.snapshot.index.edit_keys


class _StopAfterBlock(Exception):
    pass


class MemoirEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: MemoirConfig | None = None,
        background_prompts: list[str] | None = None,
        context_templates: list[str] | None = None,
    ):
        self.config = config or MemoirConfig()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.arch = spec = arch.arch_spec(self.model)
        self.blocks = arch.blocks(self.model, spec)
        self.layer = self.config.layer if self.config.layer is not None else arch.default_layer(len(self.blocks))
        if not 0 <= self.layer < len(self.blocks):
            raise ValueError(f"layer {self.layer} is outside 0..{len(self.blocks) - 1}")
        self.memory = self._install_memory(spec.projection)
        self.out_features, self.width = arch.projection_shape(self.memory.projection)
        self.device = self.memory.projection.weight.device
        self.fast_path = check_fast_path(
            self.model, spec, self.blocks, self.layer, self.memory, self.tokenizer(_CHECK_TEXT)["input_ids"]
        )
        log.info("%s (%s): memory at %s", self.model_id, spec.family, spec.describe())
        if not covered(spec.family):
            log.warning(
                "%s: model_type %r is not among the families the tests cover (memoir_core/families.py)",
                self.model_id,
                spec.family,
            )
        for note in self.fast_path.notes:
            log.warning("%s (%s): %s", self.model_id, spec.family, note)
        self.fixed_threshold = self.config.threshold
        self._lock = threading.RLock()
        self._fingerprint: str | None = None

        top_k = self.config.top_k or arch.default_top_k(self.width)
        permutation = TopHasher.new_permutation(self.width, self.config.seed)
        prompts = background_prompts if background_prompts is not None else default_background_prompts()
        self.hasher = TopHasher(permutation, top_k, self.prompt_means(prompts).mean(dim=0).cpu())
        self.hasher_on_device = self.hasher.to(self.device)
        self.background_prompts: list[PromptLike] = list(prompts)  # every format's, for calibration
        self._background_masks: torch.Tensor | None = None  # their masks under the current hasher
        self.context_templates = (
            list(context_templates)
            if context_templates is not None
            else generate_context_templates(self.model, self.tokenizer, input_device(self.model))
        )
        self._memory = self._empty_memory()

    @classmethod
    def from_pretrained(
        cls, source: str | None = None, device: str = "auto", dtype: str = "auto", config: MemoirConfig | None = None, **kwargs
    ) -> "MemoirEngine":
        return cls(load_model(source, device=device, dtype=dtype), config, **kwargs)

    # ---- set-up -------------------------------------------------------------------------------

    def _install_memory(self, projection_path: str) -> ResidualMemory:
        block = self.blocks[self.layer]
        parent_path, name = arch.split_parent(projection_path)
        parent = block.get_submodule(parent_path) if parent_path else block
        current = getattr(parent, name)
        if isinstance(current, ResidualMemory):  # a second engine on the same model
            return current
        memory = ResidualMemory(current)
        setattr(parent, name, memory)
        return memory

    def _empty_memory(self) -> MemoryState:
        master = torch.zeros(self.out_features, self.width, dtype=torch.float32, device=self.device)
        return self._publishable(master, MaskIndex(self.width, self.hasher.top_k), 0)

    def _publishable(
        self, master: torch.Tensor, index: MaskIndex, applied: int, key_moments: torch.Tensor | None = None
    ) -> MemoryState:
        compute_dtype = self.memory.projection.weight.dtype
        weight = master if compute_dtype == torch.float32 else master.to(compute_dtype)
        return MemoryState(master, MemorySnapshot(weight, index, applied), key_moments=key_moments)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def snapshot(self) -> MemorySnapshot:
        return self._memory.snapshot

    @property
    def threshold(self) -> float:
        """The tau requests are decided with now: the published memory's own when calibrated."""
        return self.threshold_of(self._memory)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.fixed_threshold = value

    def threshold_of(self, state: MemoryState) -> float:
        return state.threshold if state.threshold is not None else self.fixed_threshold

    @property
    def state(self) -> MemoryState:
        return self._memory

    @property
    def master_weight(self) -> torch.Tensor:
        return self._memory.master

    @property
    def top_k(self) -> int:
        return self.hasher.top_k

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (prompt + generated tokens), from its config."""
        config = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def weights_fingerprint(self) -> str:
        """Identifies the base weights at the edited layer, independent of fp32/bf16 loading."""
        if self._fingerprint is None:
            weight = self.memory.projection.weight.detach().to("cpu", torch.bfloat16).contiguous()
            digest = hashlib.sha256()
            digest.update(f"{self.model.config.model_type}:{len(self.blocks)}:{tuple(weight.shape)}".encode())
            digest.update(weight.view(torch.int16).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ---- prompt features ----------------------------------------------------------------------

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
        formats = [as_prompt(p).format for p in prompts]
        return self.hasher_on_device.masks(self.prompt_means(prompts), formats)

    def add_background(self, format: str, prompts: list[PromptLike]) -> None:
        """Background mean for another prompt format, from irrelevant prompts in that format."""
        mean = self.prompt_means(prompts).mean(dim=0).cpu()
        with self._lock:
            self.hasher = self.hasher.with_background(format, mean)
            self.hasher_on_device = self.hasher.to(self.device)
            self.background_prompts += list(prompts)
            self._background_masks = None

    def add_chat_background(self, prompts: list[str]) -> None:
        """The chat frame's background mean: the same irrelevant prompts as chat user messages
        (nothing when the model has no chat template)."""
        if has_chat_template(self.tokenizer):
            self.add_background(CHAT_FORMAT, [chat_prompt(self.tokenizer, [Message("user", p)]) for p in prompts])

    def decide(self, prompts: list[PromptLike]) -> list[Decision]:
        """Which stored edit (if any) would fire for each prompt."""
        state = self._memory
        threshold = self.threshold_of(state)
        matches = state.snapshot.index.best(self.prompt_masks(prompts))
        return [Decision(m, m is not None and m.ratio >= threshold) for m in matches]

    # ---- editing ------------------------------------------------------------------------------

    def train(
        self,
        prompt: PromptLike | Sequence[PromptLike],
        target: str,
        key: str | None = None,
        append_eos: bool = False,
        base: MemoryState | None = None,
    ) -> tuple[EditResult, MemoryState]:
        """Train one fact on top of `base` (default: the published memory) without publishing.

        prompt: one prompt, or the frames of one edit (`frames.edit_frames`): each frame is
        trained through its own mask and stores it under the edit's key, so whichever frame a
        question is asked in finds the edit. The first frame also gets the context-template rows.
        append_eos: also train the end-of-sequence token after the target, so generation stops
        after the corrected answer (the paper's protocol trains the target alone).
        """
        frames = [as_prompt(p) for p in ([prompt] if isinstance(prompt, (str, Prompt)) else prompt)]
        if not frames or not target.strip() or any(not f.text.strip() for f in frames):
            raise EditInputError("prompt and target must be non-empty")
        if append_eos:
            target = target + self.tokenizer.eos_token
        started = time.perf_counter()
        base = base or self._memory
        applied = base.snapshot.applied + 1
        key = key if key is not None else f"edit-{applied}"
        frame_masks = self.prompt_masks(frames)
        columns = frame_masks.any(dim=0).nonzero().flatten()
        device = input_device(self.model)
        edits = [
            build_edit_batch(
                self.tokenizer, self.context_templates if i == 0 else [], f.text, target, device, f.answer_separator
            )
            for i, f in enumerate(frames)
        ]
        column_scale = None
        if self.config.hyper.column_step == "usage":
            index = base.snapshot.index
            column_scale = usage_scale(index.column_usage(columns), len(index), index.top_k, index.width)
        stored_moments = None
        if base.key_moments is not None:
            stored_moments = base.key_moments[columns[:, None], columns]
        if self.config.fast_edit and self.fast_path.usable:
            trained = train_fast(
                self.model,
                self.blocks,
                self.layer,
                self.memory,
                edits,
                frame_masks,
                base.master,
                self.config.hyper,
                head=partial(arch.apply_final_norm_and_head, self.model, spec=self.arch),
                additive=self.fast_path.additive,
                residual_scale=self.arch.residual_scale,
                reuse_block_inputs=self.fast_path.same_block_inputs,
                last_mlp=self.blocks[-1].get_submodule(self.arch.mlp),
                column_scale=column_scale,
                stored_moments=stored_moments,
            )
        else:
            trained = train_reference(
                self.model, self.memory, edits, frame_masks, base.master, self.config.hyper, column_scale, stored_moments
            )
        key_moments = None
        if trained.key_moment is not None:
            stored = base.key_moments
            # a copy, not an in-place add: a state trained but never published must leave its
            # base intact, as W_m's copy does; one [D, D] copy is small beside the edit's 30 passes
            key_moments = stored.clone() if stored is not None else base.master.new_zeros(self.width, self.width)
            key_moments[columns[:, None], columns] += trained.key_moment.to(key_moments.device)
        packed = distinct_rows(pack_masks(frame_masks))
        state = self._publishable(
            trained.weight, base.snapshot.index.appended(packed, [key] * len(packed)), applied, key_moments
        )
        result = EditResult(
            key=key,
            mask_fingerprint=mask_fingerprint(packed[0]),
            masks=len(packed),
            loss=trained.loss,
            iterations=trained.iterations,
            losses=trained.losses,
            seconds=time.perf_counter() - started,
            applied=applied,
        )
        return result, state

    def publish(self, state: MemoryState) -> None:
        """Make a memory state the one every new request reads (one reference swap).

        Calibrated mode: the state gets its tau first (unless it carries one), so masks and tau
        change together."""
        with self._lock:
            self._memory = self.with_threshold(state)

    def with_threshold(self, state: MemoryState) -> MemoryState:
        """The state with its own tau, in calibrated mode (as it will be published)."""
        if self.config.calibrate_threshold and state.threshold is None:
            return replace(state, threshold=self.calibrated_threshold(state.snapshot.index))
        return state

    def edit(
        self, prompt: PromptLike | Sequence[PromptLike], target: str, key: str | None = None, append_eos: bool = False
    ) -> EditResult:
        """Train one fact into the published memory and publish the result."""
        with self._lock:
            result, state = self.train(prompt, target, key, append_eos)
            self.publish(state)
            return result

    def adopt_hasher(self, hasher: TopHasher, context_templates: list[str]) -> None:
        """Take over a persisted permutation, k, background mean and templates."""
        with self._lock:
            self.hasher = hasher
            self.hasher_on_device = hasher.to(self.device)
            self.context_templates = list(context_templates)
            self._background_masks = None

    def save(self, path, state: MemoryState | None = None) -> str:
        """Write a memory state (default: the published one) to one safetensors file; returns its sha256."""
        from .state import save_state

        return save_state(self, path, state or self.state)

    def load(self, path) -> dict:
        """Restore a saved memory; raises state.StateMismatch for another model or layer."""
        from .state import load_state

        with self._lock:
            return load_state(self, path)

    def reset(self) -> None:
        self.publish(self.empty_state())

    def empty_state(self) -> MemoryState:
        return self._empty_memory()

    def memory_state(
        self, master: torch.Tensor, index: MaskIndex, applied: int, key_moments: torch.Tensor | None = None
    ) -> MemoryState:
        """A memory state from stored parts (see `state.read_state`), not yet published."""
        if key_moments is not None:
            key_moments = key_moments.to(self.device, torch.float32)
        return self._publishable(master.to(self.device, torch.float32), index, applied, key_moments)

    # ---- reading ------------------------------------------------------------------------------

    def routing(
        self, window: torch.Tensor, allow: torch.Tensor | None = None, formats: list[str] | None = None
    ) -> Routing:
        state = self._memory
        return Routing(window, self.hasher_on_device, state.snapshot, self.threshold_of(state), allow, formats)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Decode requests together to the end (see `decode_batch` for a batch that rows can join)."""
        return generate(self.model, self.tokenizer, self.memory, self.routing, requests)

    def decode_batch(self) -> DecodeBatch:
        """A continuous batch: requests join between decoding steps, each with its own decision."""
        return DecodeBatch(self.model, self.tokenizer, self.memory, self.routing)

    @torch.no_grad()
    def logits(
        self, texts: list[PromptLike], prompt_lengths: list[int] | None = None, use_edits: bool = True, keep: int = 0
    ) -> tuple[torch.Tensor, list[Decision]]:
        """One batched forward: logits [B, T or keep, V] and each row's memory decision.

        prompt_lengths: tokens per row that are prompt (the decision window ends there); default
        the whole text. keep: only the last `keep` positions' logits (0 = all).
        """
        encoded = [self.encode(t) for t in texts]
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
        """Teacher-forced scoring (spec §7): input = prompt + " " + target, tokenised together; the
        prompt's own token count marks where the target starts; the decision uses prompt tokens."""
        results: list[ScoredContinuation] = []
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            texts, prompt_lens, targets = [], [], []
            for prompt, target in chunk:
                prompt = as_prompt(prompt)
                ids, start = self.encode(prompt)
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

    # ---- threshold ----------------------------------------------------------------------------

    def best_ratios(self, prompts: list[PromptLike]) -> list[float]:
        """Best match ratio of each prompt against the stored masks (0 when none are stored)."""
        return [d.match.ratio if d.match else 0.0 for d in self.decide(prompts)]

    def calibrated_threshold(self, index: MaskIndex) -> float:
        """Tau for a memory with these masks, from the engine's background prompts (calibrated mode, eval)."""
        with self._lock:
            if self._background_masks is None:  # the prompts' masks do not depend on W_m
                self._background_masks = self.prompt_masks(self.background_prompts).cpu()
            masks = self._background_masks
        # just above the highest ratio they reach, never below chance overlap (k / D) plus the margin
        highest = max((m.ratio for m in index.best(masks) if m), default=0.0)
        return min(1.0, max(highest, self.top_k / self.width) + self.config.calibration_margin)
