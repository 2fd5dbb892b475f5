"""Offline metrics: AUC, GAUC (DIN paper, impression-weighted per-user AUC), logloss,
calibration. NumPy only."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under ROC with tie-averaged ranks; NaN when only one class is present or any
    score is not finite (a NaN ties with nothing and sorts last, which would give a
    number that depends on the rows' order)."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        return float("nan")
    n_pos = float(labels.sum())
    n_neg = float(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    return float((r[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class are skipped.
    NaN when any score is not finite (not a skipped user: an average over the rest)."""
    if not np.isfinite(np.asarray(scores, dtype=np.float64)).all():
        return float("nan")
    users = np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    u, lab, sc = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    total, weight = 0.0, 0.0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        value = auc(lab[a:b], sc[a:b])
        if not np.isnan(value):
            total += value * (b - a)
            weight += b - a
    return float(total / weight) if weight else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def evaluate(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, GAUC, logloss and calibration (mean predicted vs observed CTR)."""
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
