"""Offline metrics: AUC, GAUC (DIN paper, impression-weighted per-user AUC), logloss,
calibration. NumPy only."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under ROC with tie-averaged ranks; NaN when only one class is present or any
    score is not finite (a NaN ties with nothing and sorts last, which would give a
    number that depends on the rows' order). ``labels``, ``scores``: ``[n]``."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        return float("nan")
    n_pos = float(labels.sum())
    n_neg = float(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    r = np.empty(len(scores), dtype=np.float64)
    r[order] = _tied_ranks(scores[order], np.zeros(len(scores), dtype=bool))
    return float((r[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _tied_ranks(s: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """1-based ranks of the sorted scores ``s`` ``[n]``, ties given their run's mean
    rank; ``new_group`` ``[n]`` (bool) marks where a group starts (ranks count from 1
    again there, and a run of ties never crosses it)."""
    n = len(s)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, (s[1:] != s[:-1]) | new_group[1:]])
    ends = np.r_[starts[1:], n] - 1
    group_start = np.flatnonzero(np.r_[True, new_group[1:]])
    first = np.repeat(group_start, np.diff(np.r_[group_start, n]))  # each row's group start
    mean = np.repeat((starts + ends) / 2.0 + 1.0, ends - starts + 1)
    return mean - first


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class are skipped.
    NaN when any score is not finite (not a skipped user: an average over the rest).
    ``users``, ``labels``, ``scores``: ``[n]``. One sort over all rows, no loop per user."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        return float("nan")
    users = np.asarray(users)
    if len(users) == 0:
        return float("nan")
    order = np.lexsort((scores, users))  # by user, then score
    u, lab, sc = users[order], np.asarray(labels, dtype=np.float64)[order], scores[order]
    new_group = np.r_[True, u[1:] != u[:-1]]
    ranks = _tied_ranks(sc, new_group)
    starts = np.flatnonzero(new_group)
    size = np.diff(np.r_[starts, len(u)]).astype(np.float64)
    n_pos = np.add.reduceat(lab, starts)
    n_neg = size - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    pos_ranks = np.add.reduceat(ranks * lab, starts)
    values = (pos_ranks[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float((values * size[ok]).sum() / size[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]: a confident
    miss costs at most -ln(1e-7) = 16.1 (sklearn clips at float64's epsilon, 36.0), so
    a split with such misses reads a little lower here than there."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def evaluate(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, GAUC, logloss and calibration (mean predicted vs observed CTR); NaN for each
    figure of an empty split (without numpy's warnings about an empty mean)."""
    if len(labels) == 0:
        nan = float("nan")
        return {k: nan for k in ("auc", "gauc", "logloss", "mean_pred", "observed_ctr",
                                 "calibration")} | {"n": 0}  # fmt: skip
    mean_pred = float(np.mean(probs))
    observed = float(np.mean(labels))
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(users, labels, probs),
        "logloss": logloss(labels, probs),
        "mean_pred": mean_pred,
        "observed_ctr": observed,
        "calibration": mean_pred / observed if observed > 0 else float("nan"),
        "n": int(len(labels)),
    }
