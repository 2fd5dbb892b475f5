"""Log lines for events that repeat on every request while a fault lasts (Redis down):
one line per period, saying how many were held back since the line before, so that an
outage does not write a line per request, synchronously, on the event loop. The
metrics count every event (``ctr_errors_total``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

PERIOD_S = 10.0  # the least time between two lines of one kind, within a burst


@dataclass(frozen=True)
class Due:
    """A line to write: ``held`` events like it were not logged in the ``since_s``
    seconds since the line before (0 and inf for the first line of all)."""

    held: int
    since_s: float


class Throttle:
    """Whether to log an event now: the first of a burst at once (the first of all, or
    one after a quiet ``period_s`` without any), then at most one per ``period_s``;
    :meth:`ready` returns a :class:`Due` (None: hold this one back)."""

    def __init__(
        self, period_s: float = PERIOD_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.period_s = period_s
        self.clock = clock
        self._last_line = float("-inf")
        self._last_event = float("-inf")
        self._held = 0

    def ready(self) -> Due | None:
        now = self.clock()
        quiet = now - self._last_event > self.period_s  # a new burst begins
        self._last_event = now
        if now < self._last_line + self.period_s and not quiet:
            self._held += 1
            return None
        due = Due(self._held, now - self._last_line)
        self._held, self._last_line = 0, now
        return due


def held_note(due: Due) -> str:
    """The suffix a throttled line carries: how many like it were not logged since the
    line before, and how long ago that was."""
    if not due.held:
        return ""
    return f" ({due.held} more like it not logged in the {due.since_s:.0f} s since the last line)"
