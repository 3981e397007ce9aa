"""Admission: a replica runs at most `concurrent` requests and lets at most `queue` more wait
(first come, first served). Past that it answers 429 with Retry-After at once, so a burst costs
a few bytes per refused request instead of an ever longer line and ever more memory.

Everything runs on the event loop, so the counters need no lock."""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from gateway.errors import GatewayError


class Admission:
    def __init__(self, concurrent: int, queue: int) -> None:
        self.concurrent, self.queue_limit = concurrent, queue
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.avg_hold_s = 1.0  # moving average of how long a request keeps its turn
        self.rejected = 0

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def retry_after_s(self) -> int:
        """About when a turn frees up: the line ahead times the average hold, over the slots."""
        ahead = self.waiting + 1
        return max(1, min(60, math.ceil(self.avg_hold_s * ahead / self.concurrent)))

    def try_acquire(self) -> float | None:
        """A turn now if one is free and no one waits before us (else None). Callers take this
        first: with no waiting there is no hang-up to watch for, which saves two tasks."""
        if self.running < self.concurrent and not self.waiters:
            self.running += 1
            return time.monotonic()
        return None

    async def acquire(self) -> float:
        """Wait for a turn (cancellable); 429 when the line is full. Returns the start time to
        hand back to release()."""
        started = self.try_acquire()
        if started is not None:
            return started
        if self.waiting >= self.queue_limit:
            self.rejected += 1
            wait = self.retry_after_s()
            raise GatewayError(429, f"This replica is at capacity ({self.running} running, {self.waiting} waiting); "
                                    f"retry in {wait} s.", type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
        turn = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:  # the client left while waiting
            if turn.done() and not turn.cancelled():
                self.release(time.monotonic())  # the turn was already ours: pass it on
            elif turn in self.waiters:  # release() may have dropped our cancelled turn already
                self.waiters.remove(turn)
            raise
        return time.monotonic()

    def release(self, started: float) -> None:
        """Give the turn to the next waiter (the running count stays), or free it."""
        held = time.monotonic() - started
        self.avg_hold_s = 0.8 * self.avg_hold_s + 0.2 * held
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1
