"""MemoirEngine: the facade over one model's residual memory, and the owner of what is published.

The work is done by parts with one job each: `featurizer` (prompts to features and masks, the
hasher, calibration), `edit_trainer` (one fact trained into a new, unpublished state), `reader`
(logits and scores) and `state` (files). The engine wires them to the model and keeps the lock
and the published memory, so callers see one object with the same methods as before.

Reads (generation, scoring, routing) take an immutable snapshot of the memory once per call, so a
request sees the state before or after an edit, never half of one. Writes (edit, reset, load) are
serialised by one lock and publish a new snapshot atomically when they finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import hashlib
import logging
import threading
from typing import Sequence

import torch

from . import arch
from .arch_check import check_fast_path
from .background import default_background_prompts
from .edit_trainer import EditResult, EditTrainer  # EditResult: re-exported, callers import it from here
from .families import covered
from .editor import EditHyperParams, generate_context_templates
from .featurizer import Featurizer
from .key_projector import KeyProjector, load_projector, packaged_projector
from .generation import DecodeBatch, GenerationOutput, GenerationRequest, generate, input_device
from .mask_index import MaskIndex
from .memory import Decision, MemorySnapshot, ResidualMemory, Routing
from .memory_state import MemoryState, publishable  # MemoryState: re-exported, as EditResult
from .frames import PromptLike
from .models import LoadedModel, load_model
from .reader import Reader, ScoredContinuation  # ScoredContinuation: re-exported, as EditResult
from .state import MemoryLayout
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
    # generation: a row's memory is switched off once it has said the matched edit's target, so
    # the answer continues as the unedited model's would; False: on to the end (the paper's)
    release_after_answer: bool = True
    # an edit that asks a stored edit's question again (the same normalised question, or a mask
    # identical to one of its masks) supersedes it: the earlier one is no longer found
    supersede: bool = True
    # which edit fires: None, TopHash mask overlap (the paper's); "auto", the shipped key projector
    # for this model when there is one (memoir_core/key_projector.py); or a projector file's path
    key_projector: str | None = None
    preset: PresetChoice | None = None  # where these values come from (reported, not used here)


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

        self.features = Featurizer(
            self.model,
            self.tokenizer,
            self.blocks,
            self.layer,
            self.memory,
            self.device,
            self.width,
            self.config.seed,
            self.config.top_k or arch.default_top_k(self.width),
            self.config.calibration_margin,
            background_prompts if background_prompts is not None else default_background_prompts(),
            self._lock,
            self._key_projector(),
        )
        self.context_templates = (
            list(context_templates)
            if context_templates is not None
            else generate_context_templates(self.model, self.tokenizer, input_device(self.model))
        )
        self.trainer = EditTrainer(
            self.model,
            self.tokenizer,
            spec,
            self.blocks,
            self.layer,
            self.memory,
            self.width,
            self.fast_path,
            self.config.hyper,
            self.config.fast_edit,
            self.features,
            self.config.supersede,
        )
        self.reader = Reader(self.model, self.tokenizer, self.memory, self.features, self.routing)
        self._memory = self._empty_memory()

    @classmethod
    def from_pretrained(
        cls, source: str | None = None, device: str = "auto", dtype: str = "auto", config: MemoirConfig | None = None, **kwargs
    ) -> "MemoirEngine":
        return cls(load_model(source, device=device, dtype=dtype), config, **kwargs)

    # ---- set-up -------------------------------------------------------------------------------

    def _key_projector(self) -> KeyProjector | None:
        choice = self.config.key_projector
        if not choice:
            return None
        projector = packaged_projector(self.weights_fingerprint) if choice == "auto" else load_projector(choice)
        if projector is None:
            log.info("%s: no key projector ships for this model; edits are found by their masks", self.model_id)
            return None
        if projector.fingerprint != self.weights_fingerprint or projector.weight.shape[0] != self.width:
            raise ValueError(f"the key projector {choice} was trained for another model or layer")
        log.info("%s: edits are found by key projector %s", self.model_id, projector.digest)
        return projector

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
        return publishable(master, index, applied, self.memory.projection.weight.dtype, key_moments)

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
    def hasher(self) -> TopHasher:
        return self.features.hasher

    @property
    def hasher_on_device(self) -> TopHasher:
        return self.features.hasher_on_device

    @property
    def background_prompts(self) -> list[PromptLike]:
        return self.features.background_prompts

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

    @property
    def layout(self) -> MemoryLayout:
        """What a saved state must fit to load here (state.check_compatible)."""
        config = self.model.config
        projector = self.features.projector
        return MemoryLayout(
            self.model_id,
            config.model_type,
            self.weights_fingerprint,
            self.layer,
            self.width,
            self.out_features,
            projector.digest if projector is not None else None,
        )

    # ---- prompt features (featurizer) ---------------------------------------------------------

    def encode(self, prompt: PromptLike) -> tuple[list[int], int]:
        """Token ids of a prompt and the index of the first token of its feature window."""
        return self.features.encode(prompt)

    def prompt_means(self, prompts: list[PromptLike], batch_size: int = 16) -> torch.Tensor:
        """[N, D] plain token means of a(x) over each prompt's feature window (memory off)."""
        return self.features.prompt_means(prompts, batch_size)

    def window_means(self, rows: list[list[int]], starts: list[int], stops: list[int], batch_size: int = 16) -> torch.Tensor:
        """[N, D] token means of a(x) over positions starts[n]..stops[n]-1 of each token row (memory off)."""
        return self.features.window_means(rows, starts, stops, batch_size)

    def prompt_masks(self, prompts: list[PromptLike]) -> torch.Tensor:
        return self.features.prompt_masks(prompts)

    def add_background(self, format: str, prompts: list[PromptLike]) -> None:
        """Background mean for another prompt format, from irrelevant prompts in that format."""
        self.features.add_background(format, prompts)

    def add_chat_background(self, prompts: list[str]) -> None:
        """The chat frame's background mean: the same irrelevant prompts as chat user messages
        (nothing when the model has no chat template)."""
        self.features.add_chat_background(prompts)

    def decide(self, prompts: list[PromptLike]) -> list[Decision]:
        """Which stored edit (if any) would fire for each prompt."""
        state = self._memory
        threshold = self.threshold_of(state)
        masks, router_keys = self.features.prompt_keys(prompts)
        index = state.snapshot.index
        matches = index.best_by_router(router_keys) if index.router is not None else index.best(masks)
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

        prompt: one prompt, or the frames of one edit (`frames.edit_frames`): every frame is
        trained through the plain question's mask, and each frame's mask is stored under the edit's
        key, so whichever frame a question is asked in finds the edit and applies that one mask.
        The question's chat frame (else the first) also gets the context-template rows.
        append_eos: also train the end-of-sequence token after the target, so generation stops
        after the corrected answer (the paper's protocol trains the target alone).
        """
        return self.trainer.train(prompt, target, key, append_eos, base or self._memory, self.context_templates)

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
            self.features.adopt_hasher(hasher)
            self.context_templates = list(context_templates)

    # ---- persistence (state.py) ---------------------------------------------------------------

    def state_tensors(self, state: MemoryState | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and metadata of a state file for a memory state (default: the published one)."""
        from .state import state_tensors

        state = state or self.state
        return state_tensors(
            state,
            self.hasher,
            self.layout,
            self.context_templates,
            self.threshold_of(state),
            self.config.calibrate_threshold,
            self.config.seed,
        )

    def save(self, path, state: MemoryState | None = None) -> str:
        """Write a memory state (default: the published one) to one safetensors file; returns its sha256."""
        from .state import save_state

        return save_state(path, *self.state_tensors(state))

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

    # ---- reading (reader) ---------------------------------------------------------------------

    def routing(
        self, window: torch.Tensor, allow: torch.Tensor | None = None, formats: list[str] | None = None
    ) -> Routing:
        state = self._memory
        return Routing(
            window, self.hasher_on_device, state.snapshot, self.threshold_of(state), allow, formats, self.features.router_keys
        )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Decode requests together to the end (see `decode_batch` for a batch that rows can join)."""
        return generate(self.model, self.tokenizer, self.memory, self.routing, requests, self.config.release_after_answer)

    def decode_batch(self) -> DecodeBatch:
        """A continuous batch: requests join between decoding steps, each with its own decision."""
        return DecodeBatch(self.model, self.tokenizer, self.memory, self.routing, self.config.release_after_answer)

    def logits(
        self, texts: list[PromptLike], prompt_lengths: list[int] | None = None, use_edits: bool = True, keep: int = 0
    ) -> tuple[torch.Tensor, list[Decision]]:
        """One batched forward: logits [B, T or keep, V] and each row's memory decision.

        prompt_lengths: tokens per row that are prompt (the decision window ends there); default
        the whole text. keep: only the last `keep` positions' logits (0 = all).
        """
        return self.reader.logits(texts, prompt_lengths, use_edits, keep)

    def score(
        self, pairs: list[tuple[PromptLike, str]], use_edits: bool = True, batch_size: int = 16
    ) -> list[ScoredContinuation]:
        """Teacher-forced scoring (spec §7): input = prompt + " " + target, tokenised together; the
        prompt's own token count marks where the target starts; the decision uses prompt tokens."""
        return self.reader.score(pairs, use_edits, batch_size)

    # ---- threshold ----------------------------------------------------------------------------

    def best_ratios(self, prompts: list[PromptLike]) -> list[float]:
        """Best match ratio of each prompt against the stored masks (0 when none are stored)."""
        return [d.match.ratio if d.match else 0.0 for d in self.decide(prompts)]

    def calibrated_threshold(self, index: MaskIndex) -> float:
        """Tau for a memory with these masks, from the engine's background prompts (calibrated mode, eval)."""
        return self.features.calibrated_threshold(index)
