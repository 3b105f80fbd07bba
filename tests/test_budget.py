"""MemoryBudget: searches in flight share a byte budget, first come first served."""

from __future__ import annotations

import asyncio

import pytest

from service.runtime.budget import BudgetWaitTimeout, MemoryBudget


async def _hold(budget: MemoryBudget, nbytes: int, log: list[str], name: str, until: asyncio.Event):
    async with budget.reserve(nbytes) as held:
        log.append(f"{name}:{held}")
        await until.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_reservations_wait_in_line_and_are_given_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        log: list[str] = []
        go = {name: asyncio.Event() for name in "abc"}
        a = asyncio.create_task(_hold(budget, 8, log, "a", go["a"]))
        await _settle()
        b = asyncio.create_task(_hold(budget, 5, log, "b", go["b"]))
        c = asyncio.create_task(_hold(budget, 1, log, "c", go["c"]))  # fits, but b came first
        await _settle()
        assert (log, budget.held, budget.waiting) == (["a:8"], 8, 2)
        go["a"].set()
        await _settle()
        assert (log, budget.held, budget.waiting) == (["a:8", "b:5", "c:1"], 6, 0)
        go["b"].set(), go["c"].set()
        await asyncio.gather(a, b, c)
        assert (budget.held, budget.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_reservation_larger_than_the_budget_runs_alone() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        log: list[str] = []
        go = asyncio.Event()
        small = asyncio.create_task(_hold(budget, 3, log, "small", go))
        await _settle()
        huge = asyncio.create_task(_hold(budget, 1_000, log, "huge", go))
        await _settle()
        assert log == ["small:3"]  # the huge one waits for the budget to empty
        go.set()
        await asyncio.gather(small, huge)
        assert log == ["small:3", "huge:10"] and budget.held == 0

    asyncio.run(scenario())


def test_a_waiter_that_times_out_holds_nothing_and_lets_the_next_in() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        log: list[str] = []
        first_done, never = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_hold(budget, 6, log, "first", first_done))
        await _settle()
        with pytest.raises(TimeoutError):  # the request timeout gives up on the head waiter
            async with asyncio.timeout(0.05):
                await _hold(budget, 9, log, "timed-out", never)
        assert (budget.held, budget.waiting) == (6, 0)
        behind = asyncio.create_task(_hold(budget, 4, log, "behind", first_done))
        await _settle()
        assert log == ["first:6", "behind:4"]  # it fits now that the head has left
        first_done.set()
        await asyncio.gather(first, behind)
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_waiter_cancelled_after_its_grant_gives_it_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        log: list[str] = []
        async with budget.reserve(10):
            waiter = asyncio.create_task(_hold(budget, 10, log, "waiter", asyncio.Event()))
            await _settle()
            assert budget.waiting == 1
        assert budget.held == 10  # the release granted the waiter its bytes ...
        waiter.cancel()  # ... and it is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (budget.held, budget.waiting, log) == (0, 0, [])

    asyncio.run(scenario())


def test_a_zero_budget_is_unbounded() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(0)
        async with budget.reserve(10**12) as held, budget.reserve(5) as also:
            assert (held, also, budget.held, budget.waiting) == (10**12, 5, 10**12 + 5, 0)
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_wait_past_its_timeout_leaves_the_line_holding_nothing() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10)
        log: list[str] = []
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(budget, 8, log, "a", release))
        await _settle()
        with pytest.raises(BudgetWaitTimeout):
            async with budget.reserve(5, timeout_s=0.05):
                pytest.fail("the reservation must not be granted")
        assert (budget.held, budget.waiting) == (8, 0)
        # One that fits is not delayed by the timeout; one granted in time runs normally.
        async with budget.reserve(2, timeout_s=0.05) as held:
            assert held == 2 and budget.held == 10
        waiter = asyncio.create_task(_hold(budget, 5, log, "b", release))
        await _settle()
        release.set()
        await asyncio.gather(holder, waiter)
        assert log == ["a:8", "b:5"] and (budget.held, budget.waiting) == (0, 0)

    asyncio.run(scenario())
