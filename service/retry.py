"""One backoff loop for the service's background retries (a reload broadcast Redis
refused, a broadcast version that did not load here yet, the newest version after a
start-up fallback)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def retry_under_lock(
    lock: asyncio.Lock,
    attempt: Callable[[], Awaitable[bool]],
    done: Callable[[], bool],
    first_s: float,
    max_s: float,
) -> None:
    """Call ``attempt`` under ``lock`` after ``first_s``, then after twice as long each
    time (up to ``max_s``), until it returns True or ``done()`` does (checked before each
    wait ends and again under the lock, where another load may have settled it)."""
    delay = first_s
    while not done():
        await asyncio.sleep(delay)
        async with lock:
            if done() or await attempt():
                return
        delay = min(delay * 2, max_s)
