"""EditTrainer: trains one fact on top of a memory state and returns the new, unpublished state.

It turns an edit's frames into edit batches, scales and protects columns from what the base
memory already stores, runs the editor's fast or reference loop, and builds the new MemoryState
and its EditResult. It is separate from the engine because training never publishes: the engine
decides when a trained state becomes the one requests read, under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
import time
from typing import Sequence

import torch

from . import arch
from .arch_check import FastPathCheck
from .editor import EditHyperParams, EditInputError, build_edit_batch, train_fast, train_reference, usage_scale
from .featurizer import Featurizer
from .frames import CHAT_FORMAT, Prompt, PromptLike, as_prompt
from .generation import input_device
from .mask_index import distinct_rows, mask_fingerprint, pack_masks, question_digest
from .memory import ResidualMemory
from .memory_state import MemoryState, publishable
from .tophash import TEXT_FORMAT


@dataclass(frozen=True)
class EditResult:
    key: str
    mask_fingerprint: str  # of the mask the edit was trained through (its plain-text frame's)
    masks: int  # masks stored for the edit: one per frame, identical ones once
    loss: float
    iterations: int
    losses: list[float]
    seconds: float
    applied: int  # edits in the memory after this one
    # keys of the stored edits this one superseded: it asks their question again (engine.MemoirConfig.supersede)
    supersedes: tuple[str, ...] = ()


class EditTrainer:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        spec: arch.ArchSpec,
        blocks: list[torch.nn.Module],
        layer: int,
        memory: ResidualMemory,
        width: int,
        fast_path: FastPathCheck,
        hyper: EditHyperParams,
        fast_edit: bool,
        features: Featurizer,
        supersede: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.blocks = blocks
        self.layer = layer
        self.memory = memory
        self.width = width
        self.fast_path = fast_path
        self.hyper = hyper
        self.fast_edit = fast_edit
        self.features = features  # the frames' masks, under whichever hasher is current
        self.supersede = supersede

    def train(
        self,
        prompt: PromptLike | Sequence[PromptLike],
        target: str,
        key: str | None,
        append_eos: bool,
        base: MemoryState,
        context_templates: list[str],
    ) -> tuple[EditResult, MemoryState]:
        """Train one fact on top of `base` without publishing (see `MemoirEngine.train`)."""
        frames = [as_prompt(p) for p in ([prompt] if isinstance(prompt, (str, Prompt)) else prompt)]
        if not frames or not target.strip() or any(not f.text.strip() for f in frames):
            raise EditInputError("prompt and target must be non-empty")
        if append_eos:
            target = target + self.tokenizer.eos_token
        started = time.perf_counter()
        applied = base.snapshot.applied + 1
        key = key if key is not None else f"edit-{applied}"
        frame_masks, frame_router_keys = self.features.prompt_keys(frames)
        # one set of k columns per edit, as in the paper: every frame trains through the plain
        # question's mask, whichever frame was submitted, so a later edit overwrites k columns of
        # it, not the union of its frames' masks; every frame's mask is still a key that finds it
        first = _first_of(frames, TEXT_FORMAT)
        mask = frame_masks[first]
        columns = mask.nonzero().flatten()
        # the context-template rows go to the question's chat frame, the harder one to fit through
        # the plain question's mask (docs/free-generation.md#how-the-one-mask-rule-was-chosen);
        # to the only frame for a model without a chat template
        augmented = _first_of(frames, CHAT_FORMAT)
        device = input_device(self.model)
        edits = [
            build_edit_batch(
                self.tokenizer,
                context_templates if i == augmented else [],
                f.text,
                target,
                device,
                f.answer_separator,
                f.feature_start,
            )
            for i, f in enumerate(frames)
        ]
        column_scale = None
        if self.hyper.column_step == "usage":
            index = base.snapshot.index
            column_scale = usage_scale(index.column_usage(columns), len(index), index.top_k, index.width)
        stored_moments = None
        if base.key_moments is not None:
            stored_moments = base.key_moments[columns[:, None], columns]
        if self.fast_edit and self.fast_path.usable:
            trained = train_fast(
                self.model,
                self.blocks,
                self.layer,
                self.memory,
                edits,
                mask,
                base.master,
                self.hyper,
                head=partial(arch.apply_final_norm_and_head, self.model, spec=self.spec),
                additive=self.fast_path.additive,
                residual_scale=self.spec.residual_scale,
                reuse_block_inputs=self.fast_path.same_block_inputs,
                last_mlp=self.blocks[-1].get_submodule(self.spec.mlp),
                column_scale=column_scale,
                stored_moments=stored_moments,
                split=self.fast_path.split,
            )
        else:
            trained = train_reference(
                self.model, self.memory, edits, mask, base.master, self.hyper, column_scale, stored_moments
            )
        key_moments = None
        if trained.key_moment is not None:
            stored = base.key_moments
            # a copy, not an in-place add: a state trained but never published must leave its
            # base intact, as W_m's copy does; one [D, D] copy is small beside the edit's 30 passes
            key_moments = stored.clone() if stored is not None else base.master.new_zeros(self.width, self.width)
            key_moments[columns[:, None], columns] += trained.key_moment.to(key_moments.device)
        # the trained mask (the plain question's frame) first, then every frame's, repeats dropped;
        # a frame's router key goes with its mask
        order = [first, *range(len(frames))]
        every = pack_masks(frame_masks[order])
        kept = distinct_rows(every)
        packed = every[kept]
        router_rows = None
        if frame_router_keys is not None:
            router_rows = frame_router_keys[[order[i] for i in kept]].cpu().numpy()
        # the same question asked again: the earlier edits leave the search (their columns stay as
        # trained, the memory is shared); decided from the base state alone, so a replay of the
        # log, a checkpoint and a follower's delta all reach the same supersessions
        question = question_digest(frames[first].text)
        supersedes = ()
        if self.supersede:
            supersedes = tuple(k for k in base.snapshot.index.same_question(packed, question) if k != key)
        state = publishable(
            trained.weight,
            base.snapshot.index.appended(packed, [key] * len(packed), target, question, supersedes, router_rows),
            applied,
            self.memory.projection.weight.dtype,
            key_moments,
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
            supersedes=supersedes,
        )
        return result, state


def _first_of(frames: list[Prompt], format: str) -> int:
    """The first frame in `format` (the question's own: `frames.edit_frames` puts it before the
    paraphrases'), else the submitted one."""
    return next((i for i, f in enumerate(frames) if f.format == format), 0)
