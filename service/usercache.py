"""Encoded user-side rows, cached per loaded model.

Every scoring request reads the user's profile and newest L behaviours from Redis (the
source of truth, every time) and turns them into graph rows: 50 JSON behaviours parsed,
each sequence field ID-mapped, the profile mapped and converted. A user scored again
soon (the next page of a feed, a refresh) usually has the same stored data, so the rows
are kept per user together with what they came from: the profile as read, a 128-bit
BLAKE2b digest of the behaviours' raw bytes (each entry length-prefixed) and the
request's context. A later request reuses them only when all three match what it has
just read, so an appended behaviour, a changed profile or other context encodes afresh.
Per user it holds the arrays, the profile, the context and the digest, not the
behaviours. The rows depend on the model's ID mapping, so the cache belongs to one
:class:`~service.model.LoadedModel` (a reload starts empty); it is only touched from the
event loop thread. Oldest entries go first when full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import numpy as np


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
            return rows
        return None

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
        while len(self.data) >= self.size:
            del self.data[next(iter(self.data))]
        self.data[user_id] = rows
