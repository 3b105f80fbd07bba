"""Micro-batching of concurrent requests into one model call, with a bounded queue.

The reranker is fastest when it scores many (query, candidates) jobs in one call, and it must
never run on the event loop. `MicroBatcher` collects jobs for up to `max_wait_s` (then also
takes those already waiting; with 0 it never waits, batching only what queued meanwhile) or
until `max_batch_size` are waiting; given `expected` (how many callers are on their way, e.g.
searches still encoding) it waits only while some are, so a lone search never waits. It runs
the batch function on one worker thread and hands every caller its own result. When
`max_queue_size` jobs are already waiting, `submit` raises `QueueFullError` at once, so the API
can answer 429 instead of slowing down without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


class QueueFullError(RuntimeError):
    """Too many jobs are waiting; the caller should retry after `retry_after_s` seconds."""

    def __init__(self, queued: int, retry_after_s: int) -> None:
        super().__init__(f"{queued} requests are already waiting for the model; retry later")
        self.retry_after_s = retry_after_s


class OnTheWay:
    """How many callers will submit to a batcher soon (searches in the stages before it).

    Used on the event loop only (the searches and the batcher's runner), so a plain counter."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[Callable[[], None]]:
        """Count one caller until it calls the yielded `arrived` (just before it submits) or
        leaves the block (it failed, or will not submit)."""
        here = True

        def arrived() -> None:
            nonlocal here
            if here:
                here = False
                self.count -= 1

        self.count += 1
        try:
            yield arrived
        finally:
            arrived()


@dataclass
class _Pending(Generic[JobT, ResultT]):
    job: JobT
    future: asyncio.Future[ResultT]


class MicroBatcher(Generic[JobT, ResultT]):
    """Runs `batch_fn(jobs) -> results` (same length, same order) over concurrent callers."""

    def __init__(
        self,
        batch_fn: Callable[[Sequence[JobT]], Sequence[ResultT]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue_size: int = 256,
        name: str = "model",
        expected: Callable[[], int] | None = None,
    ) -> None:
        """`expected`: callers on their way (None: always wait up to `max_wait_s`)."""
        if max_batch_size < 1 or max_queue_size < 1 or max_wait_s < 0:
            raise ValueError("batch size and queue size must be >= 1 and the wait >= 0")
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._expected = expected
        self._queue: asyncio.Queue[_Pending[JobT, ResultT]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-batcher")
        self._runner: asyncio.Task[None] | None = None
        self.batches_run = 0
        self.last_batch_size = 0
        self._mean_batch_s = 0.05  # running mean of one model call, for Retry-After

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        if self._runner is None:
            self._queue = asyncio.Queue(maxsize=self.max_queue_size)
            self._runner = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, job: JobT) -> ResultT:
        """Queue one job and wait for its result; raises `QueueFullError` when overloaded."""
        if self._queue is None:
            await self.start()
        assert self._queue is not None
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(job, future))
        except asyncio.QueueFull:
            raise QueueFullError(self._queue.qsize(), self._retry_after_s()) from None
        return await future

    def _retry_after_s(self) -> int:
        # A full queue drains in about queue/batch model calls; say at least one second.
        calls = self.max_queue_size / self.max_batch_size
        return max(1, math.ceil(calls * (self._mean_batch_s + self.max_wait_s)))

    async def _run_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if self._expected is not None and self._expected() <= 0:
                    timeout = 0.0  # no one else is on the way: waiting cannot gather company
                try:
                    if timeout <= 0:  # the wait is over: take only what is already queued
                        batch.append(self._queue.get_nowait())
                    else:
                        batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            live = [pending for pending in batch if not pending.future.cancelled()]
            if not live:
                continue
            started = loop.time()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._batch_fn, [pending.job for pending in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(live)} jobs"
                    )
            except Exception as error:  # handed to every caller of this batch
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self.batches_run += 1
            self.last_batch_size = len(live)
            self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * (loop.time() - started)
            for pending, result in zip(live, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
