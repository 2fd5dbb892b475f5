"""SIGHUP before the app's lifespan takes it over: noted, not fatal.

``ctr serve`` installs :func:`install` first thing, before the imports and the model
load that precede the lifespan's own handler (which replaces this one and reads
:data:`pending`: a SIGHUP noted here becomes a reload once the first load is done).
Without it the signal's default action would end the process."""

from __future__ import annotations

import signal
from types import FrameType

pending = False


def _note(signum: int, frame: FrameType | None) -> None:
    global pending
    pending = True


def install() -> None:
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _note)
