"""POST/GET/DELETE /edits: the ordered queue of fact corrections."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Response, status

from ...db.models import EditStatus
from ...schemas import EditBatchCreate, EditBatchOut, EditCreate, EditOut, EditPage, Text
from ...services.edit_log import EditConflict, EditNotFound, IdempotencyConflict, QueueFull
from ...services.prompts import PromptError
from ...services.requests import LimitExceeded, new_edit
from ..deps import EditCaller, ReadyRuntime, RuntimeDep

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
    runtime.worker.wake()
    response.headers["Location"] = f"/edits/{rows[0].id}"
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if isinstance(body, EditBatchCreate):
        return EditBatchOut(edits=[EditOut.of(row) for row in rows])
    return EditOut.of(rows[0])


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


@router.get("/{edit_id}", response_model=EditOut, summary="One edit with its history (who did what, when)")
def get_edit(edit_id: EditId, runtime: RuntimeDep, caller: EditCaller) -> EditOut:
    try:
        row = runtime.edit_log.get(edit_id)
    except EditNotFound:
        raise _not_found(edit_id) from None
    return EditOut.of(row, runtime.edit_log.history(row.seq))


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
        runtime.worker.wake()
    return EditOut.of(row)
