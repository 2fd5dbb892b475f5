"""Giving the C heap's free pages back to the system after a model swap.

A reload frees the replaced model's graph sessions and arrays, but glibc's allocator
keeps most of what they held (the top of each arena is trimmed, its middle is not): a
worker's resident memory grew with each reload of the same bundle (25 MB over 200,
31 MB over 400 here; ``scripts/reload_rss.py``), where ``malloc_trim`` after each keeps
it about flat. It takes 2-11 ms on a ~700 MB worker, on a thread of the default
executor (ctypes releases the GIL), a few seconds after the swap, so that the replaced
model's last requests and its native release have ended. Other C libraries: nothing."""

from __future__ import annotations

import asyncio
import ctypes
import platform
from collections.abc import Callable

TRIM_DELAY_S = 2.0  # after a swap: the replaced model's requests and release end first
TRIM_MAX_WAIT_S = 30.0  # reloads closer together than the delay put a trim off at most this


def _malloc_trim() -> Callable[[int], int] | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


MALLOC_TRIM = _malloc_trim()


async def trim_later(delay_s: float | None = None) -> bool:
    """After ``delay_s`` (None: :data:`TRIM_DELAY_S`), return the heap's free pages to
    the system (glibc); True where it did."""
    if MALLOC_TRIM is None:
        return False
    await asyncio.sleep(TRIM_DELAY_S if delay_s is None else delay_s)
    try:
        await asyncio.get_running_loop().run_in_executor(None, MALLOC_TRIM, 0)
    except RuntimeError:  # the executor shut down meanwhile (the process is ending)
        return False
    return True
