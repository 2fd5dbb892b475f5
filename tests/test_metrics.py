"""``training.metrics``' AUC and GAUC (one sort, no loop per user or per tie) against
their definitions: the share of (positive, negative) pairs ranked right, ties counted
half, and per user weighted by the user's rows, users of one class skipped."""

from __future__ import annotations

import math

import numpy as np

from training.metrics import auc, evaluate, gauc, logloss


def _pairwise(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return math.nan
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _per_user(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    total = weight = 0.0
    for u in np.unique(users):
        value = _pairwise(labels[users == u], scores[users == u])
        if not math.isnan(value):
            total += value * (users == u).sum()
            weight += (users == u).sum()
    return total / weight if weight else math.nan


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


def test_auc_and_gauc_equal_their_pairwise_definitions_with_ties() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 80))
        users = rng.integers(0, int(rng.integers(1, 9)), n).astype(str)
        labels = rng.integers(0, 2, n).astype(np.float64)
        scores = rng.integers(0, int(rng.integers(1, 12)), n) / 11.0  # many ties
        assert _same(auc(labels, scores), _pairwise(labels, scores))
        assert _same(gauc(users, labels, scores), _per_user(users, labels, scores))


def test_gauc_weights_users_by_rows_and_skips_one_class_users() -> None:
    users = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 3)
    labels = np.array([1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.float64)
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.1, 0.2, 0.3])
    # a: 1.0 over 4 rows, b: 0.0 over 2, c: one class, skipped
    assert gauc(users, labels, scores) == (1.0 * 4 + 0.0 * 2) / 6
    assert math.isnan(gauc(users[6:], labels[6:], scores[6:]))
    assert math.isnan(gauc(np.array([]), np.array([]), np.array([])))


def test_logloss_clips_certain_predictions_so_one_wrong_one_stays_finite() -> None:
    """A probability of exactly 0 or 1 (a saturated sigmoid in float32) is clipped to
    ``[eps, 1 - eps]``: a confidently wrong row costs ``-log(eps)``, not inf (one such
    row would make the whole split's logloss inf), and a right one almost nothing."""
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    wrong = logloss(labels[:2], np.array([0.0, 1.0]))
    assert abs(wrong + math.log(1e-7)) < 1e-6
    assert 0.0 < logloss(labels, np.array([1.0, 0.0, 1.0, 0.0])) < 1e-6
    got = evaluate(np.array(["u"] * 4), labels, np.array([0.0, 1.0, 1.0, 0.0]))
    assert math.isfinite(got["logloss"])
