"""Running one generation request through the batcher, as a whole or as a stream of text pieces."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import AsyncIterator

from memoir_core import GenerationOutput, GenerationRequest

from ..runtime import Runtime


async def stream_text(runtime: Runtime, request: GenerationRequest) -> AsyncIterator[str | GenerationOutput]:
    """Yields text pieces as the batcher produces them, then the final GenerationOutput.

    If the consumer stops early (client disconnect), the row is cancelled inside its batch.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    cancel = threading.Event()
    # the batcher thread hands pieces to this loop in order; the result comes after the last one
    request.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    request.cancel = cancel
    runtime.active_streams.add(cancel)  # shutdown closes open streams through it
    task = asyncio.ensure_future(runtime.batcher.generate(request))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
        output = task.result()
        if output.finish_reason == "cancelled" and runtime.shutting_down:
            raise ServerShuttingDown("the server is shutting down; the stream was closed")
        yield output
    finally:
        runtime.active_streams.discard(cancel)
        if not task.done():
            cancel.set()


class ServerShuttingDown(RuntimeError):
    pass


def sse(payload: dict | str) -> str:
    """One Server-Sent Event carrying JSON (or the literal [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
