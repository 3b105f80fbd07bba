"""A byte budget that searches in flight share: what they may hold of tensors at once.

Every search holds its K candidates' rerank tensors (and, for the misses, their region
features) from the feature step until its reranked answer is built. Those are references to
cache entries or fresh copies; either way the caches' own budgets do not bound them once the
caches evict. Without this budget, memory would grow with concurrency x `candidates` (64 clients
x 1,000 candidates x 0.14 MiB is 9 GB). A search reserves its share before it fetches
anything and waits in line, within the request timeout, while the budget is spent.

It is an asyncio weighted semaphore, first come first served: a large reservation at the head
is never overtaken by small ones behind it, so it cannot starve. A reservation larger than the
whole budget is cut to the budget: it then runs alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BudgetWaitTimeout(TimeoutError):
    """A reservation waited its whole `timeout_s` without the budget having room for it."""


class MemoryBudget:
    """`capacity` bytes shared by reservations; 0 means unbounded (reservations never wait)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def reserve(self, nbytes: int, *, timeout_s: float | None = None) -> AsyncIterator[int]:
        """Hold `nbytes` (cut to the capacity) for the block; yields the bytes held. Waiting
        longer than `timeout_s` for room raises `BudgetWaitTimeout`, holding nothing."""
        amount = max(0, nbytes) if self.capacity == 0 else min(max(0, nbytes), self.capacity)
        try:
            async with asyncio.timeout(timeout_s):
                await self._acquire(amount)
        except TimeoutError:
            raise BudgetWaitTimeout(f"no room for {amount:,} bytes within {timeout_s} s") from None
        try:
            yield amount
        finally:
            self._release(amount)

    async def _acquire(self, amount: int) -> None:
        if not self._waiters and self._fits(amount):
            self.held += amount
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (amount, granted)
        self._waiters.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(amount)  # granted, then cancelled before it could run
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._grant()  # the head may have left: the next ones may fit now
            raise

    def _release(self, amount: int) -> None:
        self.held -= amount
        self._grant()

    def _fits(self, amount: int) -> bool:
        return self.capacity == 0 or self.held + amount <= self.capacity

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            amount, granted = self._waiters.popleft()
            if granted.cancelled():  # its task is being cancelled; it holds nothing
                continue
            self.held += amount
            granted.set_result(None)
