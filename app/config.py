"""Service settings, all from MEMOIR_* environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from sqlalchemy.engine import make_url
from pydantic_settings import BaseSettings, SettingsConfigDict

from memoir_core.editor import DECAY_SCOPES
from memoir_core.presets import ConfigOverrides


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMOIR_", extra="ignore")

    # network
    host: str = "127.0.0.1"
    port: int = 8000

    # model
    model: str | None = Field(default=None, description="model directory, GGUF file or hub id; empty: embedded")
    model_name: str | None = Field(default=None, description="name served on /v1/models (default: the model id)")
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = None
    allow_download: bool = False

    # storage
    state_dir: Path = Path("state")
    database_url: str | None = Field(default=None, description="default: SQLite file in the state directory")
    checkpoint_every: int = Field(default=20, ge=1, description="write a checkpoint every N applied edits")
    checkpoint_keep: int = Field(default=10, ge=1, description="checkpoints kept on disk (older are deleted)")
    blob_url: str | None = Field(
        default=None,
        description="where memory-log payloads over blob_inline_max_bytes go: a directory, file:// or "
        "s3://bucket/prefix (AWS_* variables for credentials and endpoint); unset: blobs/ beside the SQLite "
        "file, the database on PostgreSQL (replicas need a store they share)",
    )
    blob_inline_max_bytes: int = Field(default=4096, ge=0, description="payloads up to this size stay in the row")
    compact_every_edits: int = Field(
        default=100, ge=1, description="the leader records a whole state once this many edits followed the last one"
    )
    compact_every_bytes: int = Field(
        default=1 << 30, ge=1, description="... or once the deltas since the last one reach this many bytes"
    )
    log_retention_s: float = Field(
        default=3600.0, ge=0.0, description="payloads behind the newest whole state are pruned once this old"
    )
    database_wait_s: float = Field(
        default=60.0, ge=0.0, description="how long start-up waits for an unreachable database before it exits"
    )

    database_timeout_s: float = Field(
        default=5.0,
        gt=0.0,
        description="bound on connecting, each statement and each wait for the database (also a black-holed one); "
        "past it the request answers 503 with Retry-After and the edit worker retries",
    )

    # replicas (PostgreSQL): one leader trains, the others follow the memory log
    leader_poll_s: float = Field(
        default=1.0, gt=0.0, description="how often a follower tries to take the lead: bounds failover time"
    )
    leader_outage_grace_s: float = Field(
        default=5.0,
        ge=0.0,
        description="after a database outage a follower waits this long before trying to take the lead, so the "
        "leader that held it takes it back instead of handing over on every blink",
    )
    follower_poll_s: float = Field(
        default=2.0, gt=0.0, description="followers read the memory log at least this often (besides LISTEN/NOTIFY)"
    )
    min_edit_seq_wait_s: float = Field(
        default=5.0, ge=0.0, description="how long a request with min_edit_seq waits for a lagging replica before 503"
    )

    # MEMOIR (unset: the engine's defaults for the loaded model)
    layer: int | None = None
    top_k: int | None = None
    # "calibrate" (default): each published memory gets its tau from the background prompts, which
    # beat the fixed 0.4 on ZsRE (README "Evaluation"); or a fixed number in (0, 1]
    threshold: float | Literal["calibrate"] = "calibrate"
    edit_lr: float | None = Field(default=None, gt=0.0)
    edit_max_iterations: int | None = Field(default=None, ge=1)
    edit_decay: Literal[DECAY_SCOPES] | None = Field(
        default=None,
        description="weight decay on all of W_m (the paper), only the edited columns, or none; unset: preset",
    )
    edit_protect: float | None = Field(
        default=None,
        ge=0.0,
        description="ridge factor steering each edit's steps away from stored edits' keys; 0: off; unset: preset",
    )
    edit_fit_iterations: int | None = Field(
        default=None,
        ge=0,
        description="an edit not yet answered right after the step cap keeps training up to this many steps; "
        "0: off; unset: preset",
    )
    edit_append_eos: bool = Field(
        default=False,
        description="also train end-of-sequence after each target so answers stop after it (fewer answers right)",
    )
    key_projector: str = Field(
        default="none",
        description="which edit fires: 'none', the paper's mask overlap; 'auto', the key projector shipped for the "
        "model (mask overlap when none ships); or a file from `python -m memoir_core.key_projector`",
    )
    edit_max_attempts: int = Field(default=3, ge=1, description="tries of an edit whose training fails transiently")
    seed: int = 42

    # limits
    max_prompt_tokens: int = Field(default=256, ge=1)
    max_target_tokens: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=512, ge=1)
    max_input_tokens: int = Field(default=2048, ge=1, description="generation prompt limit")
    max_edits_per_request: int = Field(default=100, ge=1)

    # security and limits
    api_keys: str | None = Field(default=None, description="KEY_ID:SCOPES:SECRET entries, comma separated")
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = Field(default=False, description="serve a non-loopback address without keys")
    bootstrap_key_file: Path | None = Field(default=None, description="create an admin key here if none is set")
    metrics_require_key: bool = Field(default=False, description="/metrics needs an admin key")
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_queue_depth: int = Field(default=1000, ge=1, description="queued edits; beyond it POST /edits gets 429")
    rate_limit_per_minute: int = Field(default=600, ge=0, description="requests per API key; 0: off")
    rate_limit_burst: int = Field(default=60, ge=1)
    console: bool = Field(default=True, description="serve the edit console (a static page) at /console/")
    shutdown_grace_s: float = Field(default=10.0, ge=0.0, description="how long open streams may take to close")

    # generation batching
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0.0)
    release_after_answer: bool = Field(
        default=True,
        description="switch a request's memory off once its answer has said the matched edit's target "
        "(false: on to the end, as the paper decodes)",
    )
    supersede: bool = Field(
        default=True,
        description="an edit that asks an applied edit's question again supersedes it: the earlier one "
        "stops firing (false: both stay, the newer wins only where its mask matches better)",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("MEMOIR_THRESHOLD must be in (0, 1] or 'calibrate'")
        return value

    @field_validator(
        "model",
        "database_url",
        "blob_url",
        "api_keys",
        "edit_decay",
        "edit_protect",
        "edit_fit_iterations",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value  # not `value or None`: edit_protect=0 means off, not unset

    def config_overrides(self) -> ConfigOverrides:
        """The MEMOIR values set here, for `recommended_config` (unset ones keep the preset's)."""
        return ConfigOverrides(
            layer=self.layer,
            top_k=self.top_k,
            threshold=None if self.threshold == "calibrate" else self.threshold,
            calibrate_threshold=self.threshold == "calibrate",
            lr=self.edit_lr,
            max_iterations=self.edit_max_iterations,
            decay=self.edit_decay,
            protect=self.edit_protect,
            fit_iterations=self.edit_fit_iterations,
            seed=self.seed,
            release_after_answer=self.release_after_answer,
            supersede=self.supersede,
            key_projector=None if self.key_projector == "none" else self.key_projector,
        )

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'memoir.db').resolve()}"

    @property
    def resolved_blob_url(self) -> str | None:
        """Unset on SQLite (one process): `blobs/` beside the database file, so the log's bytes share
        its disk (a full checkpoint disk stops checkpoints, not edits). Unset on PostgreSQL, payloads
        stay in the database: each replica has its own state directory, so only a store they share
        will do."""
        if self.blob_url:
            return self.blob_url
        url = make_url(self.resolved_database_url)
        if url.get_backend_name() != "sqlite" or not url.database:
            return None
        return str(Path(url.database).parent / "blobs")

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"
