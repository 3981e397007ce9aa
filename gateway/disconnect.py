"""Stop work for a client that hung up. Starlette does not cancel a handler whose client left
(only a streaming body), so a plain completion would go on generating, and the requests behind
it would wait. Here the handler's work races the connection's `http.disconnect`; the loser is
cancelled, and cancellation reaches the backends (transformers sets its stop flag, the vLLM
proxy closes its upstream request)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # the body was read already; the server only has the disconnect left to tell


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`await work`, or None once the client has gone (and `work` was cancelled and unwound)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return None
    return task.result()  # finished (maybe at the same moment): its result or its exception
