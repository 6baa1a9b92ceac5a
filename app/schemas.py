"""Request and response bodies of the native API."""

from __future__ import annotations

from datetime import datetime, timezone
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .db.models import Edit, EditStatus, Event


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


MAX_STOPS = 4
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: str) -> str:
    """Text a database column can hold: no NUL (PostgreSQL refuses it) and no lone UTF-16
    surrogates (JSON can carry them, UTF-8 cannot)."""
    found = _UNSTORABLE.search(value)
    if found is not None:
        what = "NUL (\\u0000)" if found.group() == "\x00" else f"a lone surrogate (\\u{ord(found.group()):04x})"
        raise ValueError(f"text must not contain {what}")
    return value


Text = Annotated[str, AfterValidator(storable)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description="sampling seed, -2**63 .. 2**64-1")]


def stop_list(value: str | list[str] | None) -> list[str]:
    """`stop` as a list: one string or several, at most MAX_STOPS, none empty."""
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


def _not_blank(value: str, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} must not be empty")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


MAX_PARAPHRASES = 8


def _check_messages(messages: list[ChatMessage], where: str = "messages") -> None:
    if not messages:
        raise ValueError(f"{where} must not be empty")
    if messages[-1].role != "user":
        raise ValueError(f"the last of {where} must have role 'user'")
    _not_blank(messages[-1].content, f"the content of the last of {where}")


class PromptInput(BaseModel):
    """A plain prompt or chat messages: what an edit is trained on, or what /explain decides for."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(default=None, description="plain prompt text")
    messages: list[ChatMessage] | None = Field(
        default=None, description="chat messages instead of a prompt; the last one is the user's question"
    )

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None:
            _not_blank(self.prompt, "prompt")
        if self.messages is not None:
            _check_messages(self.messages)
        return self


class EditCreate(PromptInput):
    """One fact correction: the prompt (or chat messages) and the answer it should get. It is
    trained and keyed as a plain prompt and in the chat template alike, whichever is given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "What is the capital of Australia?",
                    "target": "Canberra",
                    "paraphrases": ["Which city is Australia's capital?"],
                }
            ]
        },
    )

    target: Text = Field(description="the answer the model should give")
    paraphrases: list[Text | list[ChatMessage]] | None = Field(
        default=None,
        max_length=MAX_PARAPHRASES,
        description="other phrasings of the same question (plain text or chat messages), trained and keyed with the edit",
    )

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return _not_blank(value, "target")

    @model_validator(mode="after")
    def _paraphrases(self):
        for i, paraphrase in enumerate(self.paraphrases or []):
            if isinstance(paraphrase, str):
                _not_blank(paraphrase, f"paraphrases[{i}]")
            else:
                _check_messages(paraphrase, f"paraphrases[{i}]")
        return self


class ExportedEdit(EditCreate):
    """One line of GET /edits/export and POST /edits/import: an edit's body plus where it came from.

    The body fields are EditCreate's, read off the stored edit by name, so a field added to both
    travels without a change here; an import validates them exactly as POST /edits does.
    """

    id: str = Field(min_length=1, max_length=255, description="the edit's id on the exporting server")
    seq: int | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    created_by: str | None = None

    @classmethod
    def of(cls, edit: Edit) -> "ExportedEdit":
        body = {name: getattr(edit, name, None) for name in EditCreate.model_fields}
        if edit.messages is not None:
            body["prompt"] = None  # stored as "" for chat edits
        return cls(
            **{name: value for name, value in body.items() if value is not None},
            id=edit.id,
            seq=edit.seq,
            created_at=_utc(edit.created_at),
            finished_at=_utc(edit.finished_at),
            created_by=edit.created_by,
        )


class EditBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edits: list[EditCreate] = Field(min_length=1, description="applied in the given order")


class EditEvent(BaseModel):
    action: str
    at: datetime
    key_id: str | None = None
    detail: dict | None = None

    @classmethod
    def of(cls, event: Event) -> "EditEvent":
        return cls(action=event.action, at=_utc(event.at), key_id=event.key_id, detail=event.detail)


class EditOut(BaseModel):
    id: str
    seq: int
    status: EditStatus
    prompt: str | None
    messages: list[ChatMessage] | None = None
    target: str
    paraphrases: list[str | list[ChatMessage]] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    retracted_at: datetime | None = None
    retraction_pending: bool = False
    loss: float | None
    iterations: int | None
    mask_fingerprint: str | None
    error: str | None = None
    created_by: str | None = Field(default=None, description="id of the API key that submitted it; null without keys")
    superseded_by: str | None = Field(
        default=None,
        description="id of the later applied edit that asked this edit's question again: this one no longer "
        "fires (null: not superseded; cleared when that edit is retracted)",
    )
    history: list[EditEvent] | None = None
    fires: int | None = Field(
        default=None, description="generation requests this edit's memory answered since the server started"
    )

    @classmethod
    def of(cls, edit: Edit, history: list[Event] | None = None, fires: int | None = None) -> "EditOut":
        return cls(
            id=edit.id,
            seq=edit.seq,
            status=EditStatus(edit.status),
            prompt=edit.prompt if edit.messages is None else None,
            messages=edit.messages,
            target=edit.target,
            paraphrases=edit.paraphrases,
            created_at=_utc(edit.created_at),
            started_at=_utc(edit.started_at),
            finished_at=_utc(edit.finished_at),
            retracted_at=_utc(edit.retracted_at),
            retraction_pending=bool(edit.retract_requested),
            loss=edit.loss,
            iterations=edit.iterations,
            mask_fingerprint=edit.mask_fingerprint,
            error=edit.error,
            created_by=edit.created_by,
            superseded_by=edit.superseded_by,
            history=[EditEvent.of(e) for e in history] if history is not None else None,
            fires=fires,
        )


class EditBatchOut(BaseModel):
    edits: list[EditOut]


class ImportOut(BaseModel):
    edits: list[EditOut] = Field(description="the edits this import queued, in order")
    skipped: int = Field(description="lines whose edit was imported (or exported from here) before")


class EditPage(BaseModel):
    items: list[EditOut]
    total: int
    limit: int
    offset: int


MIN_EDIT_SEQ = (
    "answer only from a memory that has settled every edit up to this seq (read your writes across "
    "replicas); a replica that is behind waits briefly, then answers 503 with Retry-After"
)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "What is the capital of Australia?", "max_new_tokens": 16}]},
    )

    prompt: Text
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(default=None, description="stop strings (not included in the text)")
    seed: Seed | None = None
    use_edits: bool = True
    chat: bool = Field(default=False, description="wrap the prompt in the model's chat template")
    stream: bool = Field(default=False, description="send Server-Sent Events as text is generated")
    min_edit_seq: int | None = Field(default=None, ge=0, description=MIN_EDIT_SEQ)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _not_blank(value, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return stop_list(value)


class FiredEdit(BaseModel):
    id: str
    match_ratio: float


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    edit: FiredEdit | None = Field(description="the edit whose memory answered, or null when the memory stayed off")
    edit_seq: int | None = Field(description="seq of the last edit in the memory when the request ran")


class ExplainRequest(PromptInput):
    """A prompt (rendered as /generate does) or chat messages (as /v1/chat/completions does)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "What is the capital of Australia?"}]},
    )


class MatchedEdit(BaseModel):
    id: str
    seq: int
    prompt: str | None
    messages: list[ChatMessage] | None = None


class ExplainOut(BaseModel):
    best_match: MatchedEdit | None = Field(
        description="the stored edit whose mask overlaps most; null when none is stored"
    )
    match_ratio: float | None = Field(description="the best match's mask overlap ratio")
    threshold: float = Field(description="tau: the memory fires when match_ratio >= threshold")
    fires: bool
    edit: MatchedEdit | None = Field(
        description="the edit whose memory would answer (best_match when it fires), or null"
    )
    edit_seq: int | None = Field(description="seq of the last edit in the memory that decided")


class PresetOut(BaseModel):
    name: str = Field(description="the preset whose values the service uses ('ratios': none matched)")
    reason: str = Field(description="why: the model's architecture and shape it was matched on, and what was set explicitly")


class StateOut(BaseModel):
    applied: int
    last_seq: int | None
    weights_sha256: str
    masks_sha256: str
    keys: list[str]
    superseded: dict[str, str] = Field(
        default_factory=dict, description="superseded edits: id -> id of the later edit that asked the same question"
    )
    layer: int
    top_k: int
    threshold: float
    threshold_calibrated: bool
    model: str
    edit_lr: float
    edit_decay: str
    edit_protect: float | None
    edit_max_iterations: int
    edit_fit_iterations: int | None = Field(
        description="step cap for an edit not yet answered right after edit_max_iterations; null: the paper's budget"
    )
    edit_append_eos: bool = Field(description="whether new edits also learn end-of-sequence after the target")
    supersede: bool = Field(default=True, description="whether an edit that asks an applied edit's question again supersedes it")
    preset: PresetOut | None = None
    replica: "ReplicaOut"
    checkpoints: "CheckpointsOut"


def _moment(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, timezone.utc)


class CheckpointsOut(BaseModel):
    """Whether checkpoint files are being written. Failing is degraded, not down: the memory and
    the log are unaffected, only the next start-up applies more deltas (docs/reliability.md)."""

    writing: Literal["ok", "failing"] = Field(
        description="failing: the last checkpoint write failed (full disk, quota, I/O error)"
    )
    failures: int = Field(description="checkpoint writes that failed since start-up")
    last_error: str | None = Field(description="the most recent failure's error (kept after writes recover)")
    last_failed_at: datetime | None
    failing_since: datetime | None = Field(description="first failure of the current streak (null: writing ok)")
    last_written_at: datetime | None = Field(description="newest checkpoint written or loaded by this process")

    @classmethod
    def of(cls, health) -> "CheckpointsOut":
        """From services.checkpoints.CheckpointHealth."""
        return cls(
            writing="failing" if health.failing else "ok",
            failures=health.failures,
            last_error=health.last_error,
            last_failed_at=_moment(health.last_failed_at),
            failing_since=_moment(health.failing_since),
            last_written_at=_moment(health.last_written_at),
        )


class ReplicaOut(BaseModel):
    role: Literal["leader", "follower"]
    name: str = Field(description="host:pid of this process")
    epoch: int | None = Field(description="the leader term this process leads in (null: follower)")
    log_position: int = Field(description="memory-log position of the served memory")
    settled_seq: int = Field(description="every edit up to this seq has its outcome in the served memory")
    lag_changes: int = Field(description="memory-log changes recorded and not yet applied here (0 on the leader)")
    lag_seconds: float = Field(description="age of the oldest of them")
