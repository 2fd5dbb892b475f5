"""Encoded candidate rows, cached per loaded model.

Scoring N candidates spends most of its Python time turning item IDs into graph rows:
per item feature a cache lookup, then ID mapping and float conversion. For candidates
whose request carries no features, the encoded rows depend only on the item ID, the
store and the model's ID mapping, so this cache keeps them ready:

* ``sparse [size, Fi]`` int64 and ``dense [size, Di]`` float32 hold one row per slot;
* ``slot_of`` maps an item ID to its slot, ``expiry [size]`` bounds staleness the same
  way as the raw item-feature cache (``CTR_ITEM_CACHE_TTL_S``);
* slots form a ring: when full, the oldest slot is reused;
* with tracking, a write Redis reports to any ``ctr:item:*`` hash ends every row at once
  (:meth:`ItemRowCache.follow`, :meth:`~service.itemcache.ItemCache.changed`).

A lookup of N candidates is one dict probe per ID plus two fancy-indexing gathers. The
cache belongs to one :class:`~service.model.LoadedModel` (rows depend on its mapping), so
a reload starts empty. It is only touched from the event loop thread.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import compress, repeat

import numpy as np


class ItemRowCache:
    def __init__(self, ttl_s: float, size: int, n_sparse: int, n_dense: int) -> None:
        self.ttl = ttl_s
        self.size = size
        self.sparse = np.zeros((size, n_sparse), np.int64)  # zero pages: allocated lazily
        self.dense = np.zeros((size, n_dense), np.float32)
        self.expiry = np.zeros(size, np.float64)
        self.owner: list[str | None] = [None] * size
        self.slot_of: dict[str, int] = {}
        self.next = 0
        # the item cache's generation these rows were encoded under (:meth:`follow`)
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self.slot_of)

    def clear(self) -> None:
        """Forget every row (the slots' memory stays allocated)."""
        self.slot_of.clear()
        self.owner = [None] * self.size
        self.next = 0

    def follow(self, generation: int) -> None:
        """Forget every row when the item cache's ``generation`` has moved since the
        last call: Redis reported an item hash written (rows depend on every item
        feature, so one changed hash ends them all)."""
        if generation != self.generation:
            self.generation = generation
            if self.slot_of:
                self.clear()

    def lookup(self, ids: list[str]) -> np.ndarray:
        """Slots for ``ids``: int64 ``[N]``, ``-1`` where absent or expired."""
        if not self.enabled or not self.slot_of:
            return np.full(len(ids), -1, np.int64)
        slots = np.fromiter(map(self.slot_of.get, ids, repeat(-1)), np.int64, len(ids))
        now = time.monotonic()
        if slots.size and slots.min() >= 0 and self.expiry.take(slots).min() > now:
            return slots  # the steady state: every row cached and fresh
        hit = np.flatnonzero(slots >= 0)
        if hit.size:
            stale = hit[self.expiry[slots[hit]] <= now]
            slots[stale] = -1
        return slots

    def store(
        self,
        ids: list[str],
        sparse: np.ndarray,
        dense: np.ndarray,
        expires: np.ndarray | None = None,
    ) -> None:
        """Keep the rows ``sparse [K, Fi]`` / ``dense [K, Di]`` for ``ids`` (K IDs) until
        the TTL ends, or each until ``expires [K]`` (``time.monotonic()``) if sooner: the
        item-cache values a row was encoded from expire then, and it must not outlive
        them (so no row is older than the TTL). A row never replaces a cached row of
        the same ID that expires later: that one was encoded from a later read (two
        requests' reads of the same item may finish in either order)."""
        if not self.enabled or not ids:
            return
        ids = ids[-self.size :]  # more rows than slots: the last ones win
        sparse, dense = sparse[-len(ids) :], dense[-len(ids) :]
        until = np.full(len(ids), time.monotonic() + self.ttl)
        if expires is not None:
            until = np.minimum(until, expires[-len(ids) :])
        slot_of = self.slot_of
        some_cached = bool(slot_of) and list(map(slot_of.get, ids)).count(None) < len(ids)
        if some_cached or len(set(ids)) < len(ids):  # or an ID twice: one slot for it
            slots, write = self._slots_one_by_one(ids, until)
        else:
            slots, write = self._new_slots(ids), None
        if write is not None and not write.all():
            slots, sparse, dense, until = slots[write], sparse[write], dense[write], until[write]
        self.sparse[slots] = sparse
        self.dense[slots] = dense
        self.expiry[slots] = until

    def _new_slots(self, ids: list[str]) -> np.ndarray:
        """The next ``len(ids)`` ring slots (at most ``size``) for IDs none of which has
        a slot, in a few C-level passes: the slots' previous owners lose theirs."""
        m, start = len(ids), self.next
        ring = (start + np.arange(m)) % self.size
        owner, slot_of = self.owner, self.slot_of
        olds = owner[start : start + m] + owner[: max(0, start + m - self.size)]
        # an old owner keeps its entry where it has moved to another slot since
        now_at = np.array(list(map(slot_of.get, olds, repeat(-1))), np.int64)
        deque(map(slot_of.__delitem__, compress(olds, (now_at == ring).tolist())), maxlen=0)
        head = min(m, self.size - start)
        owner[start : start + head] = ids[:head]
        owner[: m - head] = ids[head:]
        slot_of.update(zip(ids, ring.tolist(), strict=True))
        self.next = (start + m) % self.size
        return ring

    def _slots_one_by_one(self, ids: list[str], until: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots for ``ids``, some of which are cached: a cached row is rewritten only
        where ``until`` is no earlier than its expiry (``write``). A new ID never takes
        the slot of an ID of this batch (that one would lose its row, then be stored as
        new, past the expiry check), and an ID given twice is written once, its last
        row: no slot is written twice in one store."""
        slots = np.zeros(len(ids), np.int64)
        write = np.ones(len(ids), bool)
        last = {item: k for k, item in enumerate(ids)}
        slot_of, owner = self.slot_of, self.owner
        held = {slot for item in last if (slot := slot_of.get(item)) is not None}
        for k, item in enumerate(ids):
            if last[item] != k:
                write[k] = False
                continue
            slot = slot_of.get(item)
            if slot is not None:
                write[k] = self.expiry[slot] <= until[k]
            else:
                # at most len(ids) <= size slots are held, one of them by no ID yet
                slot = self.next
                while slot in held:
                    slot = (slot + 1) % self.size
                self.next = (slot + 1) % self.size
                old = owner[slot]
                if old is not None and slot_of.get(old) == slot:
                    del slot_of[old]
                owner[slot] = item
                slot_of[item] = slot
                held.add(slot)
            slots[k] = slot
        return slots, write
