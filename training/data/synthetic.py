"""Synthetic behaviour logs with planted, drifting user interests and a known truth.

Items belong to categories. Each user keeps two active interests (categories) and
at every step behaves inside one of them; with probability ``drift`` an interest
is replaced by a new one, so older behaviour stops being informative. A
candidate's true click probability is

    p = sigmoid(bias + item_bias[i] + strength * relevance + 0.3 * [hour >= 20])

where ``relevance`` is the recency-weighted share of history behaviours in the
candidate's category (weight ``decay ** age``) and ``hour`` the sample's context hour
(evenings click a little more, so a context feature carries signal). So:

* attention matters: only history items of the candidate's category count;
* interest evolution matters: recent behaviour counts more than old behaviour.

The truth ``p_true`` is kept in the frame (no feature reads it), so a model can be compared
with it (its test AUC is the ceiling: about 0.81 with configs/synthetic_din.yaml).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pandas as pd

from ctr.spec import FeatureConfig
from training.data.generic import DataError

# the least each integer option of generate() may be (any other: 0)
INT_MINIMUM = {
    "n_users": 1, "n_categories": 2, "items_per_category": 1, "samples_per_user": 1,
    "min_history": 1,
}  # fmt: skip


def check_options(config: FeatureConfig) -> dict[str, Any]:
    """``data.options`` for :func:`generate`, checked against its keyword arguments (an
    integer default: an integer option): a :class:`DataError` names an unknown key, a
    value of the wrong kind or one out of range (instead of a TypeError from deep inside
    the generator, or an empty frame)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(generate).parameters.items()
        if name != "config"
    }
    opts = dict(config.data.options)
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise DataError(f"unknown synthetic data.options {unknown}; known: {sorted(defaults)}")
    for key, value in opts.items():
        if isinstance(defaults[key], int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"data.options.{key} must be an integer, not {value!r}")
            if value < INT_MINIMUM.get(key, 0):
                raise DataError(f"data.options.{key} must be at least {INT_MINIMUM.get(key, 0)}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"data.options.{key} must be a number, not {value!r}")
        elif not math.isfinite(value):
            raise DataError(f"data.options.{key} must be finite, not {value!r}")
    for key in ("drift", "decay"):
        if key in opts and not 0 <= opts[key] <= 1:
            raise DataError(f"data.options.{key} must lie in [0, 1], not {opts[key]!r}")
    min_history = opts.get("min_history", defaults["min_history"])
    samples = opts.get("samples_per_user", defaults["samples_per_user"])
    if min_history >= config.max_seq_len + samples:
        raise DataError(
            f"data.options.min_history ({min_history}) must be below max_seq_len + "
            f"samples_per_user ({config.max_seq_len + samples}): no user would have a "
            "history that long"
        )
    return opts


def generate(
    config: FeatureConfig,
    n_users: int = 2000,
    n_categories: int = 40,
    items_per_category: int = 30,
    samples_per_user: int = 4,
    min_history: int = 3,
    drift: float = 0.15,
    decay: float = 0.85,
    strength: float = 5.0,
    bias: float = -2.0,
    seed: int = 7,
) -> pd.DataFrame:
    """One row per example, in the generic layout (lists for sequences)."""
    rng = np.random.default_rng(seed)
    n_items = n_categories * items_per_category
    item_cat = rng.permutation(np.repeat(np.arange(n_categories), items_per_category))
    item_bias = rng.normal(0.0, 0.5, size=n_items)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_categories)]
    max_len = config.max_seq_len
    rows: list[dict] = []
    for u in range(n_users):
        total = int(rng.integers(min_history + samples_per_user, max_len + 2 * samples_per_user))
        interests = list(rng.choice(n_categories, size=2, replace=False))
        seq: list[int] = []
        for _ in range(total):
            if rng.random() < drift:
                interests[int(rng.integers(2))] = int(rng.integers(n_categories))
            c = interests[int(rng.integers(2))]
            seq.append(int(rng.choice(by_cat[c])))
        age_bucket = int(rng.integers(0, 6))
        cut_points = sorted(
            rng.choice(np.arange(min_history, total), size=samples_per_user, replace=False)
        )
        for ts, cut in enumerate(cut_points):
            hist = seq[:cut][-max_len:]
            hist_cats = item_cat[hist]
            ages = np.arange(len(hist))[::-1]
            w = decay**ages
            for positive_like in (True, False):
                if positive_like:
                    c = (
                        int(item_cat[seq[cut]])
                        if rng.random() < 0.7
                        else int(rng.choice(hist_cats))
                    )
                    cand = int(rng.choice(by_cat[c]))
                else:
                    cand = int(rng.integers(n_items))
                rel = float(np.sum(w * (hist_cats == item_cat[cand])) / np.sum(w))
                hour = int(rng.integers(0, 24))
                logit = bias + item_bias[cand] + strength * rel + (0.3 if hour >= 20 else 0.0)
                p = 1.0 / (1.0 + np.exp(-logit))
                rows.append(
                    {
                        "user_id": f"u{u}",
                        "age_bucket": str(age_bucket),
                        "hour": str(hour),
                        "item_id": f"i{cand}",
                        "cate_id": f"c{item_cat[cand]}",
                        "item_price": float(np.exp(item_bias[cand])),
                        "hist_item_id": [f"i{i}" for i in hist],
                        "hist_cate_id": [f"c{c2}" for c2 in hist_cats],
                        "label": float(rng.random() < p),
                        "p_true": p,
                        "ts": ts,
                    }
                )
    return pd.DataFrame(rows)

