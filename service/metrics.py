"""Prometheus metrics. Multiprocess-safe: with ``PROMETHEUS_MULTIPROC_DIR`` set (several
uvicorn workers), ``/metrics`` aggregates every worker's files."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

REQUEST_DURATION = Histogram(
    "ctr_request_duration_seconds",
    "HTTP request duration by route, method and status",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "ctr_stage_duration_seconds",
    "Time per scoring stage: redis_fetch, feature_mapping, inference, serialization",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
CANDIDATES = Histogram(
    "ctr_candidates_per_request",
    "Candidates scored per request",
    buckets=(1, 10, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000),
)
BATCH_USERS = Histogram(
    "ctr_batch_users",
    "Users (requests) per graph call; above 1 when micro-batching merged requests",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
GC_PAUSE = Histogram(
    "ctr_gc_pause_seconds",
    "Python garbage-collection pauses by generation (the event loop stops meanwhile)",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
)
ERRORS = Counter("ctr_errors_total", "Errors by kind", ["kind"])
DEGRADED = Counter("ctr_degraded_responses_total", "Responses served in degraded mode")
MODEL_INFO = Gauge(
    "ctr_model_info",
    "The loaded model (value 1)",
    ["name", "version", "provider"],
    multiprocess_mode="liveall",
)


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_current_info: list[tuple[str, str, str]] = []


def set_model_info(name: str, version: str, provider: str) -> None:
    """1 for the serving model, 0 for the one it replaced (``clear()`` is not available
    in multiprocess mode)."""
    for old in _current_info:
        MODEL_INFO.labels(*old).set(0)
    _current_info[:] = [(name, version, provider)]
    MODEL_INFO.labels(name=name, version=version, provider=provider).set(1)


class GCTimer:
    """A ``gc.callbacks`` entry that times each collection into ``ctr_gc_pause_seconds``.
    ``install()`` / ``remove()`` are called by the service's lifespan."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            GC_PAUSE.labels(str(info.get("generation", "?"))).observe(
                time.perf_counter() - self.started
            )
            self.started = 0.0

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
