"""Request + Redis data -> graph feeds, through the shared ``ctr.encode`` code path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctr.bundle import Bundle
from ctr.encode import encode_item_rows, encode_user_rows
from ctr.mapping import normalize
from ctr.spec import FeatureConfig
from service.itemcache import ItemCache
from service.metrics import DENSE_OUT_OF_RANGE
from service.rowcache import ItemRowCache
from service.store import UserData
from service.usercache import UserRowCache, UserRows


@dataclass
class Prepared:
    feeds: dict[str, np.ndarray]
    hist_len: int  # history positions fed to the graph (see history_items)
    found: bool  # the store knows the user


@dataclass
class ItemColumns:
    """Raw item-side columns for the N candidates, keyed by feature source.

    ``missing[source]`` lists the candidate positions the request did not fill (absent or
    ``null``); the caller fills them from the item cache and Redis, in place.
    """

    values: dict[str, list[Any]]
    missing: dict[str, list[int]]
    # float64 [N]: per candidate, the earliest expiry of the item-cache values it used
    # (monotonic clock; inf: none used): its encoded row must not be kept longer
    expires: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __post_init__(self) -> None:
        n = len(next(iter(self.values.values()), ()))
        if self.expires.size != n:
            self.expires = np.full(n, math.inf)

    @property
    def ids(self) -> list[Any]:
        return next(iter(self.values.values()))  # the ID column comes first

    def _put(self, source: str, holes: list[int], values: list[Any]) -> None:
        col = self.values[source]
        if len(holes) == len(col):  # every position (holes are distinct, in order)
            col[:] = values
        else:
            for k, v in zip(holes, values, strict=True):
                col[k] = v

    def take_cached(self, cache: ItemCache) -> dict[str, list[str]]:
        """Fill holes from ``cache``; return, per source, the item IDs still missing (the
        positions stay in ``missing``, in the same order, for :meth:`fill`)."""
        ids = self.ids
        lookups: dict[str, list[str]] = {}
        for source, holes in list(self.missing.items()):
            wanted = list(ids) if len(holes) == len(ids) else [ids[k] for k in holes]
            cached, missed, expiries = cache.get_many(source, wanted)
            if len(missed) == len(holes):  # nothing came from the cache
                lookups[source] = wanted
                continue
            self._put(source, holes, cached)
            at = np.asarray(holes, np.int64)
            self.expires[at] = np.minimum(self.expires[at], expiries)
            if missed:
                self.missing[source] = [holes[j] for j in missed]
                lookups[source] = [wanted[j] for j in missed]
            else:
                del self.missing[source]
        return lookups

    def fill(self, fetched: dict[str, list[Any]], expiry: float = math.inf) -> None:
        """Put values fetched for :meth:`take_cached`'s lookups into their holes; rows
        encoded from them expire no later than ``expiry`` (the read's start + the TTL)."""
        for source, values in fetched.items():
            holes = self.missing.get(source, [])
            if len(holes) != len(values):
                raise ValueError(f"{len(values)} values fetched for {len(holes)} holes")
            self._put(source, holes, values)
            at = np.asarray(holes, np.int64)
            self.expires[at] = np.minimum(self.expires[at], expiry)


EVENT_FIELDS = ("type", "ts")


def stamp_event(payload: dict[str, Any], needed: set[str], etype: str, ts: float) -> None:
    """Add the event's ``type`` and timestamp (``ts``: the history's time order) to the
    stored behaviour ``payload``, in place. Only where a sequence reads an item feature of
    that name (``needed``: the sequence targets' sources) does the item's value stay."""
    for key, value in zip(EVENT_FIELDS, (etype, ts), strict=True):
        if key not in needed or key not in payload:
            payload[key] = value


def count_outside(bundle: Bundle, side: str, dense: np.ndarray) -> None:
    """Count the encoded ``dense [B, D]`` values of ``side`` (``"user"`` / ``"item"``)
    that the graph will clamp (``ctr_dense_out_of_range_total``)."""
    bounds = bundle.dense_bounds.get(side)
    if bounds is not None and dense.size:
        for name, k in bounds.outside(dense).items():
            DENSE_OUT_OF_RANGE.labels(name).inc(k)


def item_columns(
    config: FeatureConfig, item_ids: list[str], given: list[dict[str, Any] | None]
) -> ItemColumns:
    id_source = config.item_id_feature.source
    values: dict[str, list[Any]] = {id_source: list(item_ids)}
    missing: dict[str, list[int]] = {}
    n = len(item_ids)
    plain = not any(given)  # no candidate brought features: every value is a hole
    for f in config.item_sparse + config.item_dense:
        if f.source == id_source:
            continue
        if plain:
            values[f.source] = [None] * n
            if n:
                missing[f.source] = list(range(n))
            continue
        col = [feats.get(f.source) if feats else None for feats in given]
        values[f.source] = col
        holes = [k for k, v in enumerate(col) if v is None]
        if holes:
            missing[f.source] = holes
    return ItemColumns(values, missing)


@dataclass
class Candidates:
    """Graph rows for N candidates being assembled.

    ``sparse [N, Fi]`` / ``dense [N, Di]`` already hold the rows found in the row cache;
    ``pending`` lists the other positions, whose raw columns are in ``items`` (in the
    same order) and get encoded by :meth:`finish`. ``plain[k]`` says whether pending
    position k's row depends only on the item ID (the request gave no features), i.e.
    whether it may be cached.
    """

    sparse: np.ndarray
    dense: np.ndarray
    pending: np.ndarray
    items: ItemColumns
    plain: list[bool]

    def finish(self, bundle: Bundle, rows: ItemRowCache, cacheable: bool) -> None:
        """Encode the pending rows in place; keep the plain ones in ``rows`` when
        ``cacheable`` (every store read succeeded)."""
        if not self.pending.size:
            return
        c = bundle.config
        its, itd = encode_item_rows(c, bundle.mapper, self.items.values, self.pending.size)
        count_outside(bundle, "item", itd)
        self.sparse[self.pending] = its
        self.dense[self.pending] = itd
        if cacheable and rows.enabled:
            keep = [k for k, p in enumerate(self.plain) if p]
            ids = self.items.ids
            until = self.items.expires[keep]
            rows.store([ids[k] for k in keep], its[keep], itd[keep], until)


def candidates(
    config: FeatureConfig,
    rows: ItemRowCache,
    item_ids: list[str],
    given: list[dict[str, Any] | None],
) -> Candidates:
    """Rows from the row cache for plain candidates; raw columns for the rest."""
    n = len(item_ids)
    slots = rows.lookup(item_ids)
    if any(given):  # candidates with request features never come from the cache
        slots[[k for k, g in enumerate(given) if g]] = -1
    elif n and slots.min() >= 0:  # every row cached: two gathers
        empty = ItemColumns({config.item_id_feature.source: []}, {})
        return Candidates(rows.sparse.take(slots, 0), rows.dense.take(slots, 0),
                          slots[:0], empty, [])  # fmt: skip
    hit = np.flatnonzero(slots >= 0)
    pending = np.flatnonzero(slots < 0)
    sparse = np.empty((n, len(config.item_sparse)), np.int64)
    dense = np.empty((n, len(config.item_dense)), np.float32)
    if hit.size:
        sparse[hit] = rows.sparse[slots[hit]]
        dense[hit] = rows.dense[slots[hit]]
    todo = pending.tolist()
    ids = [item_ids[k] for k in todo]
    feats = [given[k] for k in todo]
    return Candidates(sparse, dense, pending, item_columns(config, ids, feats),
                      [not f for f in feats])  # fmt: skip


def encode_user(
    bundle: Bundle, user_id: str, context: dict[str, Any], data: UserData, events: bytes
) -> UserRows:
    """One user's graph rows from what the store returned and the request's context,
    through ``ctr.encode`` (the training code path); ``events`` is the digest of the raw
    behaviours. The arrays are read-only: they may be kept and fed to later requests."""
    c = bundle.config
    user_cols: dict[str, list[Any]] = {k: [v] for k, v in data.profile.items()}
    for k, v in context.items():
        user_cols[k] = [v]
    for f in c.user_sparse:  # the request's user_id wins over a stored copy of the key
        # (only the key's feature: with `data.user_key: acct`, a feature `user_id` read
        # from its own column is a profile value, stored by `ctr load`; the request's
        # ID, an acct, mapped it out of vocabulary)
        if f.source == c.data.user_key:
            user_cols[f.source] = [user_id]
    recent = data.events[-c.max_seq_len :]
    seqs = {
        s.source: [[ev.get(t.source) for ev in recent]]
        for s, t in zip(c.sequences, c.sequence_targets, strict=True)
    }
    us, ud, hist, lens = encode_user_rows(c, bundle.mapper, user_cols, seqs, 1)
    count_outside(bundle, "user", ud)
    for a in (us, ud, hist, lens):
        a.flags.writeable = False
    return UserRows(data.profile, events, context, us, ud, hist, lens, data.found)


def history_items(config: FeatureConfig, data: UserData, hist_len: int) -> list[str | None]:
    """IDs of the ``hist_len`` history positions fed to the graph (for ``explain``), in
    the canonical form a request's IDs take (``ctr.mapping.normalize``: a stored ``12345``
    or ``12345.0`` is ``"12345"``, as the model read it; they came back as the stored
    JSON number); None where a stored behaviour has none."""
    if not hist_len:
        return []
    source = config.item_id_feature.source
    events = data.events[-config.max_seq_len :][-hist_len:]
    return [normalize(ev.get(source)) for ev in events]


def build_feeds(
    bundle: Bundle,
    user_id: str,
    context: dict[str, Any],
    data: UserData,
    item_sparse: np.ndarray,
    item_dense: np.ndarray,
    users: UserRowCache,
) -> Prepared:
    """Feeds for one user (U=1) and N candidates (``item_sparse [N, Fi]``,
    ``item_dense [N, Di]``); ``user_idx`` is all zeros. The user's rows come from
    ``users`` when they were encoded from the same profile, behaviours and context."""
    rows = users.rows_for(
        user_id,
        data.profile,
        data.raw_events,
        context,
        lambda events: encode_user(bundle, user_id, context, data, events),
    )
    return rows_feeds(bundle, rows, item_sparse, item_dense)


def rows_feeds(
    bundle: Bundle, rows: UserRows, item_sparse: np.ndarray, item_dense: np.ndarray
) -> Prepared:
    """Feeds for one user's encoded ``rows`` (U=1) and N candidates (``item_sparse
    [N, Fi]``, ``item_dense [N, Di]``); ``user_idx [N]`` is all zeros."""
    feeds = {
        "user_sparse": rows.user_sparse,
        "user_dense": rows.user_dense,
        "hist": rows.hist,
        "hist_len": rows.hist_len,
        "item_sparse": item_sparse,
        "item_dense": item_dense,
        "user_idx": np.zeros(item_sparse.shape[0], dtype=np.int64),
    }
    return Prepared({k: feeds[k] for k in bundle.input_names}, int(rows.hist_len[0]), rows.found)
