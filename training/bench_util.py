"""Torch-free helpers shared by the benchmarks: timing, percentiles and feeds."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ctr.bundle import Bundle, random_inputs


def _time(fn: Any, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1000.0


def full_history_feed(bundle: Bundle, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One user with a full history (the worst case) and ``n`` random candidates."""
    c = bundle.config
    rng = np.random.default_rng(seed)
    return random_inputs(c, bundle.mapper.table_sizes(), 1, n, c.max_seq_len, rng)


def p50_p99(ms: np.ndarray | list[float]) -> tuple[float, float]:
    return float(np.median(ms)), float(np.percentile(ms, 99))


def naive_feed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copy the single user's tensors N times on the host (what the graph avoids)."""
    n = len(feed["user_idx"])
    out = dict(feed)
    for k in ("user_sparse", "user_dense", "hist", "hist_len"):
        if k in feed:
            out[k] = np.repeat(feed[k], n, axis=0)
    out["user_idx"] = np.arange(n, dtype=np.int64)
    return out
