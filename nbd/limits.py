"""Bytes of request and reply payload the NBD server holds: a budget per connection and one
for the whole server (issue 20 item 6).

Invariants:
B1. ``used`` never exceeds ``limit``, except by one request when nothing else is held (a
    single request larger than the budget is let through alone instead of waiting forever).
B2. Every ``take`` is matched by exactly one ``give`` of the same size (the transport gives
    back in ``finally`` blocks), so ``used`` returns to 0 when every connection is gone.
B3. A waiter only waits while other holders exist: each ``give`` wakes every waiter, which
    re-checks; nothing waits on a budget that nobody holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    limit: int
    used: int
    peak: int
    waits: int


class MemoryBudget:
    """A counted amount of memory; ``take`` waits (backpressure) until it fits."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("a memory budget must be positive")
        self.limit = limit
        self.used = 0
        self._peak = 0
        self._waits = 0
        self._freed = trio.Event()

    def fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.used == 0     # B1

    async def take(self, n: int) -> None:
        if n <= 0:
            return
        while not self.fits(n):
            self._waits += 1
            await self._freed.wait()
        self.used += n
        self._peak = max(self._peak, self.used)

    def give(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        assert self.used >= 0, "a memory budget was given back more than was taken"
        self._freed.set()                                        # B3
        self._freed = trio.Event()

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.limit, self.used, self._peak, self._waits)


class Reservation:
    """Memory held against a connection's budget and the server's, taken from both (the
    connection's first, so one greedy connection waits on itself, not on everyone)."""

    def __init__(self, connection: MemoryBudget, server: MemoryBudget) -> None:
        self.connection = connection
        self.server = server

    async def take(self, n: int) -> None:
        await self.connection.take(n)
        try:
            await self.server.take(n)
        except BaseException:
            self.connection.give(n)
            raise

    def give(self, n: int) -> None:
        self.server.give(n)
        self.connection.give(n)
