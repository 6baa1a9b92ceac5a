"""Batched autoregressive decoding with a KV cache, a per-row memory decision, and rows that join
and leave between steps (continuous batching).

A request joins with its own prefill pass over its prompt (left-padded with the others that join
with it). That pass decides, per row, whether the memory is on and with which stored mask (see
`memory.Routing`); the row keeps that decision, and the memory snapshot it was made against, for
every later token, until the row has said the matched edit's target: from the next token on it
decodes as the unedited model would after the same text (`release_after_answer`; its cache is
computed again without the memory), so the answer goes on, or ends, the way the model's own would
instead of saying the target again. Its cache is then merged into the
running batch, so new requests do not wait for long ones to finish, and finished rows are dropped
from the batch and the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .memory import Decision, MemorySnapshot, ResidualMemory, RowMemory, Routing
from .tokens import left_pad


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    window_start: int = 0  # first prompt token that counts for the memory decision
    params: SamplingParams = field(default_factory=SamplingParams)
    use_edits: bool = True
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    cancel: threading.Event | None = None  # set it to stop this row early (finish_reason "cancelled")
    format: str = "text"  # prompt format: which background mean de-centres its feature


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    decision: Decision | None
    snapshot: MemorySnapshot | None = None  # the memory the request ran against


def normalised(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def says(text: str, answer: str) -> bool:
    """Whether `text` contains `answer` as whole words (case and punctuation ignored)."""
    wanted = normalised(answer)
    return bool(wanted) and f" {wanted} " in f" {normalised(text)} "


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still turn into a stop string or a multi-byte char."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    if text.endswith("\ufffd"):
        keep = max(keep, 1)
    return keep


class Row:
    """One request's progress: sampling state, generated tokens and text, streaming.

    Anything raised for one row (its seed, its sampling, its streaming callback) fails that row
    alone: it is kept in `error`, the row counts as finished, and `output()` raises it.
    """

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int]):
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generated: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.decision: Decision | None = None
        self.snapshot: MemorySnapshot | None = None
        self.answer: str | None = None  # the matched edit's target, until the row has said it
        self.error: Exception | None = None
        params = request.params
        self.generator = None
        try:
            if params.temperature > 0:
                self.generator = torch.Generator(device="cpu")
                if params.seed is None:
                    self.generator.seed()
                else:
                    self.generator.manual_seed(params.seed)
        except Exception as error:
            self.error = error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def said_answer(self) -> bool:
        """True once, when the text so far first contains the matched edit's target."""
        if self.answer is None or not says(self.text, self.answer):
            return False
        self.answer = None
        return True

    def advance(self, logits: torch.Tensor) -> int:
        """Choose and take the next token (0 once the row has failed)."""
        try:
            token = self.choose(logits)
            self.push(token)
            return token
        except Exception as error:
            self.error = error
            return 0

    def choose(self, logits: torch.Tensor) -> int:
        params = self.request.params
        if params.temperature <= 0:
            return int(logits.argmax())
        logits = logits.float().cpu()
        # shift first: the best token is then 0 / T = 0 and no tiny temperature overflows to inf - inf
        probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> None:
        params = self.request.params
        if token in self.eos_ids and not params.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.generated.append(token)
            self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            for stop in params.stop:
                at = self.text.find(stop)
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish_reason = "stop"
            if self.finish_reason is None and len(self.generated) >= params.max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is None and self.request.cancel is not None and self.request.cancel.is_set():
            self.finish_reason = "cancelled"
        self._emit(final=self.finish_reason is not None)

    def _emit(self, final: bool) -> None:
        if self.request.on_text is None:
            return
        ready = len(self.text) if final else len(self.text) - _hold_back(self.text, self.request.params.stop)
        if ready > self.emitted:
            self.request.on_text(self.text[self.emitted : ready])
            self.emitted = ready

    def output(self) -> GenerationOutput:
        if self.error is not None:
            raise self.error
        return GenerationOutput(
            self.text,
            self.generated,
            self.finish_reason or "length",
            len(self.request.prompt_ids),
            self.decision,
            self.snapshot,
        )


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _left_pad_time(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


class DecodeBatch:
    """A running batch of generations: `add` prefills new rows into it, `step` decodes one token."""

    def __init__(
        self,
        model,
        tokenizer,
        memory: ResidualMemory,
        make_routing: Callable[..., Routing],
        release_after_answer: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.memory = memory
        self.make_routing = make_routing
        self.release_after_answer = release_after_answer
        self.device = input_device(model)
        self.eos = eos_token_ids(model, tokenizer)
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # [B, cached positions]
        self.positions: torch.Tensor | None = None  # [B, 1] position of each row's last token
        self.pending: list[int] = []  # each row's newest token, not yet fed to the model
        self.plan = RowMemory()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Rows can join a running batch when every cache layer is a plain (full) one."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    @torch.inference_mode()
    def add(self, requests: list[GenerationRequest]) -> list[Row]:
        """Prefill `requests` and merge them into the batch; returns their rows (some may be done,
        or failed)."""
        rows = [Row(r, self.tokenizer, self.eos) for r in requests]
        live = [row for row in rows if row.error is None]
        if live:
            self._prefill(live)
        return rows

    def _prefill(self, rows: list[Row]) -> None:
        requests = [row.request for row in rows]
        batch = left_pad([r.prompt_ids for r in requests], self.tokenizer.pad_token_id, self.device)
        window = batch.window([r.window_start for r in requests], batch.lengths)
        routing = self.make_routing(window, torch.tensor([r.use_edits for r in requests]), [r.format for r in requests])
        cache = DynamicCache(config=self.model.config)
        with self.memory.using(routing):
            logits = self.model(**batch.model_inputs(), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for row, decision, slot_logits in zip(rows, routing.decisions, logits):
            row.decision, row.snapshot = decision, routing.snapshot
            if self.release_after_answer and decision.active:
                row.answer = routing.snapshot.index.answers.get(decision.match.key)
            row.advance(slot_logits)
        self._merge(rows, cache, batch.attention_mask, batch.position_ids[:, -1:], routing.row_memory())
        first = len(self.rows) - len(rows)
        self._release([first + i for i, row in enumerate(rows) if row.said_answer()])
        self._drop_finished()

    def _merge(self, rows, cache, attention, positions, memory_entries) -> None:
        if self.cache is None:
            self.cache, self.attention, self.positions = cache, attention, positions
        else:
            width = max(self.attention.shape[1], attention.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad_time(mine.keys, width, 2), _left_pad_time(theirs.keys, width, 2)])
                mine.values = torch.cat([_left_pad_time(mine.values, width, 2), _left_pad_time(theirs.values, width, 2)])
            self.attention = torch.cat([_left_pad_time(self.attention, width, 1), _left_pad_time(attention, width, 1)])
            self.positions = torch.cat([self.positions, positions])
        self.rows += rows
        self.pending += [row.generated[-1] if row.generated else 0 for row in rows]
        self.plan.extend(memory_entries)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Decode one token for every row; returns the rows that finished."""
        if not self.rows:
            return []
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        inputs = {
            "input_ids": torch.tensor(self.pending, device=self.device)[:, None],
            "attention_mask": self.attention,
            "position_ids": self.positions,
        }
        with self.memory.using(self.plan):
            logits = self.model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for slot, row in enumerate(self.rows):
            self.pending[slot] = row.advance(logits[slot])
        self._release([slot for slot, row in enumerate(self.rows) if row.said_answer()])
        return self._drop_finished()

    def _release(self, slots: list[int]) -> None:
        """These rows have said their edit's target: from their next token on they decode as the
        unedited model would after the same text. The memory goes off, and their cached states are
        computed again without it: an edited cache alone keeps pushing the target ("Essex Essex
        Essex")."""
        slots = [slot for slot in slots if not self.rows[slot].finished]
        if not slots:
            return
        self.plan.release(slots)
        # every token the cache holds for the row: its prompt and all it generated but the newest
        cached = [self.rows[slot].request.prompt_ids + self.rows[slot].generated[:-1] for slot in slots]
        batch = left_pad(cached, self.tokenizer.pad_token_id, self.device)
        fresh = DynamicCache(config=self.model.config)
        with self.memory.using(None):
            self.model(**batch.model_inputs(), cache=fresh, use_cache=True, logits_to_keep=1)
        # rows are right-aligned in both caches, and a sliding-window layer keeps the same newest
        # tokens in each, so the tail each holds of the row is the same text
        for mine, theirs in zip(self.cache.layers, fresh.layers):
            for i, (slot, length) in enumerate(zip(slots, batch.lengths)):
                n = min(int(length), mine.keys.shape[2], theirs.keys.shape[2])
                mine.keys[slot, :, -n:] = theirs.keys[i, :, -n:]
                mine.values[slot, :, -n:] = theirs.values[i, :, -n:]

    def _drop_finished(self) -> list[Row]:
        finished = [row for row in self.rows if row.finished]
        if not finished:
            return []
        keep = [slot for slot, row in enumerate(self.rows) if not row.finished]
        if not keep:
            self.rows, self.pending, self.cache, self.attention, self.positions = [], [], None, None, None
            self.plan = RowMemory()
            return finished
        selected = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(selected)
        self.attention, self.positions = self.attention[selected], self.positions[selected]
        self.rows = [self.rows[slot] for slot in keep]
        self.pending = [self.pending[slot] for slot in keep]
        self.plan.keep(keep)
        return finished

    def abort(self) -> list[Row]:
        """Drop every row (after a failure); returns them."""
        rows, self.rows = self.rows, []
        self.pending, self.cache, self.attention, self.positions, self.plan = [], None, None, None, RowMemory()
        return rows


def generate(
    model,
    tokenizer,
    memory: ResidualMemory,
    make_routing: Callable[..., Routing],
    requests: list[GenerationRequest],
    release_after_answer: bool = True,
) -> list[GenerationOutput]:
    """Decode a batch of requests to the end; `make_routing(window, allow, formats)` binds the memory."""
    batch = DecodeBatch(model, tokenizer, memory, make_routing, release_after_answer)
    rows = batch.add(requests)
    while len(batch):
        batch.step()
    return [row.output() for row in rows]
