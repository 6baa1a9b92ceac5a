"""Everything one running service owns: settings, database, engine, worker, batcher, metrics.

Start-up order: migrations (before serving), then in the background: load the model, rebuild the
memory from the newest checkpoint plus replay, requeue an edit that was running at a crash, start
the edit worker and the generation batcher. /ready turns 200 only after all of it. An unreachable
database is waited for (MEMOIR_DATABASE_WAIT_S); any other start-up failure is fatal: the process
exits non-zero with the reason (app/__main__.py).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import event

from memoir_core import MemoirEngine, load_model
from memoir_core.engine import MemoryState
from memoir_core.memory import MemorySnapshot
from memoir_core.background import default_background_prompts
from memoir_core.presets import model_shape, recommended_config

from .config import Settings
from .db.migrate import upgrade
from .db.retry import retry_database
from .db.session import database_engine, is_unavailable, ping, session_factory
from .metrics import Metrics
from .services.batcher import GenerationBatcher
from .services.checkpoints import CheckpointStore
from .services.edit_log import EditLog
from .services.status_signal import StatusSignal
from .services.worker import EditWorker, replay
from .security import RateLimiter, load_keys

log = logging.getLogger("memoir")
DATABASE_CHECK_EVERY_S = 1.0


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.db = database_engine(settings.resolved_database_url)
        event.listen(self.db, "handle_error", self._count_db_error)
        self.sessions = session_factory(self.db)
        self.edit_log = EditLog(self.sessions, append_eos=settings.edit_append_eos)
        self.checkpoints = CheckpointStore(settings.checkpoint_dir, self.sessions, settings.checkpoint_keep)
        self.metrics.watch_checkpoints(lambda: self.checkpoints.last_written_at)
        self.edit_status = StatusSignal()  # the worker notifies it when it records an outcome
        self.engine: MemoirEngine | None = None
        self.worker: EditWorker | None = None
        self.batcher: GenerationBatcher | None = None
        self.seq_by_key: dict[str, int] = {}
        self.startup_error: str | None = None
        self.startup_seconds: float | None = None
        self.replayed_on_startup = 0
        self.openai = None  # app.openai.serving.OpenAIServing, made on first use
        self.keys, self.key_note = load_keys(settings)
        self.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.shutting_down = False
        self.active_streams: set[threading.Event] = set()  # cancel events of open streams
        self._loader: threading.Thread | None = None
        self.database_error: str | None = None  # why the last database check failed
        self._database_checked_at = float("-inf")
        self._database_check_lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------

    def migrate(self) -> None:
        url = self.settings.resolved_database_url
        retry_database(lambda: upgrade(url), "migrations", deadline_s=self.settings.database_wait_s)

    def start(self) -> None:
        log.warning(self.key_note) if not self.keys.enabled else log.info(self.key_note)
        self._loader = threading.Thread(target=self._load, name="memoir-startup", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            s = self.settings
            loaded = load_model(
                s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir, allow_download=s.allow_download
            )
            config = recommended_config(
                model_shape(loaded.model),
                layer=s.layer,
                top_k=s.top_k,
                threshold=None if s.threshold == "calibrate" else s.threshold,
                calibrate_threshold=s.threshold == "calibrate",
                lr=s.edit_lr,
                max_iterations=s.edit_max_iterations,
                decay=s.edit_decay,
                protect=s.edit_protect,
                seed=s.seed,
            )
            self.engine = MemoirEngine(loaded, config)
            self.engine.add_chat_background(default_background_prompts())
            state, requeued = retry_database(self._rebuild, "rebuilding the memory", deadline_s=s.database_wait_s)
            self.engine.threshold = config.threshold  # settings win over the checkpoint's tau
            self.publish(state)
            self.worker = EditWorker(self)
            self.worker.start()
            self.batcher = GenerationBatcher(self.engine, s.max_batch_size, s.batch_wait_ms)
            self.batcher.start()
            self.startup_seconds = time.perf_counter() - started
            log.info(
                "ready in %.1fs: model %s, layer %d, k %d, tau %.2f, %d edits in memory (%d replayed, %d requeued)",
                self.startup_seconds,
                loaded.model_id,
                self.engine.layer,
                self.engine.top_k,
                self.engine.threshold,
                state.snapshot.applied,
                self.replayed_on_startup,
                requeued,
            )
        except Exception as error:  # fatal: app/__main__.py sees startup_error and exits non-zero
            log.exception("start-up failed")
            self.startup_error = f"{type(error).__name__}: {error}"

    def _rebuild(self) -> tuple[MemoryState, int]:
        """The memory of the applied edits; edits that were running at a crash are queued again."""
        requeued = self.edit_log.requeue_interrupted()
        self.seq_by_key.update({e.id: e.seq for e in self.edit_log.applied()})
        state, self.replayed_on_startup = replay(self, adopt_hasher=True, progress=self.metrics.replay_progress)
        return state, requeued

    def begin_shutdown(self) -> None:
        """SIGTERM: stop being ready and taking edits, and close open streams."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.edit_status.notify()  # requests waiting for an edit answer now
        log.info("shutting down: closing %d open stream(s)", len(self.active_streams))
        for cancel in list(self.active_streams):
            cancel.set()

    def stop(self) -> None:
        """Finish the edit being trained, checkpoint the memory, stop the threads."""
        self.begin_shutdown()
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout=600)
            state = self.engine.state
            last = self.last_seq(state)
            if last is not None:  # so the next start replays nothing
                try:
                    self.checkpoints.write(self.engine, state, last)
                except Exception as error:  # the next start replays instead
                    if not is_unavailable(error):
                        raise
                    log.warning("no checkpoint at shutdown: the database is unreachable")
        if self.batcher is not None:
            self.batcher.stop()
            self.batcher.join(timeout=60)
        self.db.dispose()

    def _count_db_error(self, context) -> None:
        if not context.is_pre_ping:  # a stale pooled connection that is replaced is no error
            self.metrics.db_errors.inc()

    # ---- state ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self.engine is not None
            and self.worker is not None
            and self.worker.is_alive()
            and self.batcher is not None
            and self.batcher.is_alive()
        )

    def database_reachable(self) -> bool:
        """A cheap `SELECT 1`, asked at most once a second (/ready may be polled often)."""
        with self._database_check_lock:
            if time.monotonic() - self._database_checked_at > DATABASE_CHECK_EVERY_S:
                try:
                    ping(self.db)
                    self.database_error = None
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    self.database_error = str(error).splitlines()[0]
                self._database_checked_at = time.monotonic()
            return self.database_error is None

    def publish(self, state: MemoryState) -> None:
        """Make `state` the served memory (callers record seq_by_key for its keys first)."""
        self.engine.publish(state)
        self.metrics.memory_edits.set(state.snapshot.applied)
        self.metrics.applied_seq.set(self.last_seq(state) or 0)

    def last_seq(self, state: MemoryState | MemorySnapshot | None = None) -> int | None:
        """seq of the newest edit in a memory (default: the served one)."""
        snapshot = state or self.engine.state
        keys = snapshot.index.keys if isinstance(snapshot, MemorySnapshot) else snapshot.keys
        return self.seq_by_key.get(keys[-1]) if keys else None
