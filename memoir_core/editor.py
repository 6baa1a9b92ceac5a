"""Training one edit into the residual memory (spec §4).

Batch: the prompt and target joined by one space, once bare and once behind each of 10 context
prefixes generated from the base model; loss on the target tokens only. Optimiser: a fresh plain
SGD on W_m (lr 1.0, weight decay 1e-5), global gradient-norm clip 1.0, at most 30 steps, early
stop when the last two recorded losses differ by <= 1e-4 and the latest is <= 0.02.

Frames (not the paper): an edit may be trained in several frames at once (`frames.edit_frames`:
the prompt in plain text and in the chat template, its paraphrases), each a batch of its own, all
through the edit's one mask (its k columns, as in the paper); each step sums the frames'
gradients, each clipped on its own. One frame is exactly the paper's edit. In a chat frame the
memory applies from the user's message on (`EditBatch.memory_on`), as it is served.

Two equivalent ways to run it:

* `train_reference`: the method as written: full model forward, the whole W_m trainable, the
  input masked with m. Kept as the yardstick.
* `train_fast`: the blocks below the edited one never see W_m, so their output for the batch is
  computed once; each step runs only the edited block upward and computes logits only at the
  target positions. Only the k mask columns receive gradient, so they are trained as a dense
  [out, k] matrix; weight decay, the one update that touches the other columns, is applied to
  them in closed form afterwards ((1 - lr * wd) ** steps), unless decay is limited to the
  edit's own columns (`decay="edited"`). Where the memory starts after a frame's first column
  (chat), the blocks above run only from there on against the earlier columns' keys and values,
  computed once (`split_pass`; `arch_check` confirms it on the loaded model).

Optionally (`column_step="usage"`, not the paper) each column's gradient is scaled down by how
many stored masks hold it, before clipping, so a new edit moves the columns older edits rely on
less and its fresh columns more.

Optionally (`protect=α`, not the paper) each step on the edit's columns is preconditioned by
s (C + s I)^-1, where C sums the stored edits' key second moments on those columns and s is α
times the edit's own mean squared key norm there. The step then writes little onto the keys older
edits rely on, the ridge form of AlphaEdit's null-space projection; α -> infinity is the plain step.
A key is a(x) at the positions of the bare edit row that predict the target.

Deviations from the reference: the irrelevant 12th row is not forwarded (it is outside the loss
and rows do not interact, so the trained weights are the same), and each row's loss is the plain
mean over its target tokens (the reference divides by target length + 1, which scales gradients
before clipping and moves the 0.02 early-stop point slightly).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import thread_hooks
from .memory import ResidualMemory, TrainColumns, TrainDense, columns_from
from .split_pass import SplitPass, split_pass
from .tokens import PaddedBatch, left_pad

TEMPLATE_STARTERS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)
DECAY_SCOPES = ("all", "edited", "none")
COLUMN_STEPS = ("uniform", "usage")
# logits by which a target token must beat the runner-up for an edit to count as answered right
# (`fit_iterations`): clearly, not by a rounding difference between the training and serving passes
FIT_MARGIN = 1.0


@dataclass(frozen=True)
class EditHyperParams:
    max_iterations: int = 30
    lr: float = 1.0
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    stop_loss: float = 0.02
    stop_delta: float = 1e-4
    # "all": the paper's SGD decays the whole W_m every step, shrinking every stored edit (spec
    # §4.4); "edited": only the columns the edit trains decay, so stored edits keep their size;
    # "none": no weight decay at all.
    decay: str = "all"
    # "uniform": every masked column takes the plain gradient (the paper); "usage": a column that
    # many stored masks hold gets a proportionally smaller share of the step (`usage_scale`), so
    # a new edit moves the columns that earlier edits rely on less.
    column_step: str = "uniform"
    # None: the plain gradient (the paper). α > 0: precondition each step away from stored keys
    # (`protecting_map`); smaller α protects more and leaves less of the step for the new key.
    protect: float | None = None
    # None: the paper's budget alone. N > max_iterations (not the paper): an edit that after
    # max_iterations steps is not yet answered right (each frame's bare row predicting every
    # target token greedily, by FIT_MARGIN) keeps training until it is, up to N steps in all.
    # Teacher-forced argmax on every token is what greedy decoding reproduces.
    fit_iterations: int | None = None

    def __post_init__(self):
        if self.decay not in DECAY_SCOPES:
            raise ValueError(f"decay must be one of {DECAY_SCOPES}, not {self.decay!r}")
        if self.column_step not in COLUMN_STEPS:
            raise ValueError(f"column_step must be one of {COLUMN_STEPS}, not {self.column_step!r}")
        if self.protect is not None and not self.protect > 0:
            raise ValueError(f"protect must be a positive ridge factor or None, not {self.protect!r}")
        if self.fit_iterations is not None and not self.fit_iterations > self.max_iterations:
            raise ValueError(
                f"fit_iterations must exceed max_iterations ({self.max_iterations}) or be None, not {self.fit_iterations!r}"
            )

    @property
    def decay_rate(self) -> float:
        """The weight decay the optimiser applies: `weight_decay`, or 0 for decay "none"."""
        return 0.0 if self.decay == "none" else self.weight_decay


@dataclass
class EditBatch:
    batch: PaddedBatch
    target_len: int  # the last target_len tokens of every row are the target
    # [R] per row, the first column the memory applies at: where the question's feature window
    # starts (a chat frame's user message; a plain row's first token), as the served memory
    # starts there (`memory.Routing`); the columns before it keep the base model's states
    memory_from: torch.Tensor

    @property
    def memory_on(self) -> torch.Tensor:
        """[R, T] bool: the positions the memory applies at."""
        return columns_from(self.memory_from, self.batch.input_ids.shape[1])

    @property
    def predicting(self) -> slice:
        """The positions whose next-token logits predict the target tokens (left padding: the same in every row)."""
        width = self.batch.input_ids.shape[1]
        return slice(width - self.target_len - 1, width - 1)


@dataclass
class TrainedEdit:
    weight: torch.Tensor  # the new full W_m, float32 [out, D]
    loss: float  # loss of the last forward pass
    iterations: int  # SGD steps taken
    losses: list[float] = field(default_factory=list)
    # [k, k] second moment of this edit's keys on its columns (mask order); only with hp.protect
    key_moment: torch.Tensor | None = None


class EditInputError(ValueError):
    pass


def generate_context_templates(model: nn.Module, tokenizer, device: torch.device) -> list[str]:
    """Ten greedy continuations of fixed starters by the base model, generated once (spec §4.1)."""
    prefixes = []
    for length in TEMPLATE_LENGTHS:
        for starter in TEMPLATE_STARTERS:
            ids = tokenizer(starter, return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=length,
                    pad_token_id=tokenizer.pad_token_id,
                )
            prefixes.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return prefixes


def edit_text(prefix: str, prompt: str, target: str, separator: str = " ") -> str:
    fact = f"{prompt}{separator}{target}"
    return f"{prefix} {fact}" if prefix else fact


def build_edit_batch(
    tokenizer, prefixes: list[str], prompt: str, target: str, device, separator: str = " ", window: int = 0
) -> EditBatch:
    """The bare row `prompt + separator + target`, then the same behind each context prefix.
    window: the character of `prompt` where its feature window starts (`frames.Prompt.feature_start`):
    the memory applies from there on; from a plain row's first character, context prefix included."""
    prompt_len = len(tokenizer(prompt)["input_ids"])
    texts = [edit_text(prefix, prompt, target, separator) for prefix in ["", *prefixes]]
    rows = [tokenizer(text)["input_ids"] for text in texts]
    target_len = len(rows[0]) - prompt_len
    if target_len <= 0:
        raise EditInputError("the target adds no tokens to the prompt")
    batch = left_pad(rows, tokenizer.pad_token_id, device)
    starts = [0] * len(rows)
    if window:
        # the window's character in each row: behind the prefix and the space that joins it
        starts = [len(tokenizer(text[: len(text) - len(texts[0]) + window])["input_ids"]) for text in texts]
    memory_from = torch.tensor([pad + start for pad, start in zip(batch.pad_widths, starts)], device=device)
    return EditBatch(batch, target_len, memory_from)


def usage_scale(usage: torch.Tensor, stored: int, top_k: int, width: int) -> torch.Tensor:
    """Per-column gradient factor for `column_step="usage"`: min(1, (1 + e) / (1 + u)) where u is
    how many of the `stored` masks hold the column and e = stored * k / D is what a column holds
    on average. Columns at or below average usage keep the full gradient; a column held by ten
    times its share gets about a tenth."""
    expected = stored * top_k / width
    return ((1.0 + expected) / (1.0 + usage.float())).clamp(max=1.0)


def key_moment(keys: torch.Tensor) -> torch.Tensor:
    """[n, k] keys -> [k, k] mean outer product, float32."""
    keys = keys.float()
    return keys.T @ keys / keys.shape[0]


def protecting_map(own_moment: torch.Tensor, stored_moments: torch.Tensor, ridge: float) -> torch.Tensor:
    """[k, k] right factor for the gradient: s (C + s I)^-1 with s = ridge * trace(own_moment).
    Symmetric; the identity where no stored key reaches these columns (C = 0)."""
    scale = ridge * own_moment.double().trace()
    eye = torch.eye(own_moment.shape[0], dtype=torch.float64, device=own_moment.device)
    system = stored_moments.to(own_moment.device, torch.float64) + scale * eye
    return torch.linalg.solve(system, scale * eye).float()


@dataclass(frozen=True)
class GradientShaping:
    """How each step's gradient is reshaped before clipping, so the clipped step goes where it
    should: per-column factors (`usage_scale`), then a matrix applied from the right
    (`protecting_map`). Both refer to `columns` of the trained weight (None: all of them)."""

    column_scale: torch.Tensor | None = None  # [k]
    column_map: torch.Tensor | None = None  # [k, k]
    columns: torch.Tensor | None = None

    def apply(self, grad: torch.Tensor) -> None:
        if self.column_scale is None and self.column_map is None:
            return
        part = grad if self.columns is None else grad[:, self.columns]
        if self.column_scale is not None:
            part = part * self.column_scale.to(grad.device, grad.dtype)
        if self.column_map is not None:
            part = part @ self.column_map.to(grad.device, grad.dtype)
        if self.columns is None:
            grad.copy_(part)
        else:
            grad[:, self.columns] = part


def _sgd(
    weight: torch.Tensor,
    compute_losses: Callable[[], list["FrameLoss"]],
    hp: EditHyperParams,
    shaping: GradientShaping,
    decay_columns: torch.Tensor | None = None,
) -> tuple[int, list[float]]:
    """The reference optimisation loop on one leaf tensor; returns (steps, recorded losses).

    compute_losses: one `FrameLoss` per frame of the edit. Each frame's gradient is shaped and clipped
    on its own and the clipped gradients are summed, so a frame gets the step it would get alone
    (one global clip would split one frame's step among all of them and leave each under-trained).
    The recorded loss is their mean.
    decay_columns: a 0/1 vector over the weight's columns; weight decay then applies to those
    columns only, added after clipping exactly where SGD's own weight decay would be."""
    decay_in_optimiser = hp.decay_rate if decay_columns is None else 0.0
    optimiser = torch.optim.SGD([weight], lr=hp.lr, weight_decay=decay_in_optimiser, momentum=0.0)
    previous, latest = 0.0, 1e9
    losses: list[float] = []
    steps = 0
    for step in range(hp.fit_iterations or hp.max_iterations):
        frames = compute_losses()
        frame_losses = [frame.loss for frame in frames]
        losses.append(sum(loss.item() for loss in frame_losses) / len(frame_losses))
        settled = abs(latest - previous) <= hp.stop_delta and latest <= hp.stop_loss
        # past the paper's budget (only with fit_iterations) the loss rule no longer decides
        if (step >= hp.max_iterations or settled) and _answered_right(frames, hp):
            break
        optimiser.zero_grad(set_to_none=True)
        summed = None
        for loss in frame_losses:
            loss.backward()
            shaping.apply(weight.grad)
            torch.nn.utils.clip_grad_norm_([weight], hp.grad_clip)
            if len(frame_losses) > 1:
                summed = weight.grad if summed is None else summed.add_(weight.grad)
                weight.grad = None
        if summed is not None:
            weight.grad = summed
        if decay_columns is not None:
            weight.grad.add_(weight.detach() * decay_columns, alpha=hp.decay_rate)
        optimiser.step()
        steps += 1
        previous, latest = latest, losses[-1]
    return steps, losses


def _answered_right(frames: list["FrameLoss"], hp: EditHyperParams) -> bool:
    """Whether every frame's bare row gives the target greedily by FIT_MARGIN; always, without fit_iterations."""
    return hp.fit_iterations is None or min(frame.margin() for frame in frames) >= FIT_MARGIN


def _bare_row_keys(activations: torch.Tensor, edit: EditBatch) -> torch.Tensor:
    """[target_len, ...] a(x) of the bare row (row 0) at the positions that predict the target."""
    return activations[0, edit.predicting]


def _protection(own_keys: torch.Tensor, stored_moments: torch.Tensor | None, hp: EditHyperParams):
    """(gradient map or None, the edit's key moment or None) for hp.protect."""
    if hp.protect is None:
        return None, None
    own = key_moment(own_keys)
    stored = stored_moments if stored_moments is not None else torch.zeros_like(own)
    return protecting_map(own, stored, hp.protect), own


def _labels(edit: EditBatch) -> torch.Tensor:
    return edit.batch.input_ids[:, -edit.target_len :]


@dataclass
class FrameLoss:
    """One frame's loss in one step, and what its bare row predicts (for `fit_iterations`)."""

    loss: torch.Tensor  # token-mean cross-entropy over the frame's rows
    bare_logits: torch.Tensor  # [target_len, V] of row 0: the question exactly as it is served
    bare_labels: torch.Tensor  # [target_len]

    def margin(self) -> float:
        """The target token's logit minus the best other logit, minimised over the bare row's
        target positions: >= 0 exactly when greedy decoding after that prompt yields the target.
        Computed only when asked (one host sync), so the paper's rule pays nothing for it."""
        with torch.no_grad():
            logits, wanted_ids = self.bare_logits.float(), self.bare_labels.unsqueeze(-1)
            wanted = logits.gather(-1, wanted_ids).squeeze(-1)
            others = logits.scatter(-1, wanted_ids, float("-inf")).amax(dim=-1)
            return (wanted - others).min().item()


def _frame_loss(logits: torch.Tensor, edit: EditBatch) -> FrameLoss:
    """One frame's rows; logits [R, target_len, V]. The context-template rows (1..R-1) are augmentation."""
    labels = _labels(edit)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    return FrameLoss(loss, logits[0].detach(), labels[0])


def train_reference(
    model: nn.Module,
    memory: ResidualMemory,
    edits: list[EditBatch],
    mask: torch.Tensor,
    weight: torch.Tensor,
    hp: EditHyperParams,
    column_scale: torch.Tensor | None = None,
    stored_moments: torch.Tensor | None = None,
) -> TrainedEdit:
    """Every frame in `edits` is trained through the edit's `mask` ([D] bool).
    column_scale: gradient factors for the mask's columns in ascending order, as `train_fast`
    takes them (see `GradientShaping`); the other columns get no gradient.
    stored_moments: [k, k] stored edits' key moments on those columns, for hp.protect."""
    mask = mask.to(weight.device)
    columns = mask.nonzero().flatten()
    column_map = own_moment = None
    if hp.protect is not None:
        keys = []
        for edit in edits:
            capture = _CaptureActivations()
            with torch.no_grad(), memory.using(capture):
                model(**edit.batch.model_inputs(), use_cache=False)
            masked = capture.activations * mask.to(capture.activations.dtype)  # the keys lie inside the window
            keys.append(_bare_row_keys(masked, edit).index_select(-1, columns.to(masked.device)))
        column_map, own_moment = _protection(torch.cat(keys), stored_moments, hp)
    trained = weight.detach().clone().requires_grad_(True)

    def compute_losses() -> list[FrameLoss]:
        losses = []
        for edit in edits:
            with memory.using(TrainDense(mask, trained, edit.memory_on.to(weight.device))):
                logits = model(**edit.batch.model_inputs(), use_cache=False).logits
            losses.append(_frame_loss(logits[:, edit.predicting], edit))
        return losses

    decay_columns = mask.to(trained.dtype) if hp.decay == "edited" else None
    shaping = GradientShaping(column_scale, column_map, columns)
    steps, losses = _sgd(trained, compute_losses, hp, shaping, decay_columns)
    return TrainedEdit(trained.detach(), losses[-1], steps, losses, own_moment)


class _StopForward(Exception):
    pass


class _CaptureActivations:
    """Plan that keeps the full input activation a(x) of the projection, output untouched."""

    activations: torch.Tensor | None = None

    def __call__(self, activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.activations = activations
        return output


@dataclass
class _BlockInputs:
    """What the iterations need from one no-grad pass over the edit batch."""

    activations: torch.Tensor  # a(x) at the edited layer, [R, T, D]
    block_input: torch.Tensor  # hidden state entering the edited block
    block_output: torch.Tensor  # its output with the memory off
    calls: list[tuple[tuple, dict]]  # (args, kwargs) of each block from the edited one up

    def upper_calls(self) -> list[tuple[tuple, dict]]:
        """The blocks above the edited one: their arguments besides the hidden state."""
        return [(args[1:], kwargs) for args, kwargs in self.calls[1:]]


def capture_blocks(
    model: nn.Module, blocks: nn.ModuleList, layer: int, memory: ResidualMemory, batch: PaddedBatch, reuse_inputs: bool
) -> _BlockInputs:
    """reuse_inputs: every block above the edited one takes the edited block's arguments (one
    attention type, nothing per layer), so the pass can stop after the edited block and reuse
    them above it; otherwise every block's own are recorded."""
    calls: dict[int, tuple[tuple, dict]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def before(index):
        def record(module, args, kwargs):
            calls[index] = (args, kwargs)

        return record

    def after(module, args, kwargs, output):
        outputs["block"] = output[0] if isinstance(output, tuple) else output
        if reuse_inputs:
            raise _StopForward

    last = layer + 1 if reuse_inputs else len(blocks)
    capture = _CaptureActivations()
    hooks = thread_hooks(pre=[(blocks[i], before(i)) for i in range(layer, last)], post=[(blocks[layer], after)])
    try:
        with torch.no_grad(), memory.using(capture), hooks:
            model(**batch.model_inputs(), use_cache=False)
    except _StopForward:
        pass
    per_block = [calls[layer if reuse_inputs else i] for i in range(layer, len(blocks))]
    return _BlockInputs(capture.activations, per_block[0][0][0], outputs["block"], per_block)


def train_fast(
    model: nn.Module,
    blocks: nn.ModuleList,
    layer: int,
    memory: ResidualMemory,
    edits: list[EditBatch],
    mask: torch.Tensor,
    weight: torch.Tensor,
    hp: EditHyperParams,
    head: Callable[[torch.Tensor], torch.Tensor],
    additive: bool = True,
    residual_scale: float = 1.0,
    reuse_block_inputs: bool = True,
    last_mlp: nn.Module | None = None,
    column_scale: torch.Tensor | None = None,
    stored_moments: torch.Tensor | None = None,
    split: bool = False,
) -> TrainedEdit:
    """Every frame in `edits` is trained through the edit's `mask` ([D] bool); its k columns are
    trained as one dense [out, k] matrix.
    head: logits from the last hidden state (`arch.apply_final_norm_and_head`).
    additive: the edited block's output with memory is its output without plus residual_scale *
    the memory's contribution (`arch.ArchSpec.additive`), so the block is not run again.
    reuse_block_inputs: the blocks above the edited one take its arguments (`arch_check`).
    last_mlp: the last block's feed-forward module; when given, it runs only at the positions
    the loss reads (the last block's output elsewhere feeds nothing).
    column_scale: gradient factors for the trained columns, ascending (see `GradientShaping`).
    stored_moments: [k, k] stored edits' key moments on those columns, for hp.protect.
    split: the blocks above the edited one may run only on the columns the memory reaches, the
    others' keys and values computed once (`split_pass`; `arch_check` checks it); additive only."""
    columns = mask.to(weight.device).nonzero().flatten()
    trained = weight.index_select(1, columns).detach().clone().requires_grad_(True)
    frames = [capture_blocks(model, blocks, layer, memory, edit.batch, reuse_block_inputs) for edit in edits]
    selected = [captured.activations.index_select(-1, columns).to(trained.dtype) for captured in frames]
    own_keys = torch.cat([_bare_row_keys(inputs, edit) for inputs, edit in zip(selected, edits)])
    column_map, own_moment = _protection(own_keys, stored_moments, hp)
    narrowing = last_mlp is not None and layer < len(blocks) - 1
    splits = [
        _frame_split(blocks, layer, captured, edit) if split and additive else None
        for edit, captured in zip(edits, frames)
    ]

    def run_blocks(captured: _BlockInputs, hidden: torch.Tensor, first: int) -> torch.Tensor:
        for offset in range(first, len(captured.calls)):
            args, kwargs = captured.calls[offset]
            hidden = blocks[layer + offset](hidden, *args[1:], **kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    def frame_logits(edit: EditBatch, captured: _BlockInputs, inputs: torch.Tensor, part: SplitPass | None):
        start = part.start if part is not None else 0
        predicting = _shifted(edit.predicting, start)
        memory_on = edit.memory_on[:, start:, None]
        if additive:  # the edited block's own work is done: add the memory's contribution
            output = captured.block_output[:, start:]
            contribution = (inputs[:, start:] @ trained.T) * memory_on.to(trained.dtype)
            if residual_scale != 1.0:
                contribution = contribution * residual_scale
            hidden = output + contribution.to(output.dtype)
            hidden = part.run(blocks, layer + 1, hidden) if part is not None else run_blocks(captured, hidden, 1)
        else:
            with memory.using(TrainColumns(columns, trained, edit.memory_on)):
                hidden = run_blocks(captured, captured.block_input, 0)
        return head(hidden[:, predicting])

    def narrowed(edit: EditBatch, start: int):
        """The last block's feed-forward only at this frame's predicting positions."""
        if not narrowing:
            return nullcontext()
        predicting, width = _shifted(edit.predicting, start), edit.batch.input_ids.shape[1] - start

        def narrow(value):
            # every per-position input (BLOOM's and MPT's feed-forwards also take the residual)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == width:
                return value[:, predicting].contiguous()
            return value

        def only_predicting(module, args, kwargs):
            return tuple(narrow(a) for a in args), {name: narrow(v) for name, v in kwargs.items()}

        def padded_back(module, args, kwargs, output):
            return F.pad(output, (0, 0, predicting.start, width - predicting.stop))

        return thread_hooks(pre=[(last_mlp, only_predicting)], post=[(last_mlp, padded_back)])

    def compute_losses() -> list[FrameLoss]:
        losses = []
        for edit, captured, inputs, part in zip(edits, frames, selected, splits):
            with narrowed(edit, part.start if part is not None else 0):
                losses.append(_frame_loss(frame_logits(edit, captured, inputs, part), edit))
        return losses

    steps, losses = _sgd(trained, compute_losses, hp, GradientShaping(column_scale, column_map))
    decayed = weight * (1.0 - hp.lr * hp.weight_decay) ** steps if hp.decay == "all" else weight.clone()
    decayed[:, columns] = trained.detach()
    return TrainedEdit(decayed, losses[-1], steps, losses, own_moment)


def _shifted(positions: slice, start: int) -> slice:
    return slice(positions.start - start, positions.stop - start)


def _frame_split(blocks: nn.ModuleList, layer: int, captured: _BlockInputs, edit: EditBatch) -> SplitPass | None:
    """The frame's split pass from the first column any row's memory reaches, or None where
    that is the first column (a plain frame)."""
    start = min(int(edit.memory_from.min()), edit.predicting.start)
    if start == 0:
        return None
    prefix = captured.block_output[:, :start]
    return split_pass(blocks, layer + 1, captured.upper_calls(), prefix, edit.batch.attention_mask, start)
