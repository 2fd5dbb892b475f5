"""Log lines for events that repeat on every request while a fault lasts (Redis down):
one line per period, saying how many were held back, so that an outage does not
write a line per request, synchronously, on the event loop. The metrics count every
event (``ctr_errors_total``)."""

from __future__ import annotations

import time
from collections.abc import Callable

PERIOD_S = 10.0  # the least time between two lines of one kind


class Throttle:
    """Whether to log an event now: the first at once, then at most one per
    ``period_s``; :meth:`ready` returns how many were held back since the last line
    (None: hold this one back too)."""

    def __init__(self, period_s: float = PERIOD_S, clock: Callable[[], float] = time.monotonic):
        self.period_s = period_s
        self.clock = clock
        self._next = float("-inf")
        self._held = 0

    def ready(self) -> int | None:
        now = self.clock()
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self.period_s
        return held


def held_note(held: int) -> str:
    """The suffix a throttled line carries: how many like it were not logged."""
    return f" ({held} more like it in the last {PERIOD_S:g} s not logged)" if held else ""
