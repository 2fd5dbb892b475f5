"""The in-process item-feature cache: raw values read from the ``ctr:item:<feature>``
hashes, per feature, with a TTL (``CTR_ITEM_CACHE_TTL_S``), emptied early where Redis
reports a hash written (``CTR_ITEM_TRACKING``, :meth:`ItemCache.reported`). Event loop
thread only."""

from __future__ import annotations

import asyncio
import itertools
import math
import operator
import time

EVICT_DIVISOR = 32  # a full item cache drops this fraction of its size at a time


class ItemCache:
    """feature -> item_id -> (value or None, expiry). Negative results are cached too.

    One dict per feature, so a batch of N IDs is looked up and stored with ``map`` and
    ``update`` (no per-item key tuples), with per-item Python work only where a batch
    mixes hits and misses or would replace entries."""

    def __init__(self, ttl_s: float, size: int, hold_s: float = 0.0) -> None:
        self.ttl = ttl_s
        self.size = size
        self.data: dict[str, dict[str, tuple[str | None, float]]] = {}
        # taken by each read before it is sent: a read whose values may predate a change
        # Redis has reported since (:meth:`changed`) stores nothing (:meth:`put`)
        self.generation = 0
        # reports applied at most once per hold_s (:meth:`reported`)
        self.hold_s = hold_s
        self._applied_at = -math.inf  # time.monotonic() of the last report applied
        self._pending: set[str] = set()  # features reported within the hold, not applied
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(d) for d in self.data.values())

    def clear(self) -> None:
        self.data.clear()

    def reported(self, feature: str | None) -> None:
        """Redis reported ``feature``'s hash written (None: any may have changed, e.g. a
        flush, a (re)connection, a catch-up: applied at once, with whatever was held,
        and starting no hold, since it is no write: the first write after the tracker
        connects is applied at once). The first report after a quiet :attr:`hold_s` is
        applied at once (:meth:`changed`); those that follow within it wait for its end
        and are applied together there, so a writer that changes item features many
        times a second empties the caches about once per ``hold_s``, not at every write
        (at 10 writes a second, 1.32x the CPU per request of no item tracking without
        it: docs/benchmarks.md, "Session 48"), and a served value is at most ``hold_s``
        older than Redis's meanwhile (after its report has arrived)."""
        if feature is None:
            self.close()
            self.changed(None)
            return
        now = time.monotonic()
        if now - self._applied_at >= self.hold_s and not self._pending:
            self._applied_at = now
            self.changed(feature)
            return
        self._pending.add(feature)
        if self._timer is None:
            wait = max(0.0, self._applied_at + self.hold_s - now)
            self._timer = asyncio.get_running_loop().call_later(wait, self._apply_held)

    def _apply_held(self) -> None:
        """The hold's end: every feature reported within it applied at once."""
        self._timer = None
        held, self._pending = self._pending, set()
        self._applied_at = time.monotonic()
        for feature in held:
            self.changed(feature)

    def close(self) -> None:
        """Drop the held reports and their timer (the worker stops; or a report of None,
        which applies them all): none is left held without a timer to apply it, which
        would hold the next report after a quiet hold too."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = set()

    def changed(self, feature: str | None) -> None:
        """Redis reported a write to ``feature``'s hash (``ctr:item:<feature>``; None: any
        hash may have changed, e.g. a flush, or reports missed while the tracking
        connection was down): its cached values go, and so do the encoded rows of every
        model (:class:`~service.rowcache.ItemRowCache` follows :attr:`generation`); a
        read already in flight stores nothing."""
        self.generation += 1
        if feature is None:
            self.data.clear()
        else:
            self.data.pop(feature, None)

    def get_many(
        self, feature: str, ids: list[str]
    ) -> tuple[list[str | None], list[int], list[float]]:
        """Cached values for ``ids`` (None where missing), the positions that missed, and
        each value's expiry (``time.monotonic()`` clock; ``inf`` where it missed)."""
        n = len(ids)
        d = self.data.get(feature) if self.ttl > 0 else None
        entries = list(map(d.get, ids)) if d else None
        if entries is None or entries.count(None) == n:  # nothing cached
            return [None] * n, list(range(n)), [math.inf] * n
        now = time.monotonic()
        if None not in entries:
            expiries = list(map(_second, entries))
            if min(expiries) > now:  # every one cached and fresh
                return list(map(_first, entries)), [], expiries
        values: list[str | None] = []
        missed: list[int] = []
        expiries = []
        for k, entry in enumerate(entries):
            if entry is not None and entry[1] > now:
                values.append(entry[0])
                expiries.append(entry[1])
            else:
                values.append(None)
                missed.append(k)
                expiries.append(math.inf)
        return values, missed, expiries

    def put(
        self,
        feature: str,
        ids: list[str],
        values: list[str | None],
        read_at: float,
        generation: int | None = None,
    ) -> None:
        """Values read from Redis by a read that started at ``read_at``
        (``time.monotonic()``): they expire a TTL after it, not after this call, and a
        value from an earlier read never replaces one from a later read (two requests'
        reads of the same item may finish in either order). ``generation``: the
        :attr:`generation` taken before the read was sent; nothing is stored when a
        change has been reported since (the values may be from before it)."""
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} values for {len(ids)} item IDs")
        if self.ttl <= 0 or not ids:
            return
        if generation is not None and generation != self.generation:
            return
        d = self.data.setdefault(feature, {})
        total = len(self)
        if total and total + len(ids) > self.size:
            # drop the oldest 1/32 of the size and room for the new values, shared out in
            # proportion to each feature's entries, oldest first (insertion order). Half
            # at a time, as before session 36, held the event loop 18 ms every ~100
            # requests of 500 new items; in slices of 1/32 the puts' p99 is a third, at
            # a slightly higher mean (scripts/bench_item_cache.py)
            keep = max(0, min(total, self.size) - self.size // EVICT_DIVISOR - len(ids))
            for one in self.data.values():
                drop = len(one) - len(one) * keep // total
                for k in list(itertools.islice(one, drop)):
                    del one[k]
        expiry = read_at + self.ttl
        olds = list(map(d.get, ids))
        if olds.count(None) == len(olds):  # all new: one update
            d.update(zip(ids, zip(values, itertools.repeat(expiry)), strict=False))
            return
        for i, v, old in zip(ids, values, olds, strict=True):
            if old is None or old[1] <= expiry:
                d[i] = (v, expiry)


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
