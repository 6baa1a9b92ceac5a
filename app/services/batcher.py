"""Batches concurrent generation requests into one decode loop.

Requests that arrive while a batch is running wait for the next one; each batch takes whatever is
waiting (up to max_batch_size), after a short wait that lets simultaneous requests meet. Each row
keeps its own memory decision inside the batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
import logging
import queue
import threading
import time

from memoir_core import GenerationOutput, GenerationRequest, MemoirEngine

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class GenerationBatcher(threading.Thread):
    def __init__(self, engine: MemoirEngine, max_batch_size: int, wait_ms: float):
        super().__init__(name="memoir-generation", daemon=True)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self.batches = 0
        self.largest_batch = 0

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)

    def _collect(self) -> list[_Job]:
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            batch.append(job)
        return [job for job in batch if not job.future.done()]

    def run(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                outputs = self.engine.generate([job.request for job in batch])
            except Exception as error:
                log.exception("generation batch failed")
                for job in batch:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, error)
                continue
            for job, output in zip(batch, outputs):
                job.loop.call_soon_threadsafe(_resolve, job.future, output)
        # fail whatever is still waiting so no request hangs at shutdown
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, RuntimeError("the server is shutting down"))
