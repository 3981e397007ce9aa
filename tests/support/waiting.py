"""One way for tests to wait for something to happen: poll a predicate until it holds, and fail
with what was last seen. Never a fixed sleep: a slow machine only makes the wait longer."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "the condition",
               interval: float = 0.05) -> T:
    """Return the predicate's first truthy value; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")
        time.sleep(interval)
