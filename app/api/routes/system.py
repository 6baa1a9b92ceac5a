"""Health, readiness, Prometheus metrics and a fingerprint of the served memory."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from memoir_core.state import masks_sha256, weights_sha256

from ...db.session import is_unavailable
from ...schemas import CheckpointsOut, PresetOut, ReplicaOut, StateOut
from ..deps import AdminCaller, ReadyRuntime, RuntimeDep, require

router = APIRouter(tags=["system"])


@router.get("/health", summary="The process is up")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="200 once the model is loaded, the memory rebuilt, the worker running, the database up")
def ready(runtime: RuntimeDep):
    # Failing checkpoint writes (a full disk) keep 200: edits are still applied and recorded and
    # generation serves, so the replica must stay in rotation; `checkpoints` reports it.
    if runtime.ready and not runtime.shutting_down and not runtime.database_reachable():
        body = {"status": "database_unavailable", "error": runtime.database_error}
        return JSONResponse(status_code=503, content=body, headers={"Retry-After": "5"})
    if runtime.ready and not runtime.shutting_down:
        return {
            "status": "ready",
            "role": runtime.role,
            "edits_in_memory": runtime.engine.snapshot.applied,
            "settled_seq": runtime.position.settled_seq,
            "replayed_on_startup": runtime.replayed_on_startup,
            "rebuild_seconds": round(runtime.rebuild_seconds, 3),
            "startup_seconds": round(runtime.startup_seconds, 3),
            "checkpoints": CheckpointsOut.of(runtime.checkpoints.health()).model_dump(mode="json"),
        }
    status = "shutting_down" if runtime.shutting_down else "failed" if runtime.startup_error else "starting"
    body = {"status": status}
    if runtime.startup_error:
        body["error"] = runtime.startup_error
    return JSONResponse(status_code=503, content=body, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics (admin key when MEMOIR_METRICS_REQUIRE_KEY)", response_class=Response)
def metrics(request: Request, runtime: RuntimeDep) -> Response:
    if runtime.settings.metrics_require_key:
        require("admin")(request, runtime)
    try:
        counts = runtime.edit_log.counts()
    except Exception as error:  # generation metrics matter most while the database is away
        if not is_unavailable(error):
            raise
        counts = None
    body = runtime.metrics.render(counts)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/state", response_model=StateOut, summary="Fingerprint of the memory being served, and this replica's role")
def state(runtime: ReadyRuntime, caller: AdminCaller) -> StateOut:
    engine = runtime.engine
    current = engine.state
    return StateOut(
        applied=current.snapshot.applied,
        last_seq=runtime.last_seq(current),
        weights_sha256=weights_sha256(current),
        masks_sha256=masks_sha256(current),
        keys=list(current.edit_keys),
        superseded=dict(current.snapshot.index.superseded),
        layer=engine.layer,
        top_k=engine.top_k,
        threshold=engine.threshold,
        threshold_calibrated=engine.config.calibrate_threshold,
        model=engine.model_id,
        edit_lr=engine.config.hyper.lr,
        edit_decay=engine.config.hyper.decay,
        edit_protect=engine.config.hyper.protect,
        edit_max_iterations=engine.config.hyper.max_iterations,
        edit_fit_iterations=engine.config.hyper.fit_iterations,
        edit_append_eos=runtime.edit_log.append_eos,
        supersede=engine.config.supersede,
        # which preset the settings come from, and why
        preset=PresetOut(name=preset.name, reason=preset.reason) if (preset := engine.config.preset) else None,
        replica=replica_of(runtime),
        checkpoints=CheckpointsOut.of(runtime.checkpoints.health()),
    )


def replica_of(runtime) -> ReplicaOut:
    return ReplicaOut(
        role=runtime.role,
        name=runtime.leadership.name,
        epoch=runtime.leadership.epoch,
        log_position=runtime.position.position,
        settled_seq=runtime.position.settled_seq,
        lag_changes=runtime.lag_changes,
        lag_seconds=round(runtime.lag_seconds, 3),
    )
