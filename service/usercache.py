"""Encoded user-side rows, cached per loaded model.

A scoring request reads the user's profile and newest L behaviours from Redis (the
source of truth) and turns them into graph rows: 50 JSON behaviours parsed,
each sequence field ID-mapped, the profile mapped and converted. A user scored again
soon (the next page of a feed, a refresh) usually has the same stored data, so the rows
are kept per user together with what they came from: the profile as read, a 128-bit
BLAKE2b digest of the behaviours' raw bytes (each entry length-prefixed) and the
request's context. A later request reuses them only when all three match what it has
just read, so an appended behaviour, a changed profile or other context encodes afresh.
Per user it holds the arrays, the profile, the context and the digest, not the
behaviours. The rows depend on the model's ID mapping, so the cache belongs to one
:class:`~service.model.LoadedModel` (a reload starts empty); it is only touched from the
event loop thread. When full, the user used least recently goes first: a hit (rows
reused after a read, or trusted without one) makes the user the newest entry.

With tracking on (:mod:`service.tracking`, ``CTR_USER_TRACKING``), the cache also notes
the stamp of the read the rows last matched, and :meth:`UserRowCache.trusted` hands
them out without any read while Redis has sent no invalidation for the user since.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.tracking import UserTracker


def digest(raw_events: list[bytes]) -> bytes:
    """The behaviours' raw bytes, each entry with its length first (so entries cannot
    run into one another), as a 128-bit BLAKE2b digest."""
    h = blake2b(digest_size=16)
    h.update(repr(list(map(len, raw_events))).encode())
    try:
        h.update(b"".join(raw_events))  # the store's bytes: one update, not one per entry
    except TypeError:  # str entries
        for r in raw_events:
            h.update(r if isinstance(r, bytes) else r.encode("utf-8", "surrogateescape"))
    return h.digest()


@dataclass(frozen=True)
class UserRows:
    """One user's graph rows (``user_sparse [1, Fu]``, ``user_dense [1, Du]``,
    ``hist [1, S, L]``, ``hist_len [1]``), whether the store knew the user, and what
    they came from (``events``: :func:`digest` of the raw behaviours)."""

    profile: dict[str, str]
    events: bytes
    context: dict[str, Any]
    user_sparse: np.ndarray
    user_dense: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    found: bool


class UserRowCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data: dict[str, UserRows] = {}
        # user -> the tracking stamp of the read their rows last matched (see
        # service.tracking) and the monotonic time the first of the user's keys expires;
        # absent: the rows are reused only after a read that matches
        self.stamps: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.data)

    def get(
        self, user_id: str, profile: dict[str, str], events: bytes, context: dict
    ) -> UserRows | None:
        """The rows kept for ``user_id`` if they came from exactly these inputs
        (``events``: :func:`digest` of the raw behaviours just read)."""
        rows = self.data.get(user_id)
        if (
            rows is not None
            and rows.events == events
            and rows.profile == profile
            and rows.context == context
        ):
            self._touch(user_id, rows)
            return rows
        return None

    def _touch(self, user_id: str, rows: UserRows) -> None:
        """Make ``user_id`` the newest entry (dicts keep insertion order): the cache
        evicts the user used least recently, not the one read first."""
        del self.data[user_id]
        self.data[user_id] = rows

    def rows_for(
        self,
        user_id: str,
        profile: dict[str, str],
        raw_events: list[bytes],
        context: dict,
        encode: Callable[[bytes], UserRows],
    ) -> UserRows:
        """The kept rows when they came from exactly these inputs, else ``encode(digest)``
        (kept for next time). Off (size 0): ``encode`` every time, nothing hashed."""
        if self.size <= 0:
            return encode(b"")
        events = digest(raw_events)
        rows = self.get(user_id, profile, events, context)
        if rows is None:
            rows = encode(events)
            self.put(user_id, rows)
        return rows

    def put(self, user_id: str, rows: UserRows) -> None:
        if self.size <= 0:
            return
        self.data.pop(user_id, None)  # re-inserted last: the newest entry
        self.stamps.pop(user_id, None)  # a stamp is for the rows it was noted with
        while len(self.data) >= self.size:
            oldest = next(iter(self.data))
            del self.data[oldest]
            self.stamps.pop(oldest, None)
        self.data[user_id] = rows

    def note_read(self, user_id: str, stamp: int | None, until: float = math.inf) -> None:
        """The rows kept for ``user_id`` match a read sent under tracking ``stamp``
        (:meth:`service.tracking.UserTracker.stamp`; None: tracking was down), of keys
        the first of which expires at ``until`` (``time.monotonic()``)."""
        if stamp is None or user_id not in self.data:
            self.stamps.pop(user_id, None)
        else:
            self.stamps[user_id] = (stamp, until)

    def trusted(self, user_id: str, context: dict, tracker: UserTracker) -> UserRows | None:
        """The rows kept for ``user_id`` with this ``context`` if no invalidation has
        reached ``tracker`` since the read they match: what Redis holds now, without
        reading it (call ``tracker.poll()`` first)."""
        rows = self.data.get(user_id)
        noted = self.stamps.get(user_id)
        if rows is None or noted is None or rows.context != context:
            return None
        stamp, until = noted
        if time.monotonic() >= until:  # a key has expired: read (Redis may not say yet)
            return None
        if not tracker.valid(user_id, stamp):
            return None
        self._touch(user_id, rows)
        return rows
