"""Request + Redis data -> graph feeds, through the shared ``ctr.encode`` code path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ctr.bundle import Bundle
from ctr.encode import encode_item_rows, encode_user_rows
from service.store import UserData


@dataclass
class Prepared:
    feeds: dict[str, np.ndarray]
    history_items: list[Any]  # raw IDs of the history positions fed to the graph


def item_lookups(
    bundle: Bundle, item_ids: list[str], given: list[dict[str, Any] | None]
) -> dict[str, list[str]]:
    """Per item-side feature (not the ID itself), the item IDs whose request lacks it."""
    id_source = item_id_source(bundle)
    out: dict[str, list[str]] = {}
    for f in bundle.config.item_sparse + bundle.config.item_dense:
        if f.source == id_source:
            continue
        missing = [
            iid
            for iid, feats in zip(item_ids, given, strict=True)
            if not feats or feats.get(f.source) is None
        ]
        if missing:
            out[f.source] = missing
    return out


def item_id_source(bundle: Bundle) -> str:
    """The item-side sparse feature that history IDs share (the candidate's ID)."""
    c = bundle.config
    for s in c.sequences:
        target = c.feature(s.shared_with or "")
        return target.source
    return c.item_sparse[0].source


def build_feeds(
    bundle: Bundle,
    user_id: str,
    context: dict[str, Any],
    data: UserData,
    item_ids: list[str],
    given: list[dict[str, Any] | None],
) -> Prepared:
    """Feeds for one user (U=1) and N candidates; ``user_idx`` is all zeros."""
    c = bundle.config
    n = len(item_ids)
    user_cols: dict[str, list[Any]] = {k: [v] for k, v in data.profile.items()}
    for k, v in context.items():
        user_cols[k] = [v]
    for f in c.user_sparse:  # the request's user_id wins over a stored copy
        if f.source in ("user_id", c.data.user_key):
            user_cols[f.source] = [user_id]
    events = data.events[-c.max_seq_len :]
    seqs = {
        s.source: [[ev.get(c.feature(s.shared_with or "").source) for ev in events]]
        for s in c.sequences
    }
    us, ud, hist, lens = encode_user_rows(c, bundle.mapper, user_cols, seqs, 1)

    id_source = item_id_source(bundle)
    item_cols: dict[str, list[Any]] = {id_source: list(item_ids)}
    for f in c.item_sparse + c.item_dense:
        if f.source == id_source:
            continue
        looked = iter(data.item_features.get(f.source, []))
        col = []
        for feats in given:
            if feats and feats.get(f.source) is not None:
                col.append(feats[f.source])
            else:
                col.append(next(looked, None))
        item_cols[f.source] = col
    its, itd = encode_item_rows(c, bundle.mapper, item_cols, n)
    feeds = {
        "user_sparse": us,
        "user_dense": ud,
        "hist": hist,
        "hist_len": lens,
        "item_sparse": its,
        "item_dense": itd,
        "user_idx": np.zeros(n, dtype=np.int64),
    }
    history = [ev.get(id_source) for ev in events][-int(lens[0]) :] if lens[0] else []
    return Prepared({k: feeds[k] for k in bundle.input_names}, history)
