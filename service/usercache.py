"""Encoded user-side rows, cached per loaded model.

Every scoring request reads the user's profile and newest L behaviours from Redis (the
source of truth, every time) and turns them into graph rows: 50 JSON behaviours parsed,
each sequence field ID-mapped, the profile mapped and converted. A user scored again
soon (the next page of a feed, a refresh) usually has the same stored data, so the rows
are kept per user together with the raw inputs they came from: the profile as read, the
behaviours' raw bytes and the request's context. A later request reuses them only when
all three are equal to what it has just read, so an appended behaviour, a changed
profile or other context encodes afresh. The rows depend on the model's ID mapping, so
the cache belongs to one :class:`~service.model.LoadedModel` (a reload starts empty);
it is only touched from the event loop thread. Oldest entries go first when full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class UserRows:
    """One user's graph rows (``user_sparse [1, Fu]``, ``user_dense [1, Du]``,
    ``hist [1, S, L]``, ``hist_len [1]``), the raw IDs of the history positions fed to
    the graph, whether the store knew the user, and the raw inputs they came from."""

    profile: dict[str, str]
    raw_events: list[bytes]
    context: dict[str, Any]
    user_sparse: np.ndarray
    user_dense: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    history_items: list[Any]
    found: bool


class UserRowCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data: dict[str, UserRows] = {}

    def __len__(self) -> int:
        return len(self.data)

    def get(
        self, user_id: str, profile: dict[str, str], raw_events: list[bytes], context: dict
    ) -> UserRows | None:
        """The rows kept for ``user_id`` if they came from exactly these inputs."""
        rows = self.data.get(user_id)
        if (
            rows is not None
            and rows.raw_events == raw_events
            and rows.profile == profile
            and rows.context == context
        ):
            return rows
        return None

    def put(self, user_id: str, rows: UserRows) -> None:
        if self.size <= 0:
            return
        self.data.pop(user_id, None)  # re-inserted last: the newest entry
        while len(self.data) >= self.size:
            del self.data[next(iter(self.data))]
        self.data[user_id] = rows
