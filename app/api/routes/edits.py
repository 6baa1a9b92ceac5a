"""POST/GET/DELETE /edits: the ordered queue of fact corrections."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ...db.models import Edit, EditStatus
from ...runtime import Runtime
from ...schemas import EditBatchCreate, EditBatchOut, EditCreate, EditOut, EditPage, ExportedEdit, ImportOut, Text
from ...services.edit_log import EditConflict, EditNotFound, IdempotencyConflict, NewEdit, QueueFull
from ...services.prompts import PromptError
from ...services.requests import LimitExceeded, new_edit
from ...services.transfer import JSON_LINES, BadImport, export_lines, parse_lines
from ..deps import EditCaller, Principal, ReadyRuntime, RuntimeDep

router = APIRouter(prefix="/edits", tags=["edits"])
EditId = Annotated[Text, Path(max_length=64)]


def _not_found(edit_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"edit {edit_id} not found")


def _body_hash(body: EditCreate | EditBatchCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EditOut | EditBatchOut,
    summary="Queue one fact correction, or several in order",
    responses={409: {}, 422: {}, 429: {"description": "the queue is full (see Retry-After)"}},
)
def submit_edits(
    runtime: ReadyRuntime,
    caller: EditCaller,
    response: Response,
    body: Annotated[EditCreate | EditBatchCreate, Body()],
    idempotency_key: Annotated[
        Text | None, Header(max_length=255, description="repeat a request safely: same key + body = same edits")
    ] = None,
) -> EditOut | EditBatchOut:
    items = body.edits if isinstance(body, EditBatchCreate) else [body]
    if len(items) > runtime.settings.max_edits_per_request:
        raise HTTPException(
            status_code=422,
            detail=f"{len(items)} edits in one request; the limit is {runtime.settings.max_edits_per_request}",
        )
    try:
        # every item is checked before anything is queued: a bad batch changes nothing
        new = [new_edit(runtime, item, i if len(items) > 1 else None) for i, item in enumerate(items)]
        submission = runtime.edit_log.submit(
            new,
            key_id=caller.key_id,
            idempotency_key=idempotency_key,
            request_hash=_body_hash(body),
            max_queue_depth=runtime.settings.max_queue_depth,
        )
    except (PromptError, LimitExceeded, IdempotencyConflict) as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    except QueueFull as error:
        raise HTTPException(status_code=429, detail=str(error), headers={"Retry-After": "30"}) from None
    rows = submission.edits
    runtime.wake_worker()
    response.headers["Location"] = f"/edits/{rows[0].id}"
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if isinstance(body, EditBatchCreate):
        return EditBatchOut(edits=[EditOut.of(row) for row in rows])
    return EditOut.of(rows[0])


@router.get(
    "/export",
    response_class=StreamingResponse,
    summary="The applied edits in seq order as JSON Lines, to import on another server",
    responses={
        200: {
            "description": "one JSON object a line: id, seq, prompt or messages, target, times, creator",
            "content": {JSON_LINES: {"schema": {"type": "string"}}},
        }
    },
)
def export_edits(runtime: RuntimeDep, caller: EditCaller) -> StreamingResponse:
    return StreamingResponse(
        export_lines(runtime.edit_log),
        media_type=JSON_LINES,
        headers={"Content-Disposition": 'attachment; filename="memoir-edits.jsonl"'},
    )


@router.post(
    "/import",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ImportOut,
    summary="Queue the edits of an export file in order; lines imported before are skipped",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON_LINES: {"schema": {"type": "string"}}, "text/plain": {"schema": {"type": "string"}}},
        }
    },
    responses={415: {}, 422: {"description": "a bad line (named): nothing is queued"}, 429: {}},
)
async def import_edits(request: Request, runtime: ReadyRuntime, caller: EditCaller) -> ImportOut:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (JSON_LINES, "text/plain"):
        raise HTTPException(status_code=415, detail=f"send the export file as {JSON_LINES} or text/plain")
    return await run_in_threadpool(_import, runtime, caller, await request.body())


def _import(runtime: Runtime, caller: Principal, body: bytes) -> ImportOut:
    try:
        # every line is checked before anything is queued: a bad file changes nothing
        edits = [(edit.id, _line_edit(runtime, number, edit)) for number, edit in parse_lines(body)]
        rows, skipped = runtime.edit_log.import_edits(
            edits, key_id=caller.key_id, max_queue_depth=runtime.settings.max_queue_depth
        )
    except BadImport as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    except QueueFull as error:
        raise HTTPException(status_code=429, detail=str(error), headers={"Retry-After": "30"}) from None
    if rows:
        runtime.wake_worker()
    return ImportOut(edits=[EditOut.of(row) for row in rows], skipped=skipped)


def _line_edit(runtime: Runtime, number: int, edit: ExportedEdit) -> NewEdit:
    try:
        return new_edit(runtime, edit)
    except (PromptError, LimitExceeded) as error:
        raise BadImport(f"line {number}: {error}") from None


@router.get("", response_model=EditPage, summary="List edits in seq order")
def list_edits(
    runtime: RuntimeDep,
    caller: EditCaller,
    status_filter: Annotated[EditStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> EditPage:
    rows, total = runtime.edit_log.list(status_filter.value if status_filter else None, limit, offset)
    return EditPage(items=[EditOut.of(row) for row in rows], total=total, limit=limit, offset=offset)


PENDING = (EditStatus.QUEUED, EditStatus.RUNNING)


@router.get("/{edit_id}", response_model=EditOut, summary="One edit with its history (who did what, when)")
async def get_edit(
    edit_id: EditId,
    runtime: RuntimeDep,
    caller: EditCaller,
    wait: Annotated[
        float | None, Query(gt=0, le=60, description="seconds to wait for a queued or running edit to finish")
    ] = None,
) -> EditOut:
    deadline = time.monotonic() + (wait or 0)
    while True:
        version = runtime.edit_status.version
        row = await run_in_threadpool(_get, runtime, edit_id)
        remaining = deadline - time.monotonic()
        if row.status not in PENDING or remaining <= 0 or runtime.shutting_down:
            break
        await runtime.edit_status.wait(version, remaining)
    history = await run_in_threadpool(runtime.edit_log.history, row.seq)
    return EditOut.of(row, history, fires=runtime.metrics.fires_by_edit[row.id])


def _get(runtime: Runtime, edit_id: str) -> Edit:
    try:
        return runtime.edit_log.get(edit_id)
    except EditNotFound:
        raise _not_found(edit_id) from None


@router.delete(
    "/{edit_id}",
    response_model=EditOut,
    summary="Cancel a queued edit (scope edit), or retract an applied one (scope admin)",
    responses={200: {"description": "cancelled"}, 202: {"description": "retraction queued"}, 403: {}, 409: {}},
)
def delete_edit(edit_id: EditId, runtime: ReadyRuntime, caller: EditCaller, response: Response) -> EditOut:
    try:
        row = runtime.edit_log.delete(edit_id, key_id=caller.key_id, allow_retraction=caller.allows("admin"))
    except EditNotFound:
        raise _not_found(edit_id) from None
    except EditConflict as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    except PermissionError as error:
        raise HTTPException(status_code=403, detail=str(error)) from None
    if row.status == EditStatus.APPLIED:
        response.status_code = status.HTTP_202_ACCEPTED
        runtime.wake_worker()
    else:
        runtime.edit_status.notify()  # cancelled: requests waiting for it answer now
    return EditOut.of(row)
