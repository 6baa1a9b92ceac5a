"""Read-your-writes across replicas: `min_edit_seq`.

A client that submitted edit N (to any replica) and wants an answer that includes it sends
`min_edit_seq: N`. A replica whose memory has not settled edit N yet (a follower applying the
leader's changes) waits for it up to MEMOIR_MIN_EDIT_SEQ_WAIT_S, then answers 503 with Retry-After,
so that the client (or the load balancer) tries again, possibly elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import HTTPException

if TYPE_CHECKING:
    from ..runtime import Runtime

RETRY_AFTER_S = "1"


async def wait_for_edit_seq(runtime: "Runtime", wanted: int | None) -> None:
    if wanted is None or runtime.position.settled_seq >= wanted:
        return
    # a seq is committed before any replica hands it out, so one past the log's newest was never
    # given to anyone: waiting could not help
    newest = await asyncio.to_thread(runtime.edit_log.newest_seq)
    if wanted > newest:
        raise HTTPException(status_code=422, detail=f"min_edit_seq {wanted}: no edit has that seq (the newest is {newest})")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + runtime.settings.min_edit_seq_wait_s
    while True:
        version = runtime.memory_changed.version  # before reading: no change after it is missed
        if runtime.position.settled_seq >= wanted:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise HTTPException(
                status_code=503,
                detail=(
                    f"this replica's memory has settled the edits up to seq {runtime.position.settled_seq}, not yet "
                    f"{wanted} (min_edit_seq); retry shortly"
                ),
                headers={"Retry-After": RETRY_AFTER_S},
            )
        await runtime.memory_changed.wait(version, remaining)
