"""Batched autoregressive decoding with a KV cache and a per-row memory decision.

One prefill pass over the left-padded prompts decides, per row, whether the memory is on and with
which stored mask (see `memory.Routing`); every decode step reuses that decision. Rows that finish
are dropped from the batch and the cache, so a long request does not make short ones pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import Callable

import torch
from transformers import DynamicCache

from .memory import Decision, MemorySnapshot, ResidualMemory, Routing
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


class _Row:
    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int], device: torch.device):
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generated: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        params = request.params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def choose(self, logits: torch.Tensor) -> int:
        params = self.request.params
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
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
        self._emit(final=self.finish_reason is not None)

    def _emit(self, final: bool) -> None:
        if self.request.on_text is None:
            return
        ready = len(self.text) if final else len(self.text) - _hold_back(self.text, self.request.params.stop)
        if ready > self.emitted:
            self.request.on_text(self.text[self.emitted : ready])
            self.emitted = ready


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


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    memory: ResidualMemory,
    make_routing: Callable[..., Routing],
    requests: list[GenerationRequest],
) -> list[GenerationOutput]:
    """Decode a batch of requests; `make_routing(window, allow, formats)` binds the memory snapshot."""
    device = input_device(model)
    batch = left_pad([r.prompt_ids for r in requests], tokenizer.pad_token_id, device)
    window = batch.window([r.window_start for r in requests], batch.lengths)
    routing = make_routing(window, torch.tensor([r.use_edits for r in requests]), [r.format for r in requests])
    eos = eos_token_ids(model, tokenizer)
    rows = [_Row(r, tokenizer, eos, device) for r in requests]
    live = list(range(len(rows)))  # positions in `rows` of the sequences still in the batch
    cache = DynamicCache(config=model.config)
    attention = batch.attention_mask
    positions = batch.position_ids[:, -1:]
    inputs = batch.model_inputs()
    with memory.using(routing):
        while live:
            logits = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            next_tokens = []
            for slot, index in enumerate(live):
                row = rows[index]
                token = row.choose(logits[slot])
                row.push(token)
                if row.finish_reason is None and row.request.cancel is not None and row.request.cancel.is_set():
                    row.finish_reason = "cancelled"
                next_tokens.append(token)
            keep = [slot for slot, index in enumerate(live) if rows[index].finish_reason is None]
            if not keep:
                break
            if len(keep) < len(live):
                selected = torch.tensor(keep, device=device)
                cache.batch_select_indices(selected)
                routing.keep_rows(keep)
                attention, positions = attention[selected], positions[selected]
                next_tokens = [next_tokens[slot] for slot in keep]
                live = [live[slot] for slot in keep]
            attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
            positions = positions + 1
            inputs = {
                "input_ids": torch.tensor(next_tokens, device=device)[:, None],
                "attention_mask": attention,
                "position_ids": positions,
            }
    decisions = routing.decisions or [None] * len(rows)
    return [
        GenerationOutput(
            row.text, row.generated, row.finish_reason or "length", len(row.request.prompt_ids), decision, routing.snapshot
        )
        for row, decision in zip(rows, decisions)
    ]
