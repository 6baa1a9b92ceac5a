"""Everything one running service owns: settings, database, engine, worker, batcher, metrics.

Start-up order: migrations (before serving; SQLite: refuse a second process), then in the
background: load the model; take the lead if no other replica holds it; rebuild the memory from the
memory log (newest checkpoint or whole state, then every later delta: nothing is retrained); as
leader, requeue the edit that was running when the previous leader died and start the edit worker,
as follower, start following the log; then the generation batcher. /ready turns 200 only after all
of it. An unreachable database is waited for (MEMOIR_DATABASE_WAIT_S); any other start-up failure
is fatal: the process exits non-zero with the reason (app/__main__.py). A leader that finds itself
fenced (another replica took the lead) exits at once, so its supervisor restarts it as a follower.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import event

from memoir_core import MemoirEngine, load_model
from memoir_core.engine import MemoryState
from memoir_core.memory import MemorySnapshot
from memoir_core.background import default_background_prompts
from memoir_core.deltas import state_bytes
from memoir_core.presets import model_shape, recommended_config
from memoir_core.state import weights_sha256

from .config import Settings
from .db.migrate import upgrade
from .db.retry import retry_database
from .db.session import database_engine, is_unavailable, ping, session_factory
from .metrics import Metrics
from .services.batcher import GenerationBatcher
from .services.blobs import open_blob_store
from .services.checkpoints import CheckpointStore
from .services.edit_log import EditLog
from .services.leadership import LeaderLock, LockKeeper
from .services.memory_log import Change, MemoryLog
from .services.replica import Follower, IncompatibleLog, Position, restore
from .services.status_signal import StatusSignal
from .services.worker import EditWorker, replay
from .security import RateLimiter, load_keys

log = logging.getLogger("memoir")
DATABASE_CHECK_EVERY_S = 1.0


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.db = database_engine(settings.resolved_database_url, settings.database_timeout_s)
        event.listen(self.db, "handle_error", self._count_db_error)
        self.sessions = session_factory(self.db)
        self.leadership = LeaderLock(settings.resolved_database_url, self.sessions, settings.database_timeout_s)
        self.edit_log = EditLog(self.sessions, append_eos=settings.edit_append_eos, leadership=self.leadership)
        blob_url = settings.resolved_blob_url
        self.memory_log = MemoryLog(
            self.sessions, open_blob_store(blob_url) if blob_url else None, settings.blob_inline_max_bytes
        )
        self.checkpoints = CheckpointStore(
            settings.checkpoint_dir,
            self.sessions,
            settings.checkpoint_keep,
            on_write_failed=self.metrics.checkpoint_write_failures.inc,
        )
        self.metrics.watch_checkpoints(lambda: self.checkpoints.last_written_at, lambda: self.checkpoints.failing)
        self.edit_status = StatusSignal()  # the worker notifies it when it records an outcome
        self.memory_changed = StatusSignal()  # every publish: requests waiting for min_edit_seq
        self.engine: MemoirEngine | None = None
        self.worker: EditWorker | None = None
        self.lock_keeper: LockKeeper | None = None
        self.follower: Follower | None = None
        self.position = Position(0, 0)  # where the served memory stands in the memory log
        self.lag_changes = 0  # changes recorded in the log that this replica has not applied yet
        self.lag_seconds = 0.0  # age of the oldest of them
        self.batcher: GenerationBatcher | None = None
        self.seq_by_key: dict[str, int] = {}
        self.startup_error: str | None = None
        self.startup_seconds: float | None = None
        self.replayed_on_startup = 0
        self.rebuild_seconds: float | None = None  # of the start-up's memory: checkpoint or whole state, deltas
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
        if not self.leadership.is_postgres:  # SQLite serves one process: refuse a second at once
            self.leadership.claim_sqlite()
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
            config = recommended_config(model_shape(loaded.model), s.config_overrides())
            self.engine = MemoirEngine(loaded, config)
            self.engine.add_chat_background(default_background_prompts())
            leading = retry_database(self.leadership.try_acquire, "taking the lead", deadline_s=s.database_wait_s)
            rebuilding = time.perf_counter()
            state, position = retry_database(self._rebuild, "rebuilding the memory", deadline_s=s.database_wait_s)
            self.rebuild_seconds = time.perf_counter() - rebuilding
            self.engine.threshold = config.threshold  # settings win over the checkpoint's tau
            self.publish(state, position)
            if leading:  # the database may go away between taking the lead and settling it (seen in bench.chaos)
                retry_database(self.lead, "settling the lead", deadline_s=s.database_wait_s)
            else:
                self.follower = Follower(self, s.follower_poll_s, s.leader_poll_s, s.leader_outage_grace_s)
                self.follower.start()
            self.batcher = GenerationBatcher(self.engine, s.max_batch_size, s.batch_wait_ms)
            self.batcher.start()
            self.startup_seconds = time.perf_counter() - started
            log.info(
                "ready in %.1fs as %s: model %s, layer %d, k %d, tau %.2f, %d edits in memory at log position %d "
                "(%d retrained)",
                self.startup_seconds,
                self.role,
                loaded.model_id,
                self.engine.layer,
                self.engine.top_k,
                self.engine.threshold,
                state.snapshot.applied,
                position.position,
                self.replayed_on_startup,
            )
        except Exception as error:  # fatal: app/__main__.py sees startup_error and exits non-zero
            log.exception("start-up failed")
            self.startup_error = f"{type(error).__name__}: {error}"

    def _rebuild(self) -> tuple[MemoryState, Position]:
        """The memory at the newest memory-log position. The leader retrains the applied edits
        instead when the log has no changes (edits written before the memory log existed) or was
        written for another base model, layer or state format; `lead` then records the new memory
        as a whole state, which the replicas start from."""
        self.seq_by_key.update({e.id: e.seq for e in self.edit_log.applied()})
        try:
            restored = restore(self)
        except IncompatibleLog as error:
            if not self.leadership.leading:
                raise IncompatibleLog(
                    f"{error}; the leader retrains the edits and records the new memory, which this "
                    "replica starts from once it is restarted"
                ) from error
            log.warning("%s: retraining the applied edits", error)
            restored = None
        if restored is not None:
            return restored
        if self.leadership.leading:
            state, self.replayed_on_startup = replay(self, adopt_hasher=True, progress=self.metrics.replay_progress)
            return state, Position(0, self.last_seq(state) or 0)
        return self.engine.empty_state(), Position(0, 0)

    def lead(self) -> None:
        """Become the one replica that trains: settle what the previous leader left, start the worker.

        Called with the lock held and a new epoch: the previous leader can no longer write, so the
        log read here is complete."""
        if self.follower is not None:
            self.follower.sync()  # the last changes the previous leader recorded
        requeued = self.edit_log.requeue_interrupted()
        # the log's superseded_by says what the served memory does (a rebuild may have retrained
        # the edits under another MEMOIR_SUPERSEDE); nothing changes in the usual start
        self.edit_log.sync_superseded(dict(self.engine.state.snapshot.index.superseded))
        self.checkpoints.remove_staging()  # what a killed leader was writing; this process writes next
        self._sweep_orphan_blobs()
        if self.position.position == 0:  # the log does not describe this memory: replicas start from it
            state = self.engine.state
            whole = Change("state", state.snapshot.applied, weights_sha256(state), state_bytes(self.engine, state))
            self.edit_log.record_state(self.memory_log.stage(whole))
            self.position = Position(self.memory_log.last_position(), self.position.settled_seq)
        self.metrics.role_changed(True)
        self.worker = EditWorker(self)
        self.worker.start()
        if self.leadership.is_postgres:  # SQLite's file lock cannot lapse
            self.lock_keeper = LockKeeper(self.leadership, self.fenced)
            self.lock_keeper.start()
        log.info("leading (epoch %d); %d interrupted edit(s) requeued", self.leadership.epoch, requeued)

    def _sweep_orphan_blobs(self) -> None:
        """Blobs a previous leader put and never committed a row for. Only tidiness: a blob store
        that does not answer now is swept at the next lead."""
        try:
            removed = self.memory_log.sweep_orphans()
        except Exception as error:
            log.warning("orphan blobs not swept (%s): %s", type(error).__name__, str(error).splitlines()[0])
        else:
            if removed:
                log.info("removed %d orphan blob(s) from %s", removed, self.memory_log.blobs.url)

    def wake_worker(self) -> None:
        """New work in the log: the leader's worker looks at once (another replica's finds it
        within the worker's half-second poll)."""
        if self.worker is not None:
            self.worker.wake()

    def fenced(self, reason: str) -> None:
        """Another replica leads now: stop at once. Nothing more may be written or published, and
        the supervisor restarts this process as a follower of the new leader."""
        log.critical("no longer the leader (%s): exiting so that this replica restarts as a follower", reason)
        logging.shutdown()
        os._exit(3)

    def seq_of(self, key: str) -> int:
        seq = self.seq_by_key.get(key)
        if seq is None:
            seq = self.seq_by_key[key] = self.edit_log.get(key).seq
        return seq

    def measure_lag(self) -> None:
        """Changes in the log that this replica has not applied yet, and the oldest one's age."""
        behind = self.memory_log.after(self.position.position, 1)
        if behind:
            self.lag_changes = self.memory_log.last_position() - self.position.position
            self.lag_seconds = max(0.0, time.time() - behind[0].created_at.timestamp())
        else:
            self.lag_changes, self.lag_seconds = 0, 0.0
        self.metrics.observe_lag(self.lag_changes, self.lag_seconds)

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
        """Finish the edit being trained, checkpoint the memory, hand the lead on, stop the threads."""
        self.begin_shutdown()
        if self.follower is not None:
            self.follower.stop()
            self.follower.join(timeout=30)
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout=600)
            state = self.engine.state
            last = self.last_seq(state)
            if last is not None and self.leadership.leading:  # so the next start applies no deltas
                try:
                    written = self.checkpoints.write(self.engine, state, last, self.position.position)
                except Exception as error:  # the next start applies deltas instead
                    if not is_unavailable(error):
                        raise
                    log.warning("no checkpoint at shutdown: the database is unreachable")
                else:
                    if written is None:  # the disk refused it (logged by the store); the log has every delta
                        log.warning("no checkpoint at shutdown: the next start applies the deltas since the last one")
        if self.lock_keeper is not None:
            self.lock_keeper.stop()
            self.lock_keeper.join(timeout=30)
        self.leadership.release()  # another replica can take the lead at once
        if self.batcher is not None:
            self.batcher.stop()
            self.batcher.join(timeout=60)
        self.db.dispose()

    def _count_db_error(self, context) -> None:
        if not context.is_pre_ping:  # a stale pooled connection that is replaced is no error
            self.metrics.db_errors.inc()

    # ---- state ------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return "leader" if self.leadership.leading else "follower"

    @property
    def ready(self) -> bool:
        applying = (self.worker is not None and self.worker.is_alive()) or (
            self.follower is not None and self.follower.is_alive()
        )
        return self.engine is not None and applying and self.batcher is not None and self.batcher.is_alive()

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

    def publish(self, state: MemoryState, position: Position | None = None) -> None:
        """Make `state` the served memory (callers record seq_by_key for its keys first), at
        `position` in the memory log (None: the leader's state ahead of its record)."""
        self.engine.publish(state)
        if position is not None:
            self.position = position
        self.metrics.memory_edits.set(state.snapshot.applied)
        self.metrics.applied_seq.set(self.last_seq(state) or 0)
        self.metrics.log_position.set(self.position.position)
        self.memory_changed.notify()

    def settle(self, seq: int, position: int | None = None) -> None:
        """The leader has the outcome of edit `seq` in its memory (and, once recorded, at `position`)."""
        self.position = Position(
            position if position is not None else self.position.position, max(self.position.settled_seq, seq), time.time()
        )
        self.memory_changed.notify()

    def last_seq(self, state: MemoryState | MemorySnapshot | None = None) -> int | None:
        """seq of the newest edit in a memory (default: the served one)."""
        snapshot = state or self.engine.state
        keys = snapshot.index.keys if isinstance(snapshot, MemorySnapshot) else snapshot.keys
        return self.seq_by_key.get(keys[-1]) if keys else None
