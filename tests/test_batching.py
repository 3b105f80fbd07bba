"""The micro-batcher groups concurrent jobs, keeps order, and refuses work when full."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.search.batching import MicroBatcher, OnTheWay, QueueFullError


def test_concurrent_jobs_share_one_call_and_get_their_own_results() -> None:
    calls: list[list[int]] = []

    def square_all(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        return [job * job for job in jobs]

    async def scenario() -> list[int]:
        batcher = MicroBatcher(square_all, max_batch_size=8, max_wait_s=0.05)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(n) for n in range(8)))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == [n * n for n in range(8)]
    assert len(calls) == 1 and sorted(calls[0]) == list(range(8))


def test_batch_size_is_bounded() -> None:
    sizes: list[int] = []

    def identity(jobs: list[int]) -> list[int]:
        sizes.append(len(jobs))
        return list(jobs)

    async def scenario() -> list[int]:
        batcher = MicroBatcher(identity, max_batch_size=3, max_wait_s=0.02)
        try:
            return await asyncio.gather(*(batcher.submit(n) for n in range(10)))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == list(range(10))
    assert max(sizes) <= 3 and sum(sizes) == 10


def test_the_model_runs_off_the_event_loop() -> None:
    loop_threads: set[int] = set()

    def record_thread(jobs: list[int]) -> list[int]:
        loop_threads.add(threading.get_ident())
        return list(jobs)

    async def scenario() -> int:
        batcher = MicroBatcher(record_thread, max_batch_size=2, max_wait_s=0)
        try:
            await batcher.submit(1)
        finally:
            await batcher.stop()
        return threading.get_ident()

    event_loop_thread = asyncio.run(scenario())
    assert loop_threads and event_loop_thread not in loop_threads


def test_full_queue_is_refused_with_a_retry_hint() -> None:
    release = threading.Event()

    def slow(jobs: list[int]) -> list[int]:
        release.wait(5)
        return list(jobs)

    async def scenario() -> QueueFullError:
        batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0, max_queue_size=2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # the worker holds job 0; the queue is empty again
        waiting = [asyncio.create_task(batcher.submit(n)) for n in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(3)
        release.set()
        assert await first == 0
        assert [await task for task in waiting] == [1, 2]
        await batcher.stop()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.retry_after_s >= 1
    assert "waiting" in str(refused)


def test_a_failing_batch_fails_each_caller_and_the_batcher_keeps_going() -> None:
    def fail_on_negative(jobs: list[int]) -> list[int]:
        if any(job < 0 for job in jobs):
            raise ValueError("negative job")
        return list(jobs)

    async def scenario() -> int:
        batcher = MicroBatcher(fail_on_negative, max_batch_size=1, max_wait_s=0)
        try:
            with pytest.raises(ValueError, match="negative job"):
                await batcher.submit(-1)
            return await batcher.submit(5)
        finally:
            await batcher.stop()

    started = time.monotonic()
    assert asyncio.run(scenario()) == 5
    assert time.monotonic() - started < 5


def test_without_a_wait_jobs_queued_meanwhile_share_the_next_call() -> None:
    calls: list[list[int]] = []
    first_running = threading.Event()
    release = threading.Event()

    def held_first(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        if len(calls) == 1:
            first_running.set()
            release.wait(5)
        return list(jobs)

    async def scenario() -> list[int]:
        batcher = MicroBatcher(held_first, max_batch_size=8, max_wait_s=0)
        try:
            first = asyncio.create_task(batcher.submit(0))
            await asyncio.to_thread(first_running.wait, 5)
            rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 6)]
            await asyncio.sleep(0.05)  # all five are queued while the first call runs
            release.set()
            return await asyncio.gather(first, *rest)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == list(range(6))
    assert calls == [[0], [1, 2, 3, 4, 5]]  # no wait, yet one call for the five


def _calls_of_two_jobs_50ms_apart(on_the_way: OnTheWay, second_on_its_way: bool) -> list[list[int]]:
    """The batches of a job submitted at once and one 50 ms later (counted on its way meanwhile
    when `second_on_its_way`), through a batcher that may wait up to 5 s for company."""
    calls: list[list[int]] = []

    def record(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        return list(jobs)

    async def second(batcher: MicroBatcher[int, int]) -> int:
        if not second_on_its_way:
            await asyncio.sleep(0.05)
            return await batcher.submit(2)
        with on_the_way.one() as arrived:
            await asyncio.sleep(0.05)  # e.g. encoding its query
            arrived()
            return await batcher.submit(2)

    async def scenario() -> list[int]:
        batcher = MicroBatcher(
            record, max_batch_size=8, max_wait_s=5.0, expected=lambda: on_the_way.count
        )
        await batcher.start()
        try:
            task = asyncio.create_task(second(batcher))
            await asyncio.sleep(0)  # the second caller is on its way before the first submits
            return list(await asyncio.wait_for(asyncio.gather(batcher.submit(1), task), 4.0))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == [1, 2]
    return calls


def test_a_lone_job_does_not_wait_for_company() -> None:
    on_the_way = OnTheWay()
    assert _calls_of_two_jobs_50ms_apart(on_the_way, second_on_its_way=False) == [[1], [2]]
    assert on_the_way.count == 0


def test_a_job_waits_for_one_on_its_way_and_no_longer() -> None:
    """Both in one call, and the call starts once nobody else is coming (well before 5 s:
    `wait_for` gives the scenario 4 s)."""
    on_the_way = OnTheWay()
    assert _calls_of_two_jobs_50ms_apart(on_the_way, second_on_its_way=True) == [[1, 2]]
    assert on_the_way.count == 0


def test_on_the_way_counts_until_arrival_or_exit() -> None:
    on_the_way = OnTheWay()
    with pytest.raises(RuntimeError), on_the_way.one() as arrived:
        assert on_the_way.count == 1
        arrived()
        arrived()  # once only
        assert on_the_way.count == 0
        raise RuntimeError("failed after arriving")
    assert on_the_way.count == 0
    with pytest.raises(RuntimeError), on_the_way.one():
        raise RuntimeError("failed on the way")
    assert on_the_way.count == 0
