"""Continuous batching of concurrent generation requests.

One thread owns a running `DecodeBatch`. Between decoding steps it lets waiting requests join
(each with its own prefill and memory decision) up to max_batch_size rows, and hands every
finished row back to its waiting caller. When idle it waits a few milliseconds after the first
request so that simultaneous requests share one prefill.
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

    def resolve(self, result: GenerationOutput | None = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.future, result, error)


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
        self.steps = 0
        self.largest_batch = 0

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)

    def _take(self, room: int, idle: bool) -> list[_Job]:
        """Up to `room` waiting jobs; when idle, block for the first and wait briefly for company."""
        jobs: list[_Job] = []
        deadline = None
        while len(jobs) < room:
            try:
                if idle and not jobs:
                    job = self._queue.get()
                    deadline = time.monotonic() + self.wait_s
                elif deadline is not None and (remaining := deadline - time.monotonic()) > 0:
                    job = self._queue.get(timeout=remaining)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            if not job.future.done():
                jobs.append(job)
        return jobs

    def run(self) -> None:
        batch = self.engine.decode_batch()
        jobs_by_row: dict[int, _Job] = {}
        while not self._stopping.is_set():
            finished = []
            room = self.max_batch_size - len(batch) if batch.can_join else 0
            joining = self._take(room, idle=len(batch) == 0) if room > 0 else []
            if joining:
                try:
                    rows = batch.add([job.request for job in joining])
                except Exception as error:  # the joining rows' prefill failed; the running rows go on
                    log.exception("generation prefill failed")
                    for job in joining:
                        job.resolve(error=error)
                    rows = []
                jobs_by_row.update({id(row): job for row, job in zip(rows, joining)})
                finished += [row for row in rows if row.finished]
                self.largest_batch = max(self.largest_batch, len(batch) + len(finished))
            try:
                if len(batch):
                    finished += batch.step()
                    self.steps += 1
            except Exception as error:  # a failed step is every row's: fail the rows in flight, keep serving
                log.exception("generation step failed")
                for row in batch.abort():
                    jobs_by_row.pop(id(row)).resolve(error=error)
            for row in finished:  # a row that failed alone (its seed, its sampling) fails its own request
                job = jobs_by_row.pop(id(row))
                try:
                    job.resolve(row.output())
                except Exception as error:
                    job.resolve(error=error)
        for row in batch.abort():
            jobs_by_row.pop(id(row)).resolve(error=RuntimeError("the server is shutting down"))
        while True:  # fail whatever is still waiting so no request hangs at shutdown
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.resolve(error=RuntimeError("the server is shutting down"))
