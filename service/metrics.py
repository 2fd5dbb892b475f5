"""Prometheus metrics. Multiprocess-safe: with ``PROMETHEUS_MULTIPROC_DIR`` set (several
uvicorn workers), ``/metrics`` aggregates every worker's files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service import metricroom

# before the first metric: its files' room reserved (on a full file system a new series
# is held in the worker's memory until there is room, not a SIGBUS that kills the worker)
metricroom.install()

M = TypeVar("M", Counter, Gauge, Histogram)


class Bound(Generic[M]):
    """``metric``'s children by label values, each bound on first use: ``labels()``
    takes a lock and checks its values on every call (1-1.5 µs each; six per scoring
    request). Only for metrics whose children are never removed."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


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
# the stages', and a Redis read's: most take well under the request buckets' first
# 0.5 ms (parse and serialization at a few dozen candidates, a read on a LAN), and a
# quantile inside one bucket only interpolates it
STAGE_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, *LATENCY_BUCKETS,
)  # fmt: skip
STAGE_DURATION = Histogram(
    "ctr_stage_duration_seconds",
    "Time per scoring stage: parse (the body's JSON read and checked), redis_fetch, "
    "feature_mapping, inference, serialization, write (the response handed to the "
    "socket, its access-log line included); their sum is the request's time in the "
    "app, less the body's arrival",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
REDIS_READ = Histogram(
    "ctr_redis_read_seconds",
    "Scoring requests' Redis reads (one pipelined round trip: profile, sequence, missing "
    "item features), failed ones too; requests served from tracked rows read nothing",
    buckets=STAGE_BUCKETS,
)
# Counts are integers: a bucket bound on a value that occurs made histogram_quantile,
# which spreads a bucket's count from the bound below, read a whole bucket low (every
# call of 1 user read as p50 0.5; every request of 200 candidates as 150). A bound half
# a unit either side of each value that occurs often reads it back within half a unit
# (calls all of 1 user: p99 1.49), and rounded as itself: the dashboard rounds them.
CANDIDATE_SIZES = (1, 10, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000)
CANDIDATES = Histogram(
    "ctr_candidates_per_request",
    "Candidates scored per request",
    buckets=tuple(b for n in CANDIDATE_SIZES for b in (n - 0.5, n + 0.5)),
)
BATCH_USERS = Histogram(
    "ctr_batch_users",
    "Users (requests) per graph call; above 1 when micro-batching merged requests",
    # CTR_BATCH_MAX_USERS has no upper bound: the quantiles read up to 256 users a call
    buckets=(0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5, 128.5, 256.5),
)
BATCH_SPLITS = Counter(
    "ctr_batch_splits_total",
    "Micro-batched graph calls that failed and were run again one request at a time",
)
GC_PAUSE = Histogram(
    "ctr_gc_pause_seconds",
    "Python garbage-collection pauses by generation (the event loop stops meanwhile)",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
)
LOOP_LAG = Histogram(
    "ctr_event_loop_lag_seconds",
    "How late the event loop ran a timer due every CTR_LOOP_LAG_INTERVAL_MS: the time "
    "it spent on other work first (a stall of d seconds is seen with probability about "
    "d / interval)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
# how far back ctr_event_loop_lag_max_seconds looks: two scrapes at Prometheus's usual 15 s
LOOP_LAG_WINDOW_S = 30.0
LOOP_LAG_MAX = Gauge(
    "ctr_event_loop_lag_max_seconds",
    "The longest event-loop lag (ctr_event_loop_lag_seconds) this worker saw in the last "
    f"{LOOP_LAG_WINDOW_S:g} s; several workers: one series each (pid label), where the "
    "histogram pools them; NaN where CTR_LOOP_LAG_INTERVAL_MS=0 (not watched)",
    multiprocess_mode="liveall",
)
ERRORS = Counter("ctr_errors_total", "Errors by kind", ["kind"])
IMPRESSIONS_LOGGED = Counter(
    "ctr_impressions_logged_total",
    "Scored responses written to the impression stream (CTR_IMPRESSION_STREAM)",
)
IMPRESSIONS_DROPPED = Counter(
    "ctr_impressions_dropped_total",
    "Scored responses the impression log dropped, by reason: queue_full (Redis slower "
    "than the traffic for CTR_IMPRESSION_QUEUE entries), redis (a write failed), shutdown "
    "(still queued after 2 s of writing at shutdown), encode (a context JSON cannot hold)",
    ["reason"],
)
for _reason in ("queue_full", "redis", "shutdown", "encode"):
    IMPRESSIONS_DROPPED.labels(_reason)
IMPRESSION_WRITE_FAILURES = Counter(
    "ctr_impression_write_failures_total",
    "Impression-stream writes (pipelines of up to 32 entries) that failed; their entries "
    "go back to the queue and are tried again while it has room",
)
DENSE_OUT_OF_RANGE = Counter(
    "ctr_dense_out_of_range_total",
    "Dense feature values encoded outside the range the training split held (the "
    "manifest's dense_range; the graph clamps them to it), by feature. A row kept in the "
    "item-row or user-row cache is counted once, when it was encoded",
    ["feature"],
)
DEGRADED = Counter("ctr_degraded_responses_total", "Responses served in degraded mode")
INLINE_RUNS = Counter(
    "ctr_inline_runs_total",
    "Graph calls run on the event loop thread (CTR_INLINE_MAX_MS: the request alone in flight)",
)
USER_ROWS = Counter(
    "ctr_user_rows_total",
    "Scoring requests by where the user's rows came from: tracked (cached, no Redis read: "
    "CTR_USER_TRACKING), read (a Redis read; its rows cached or encoded), degraded (the "
    "read failed)",
    ["source"],
)
USER_TRACKING_UP = Gauge(
    "ctr_user_tracking_up",
    "1 while the worker's invalidation connection (CTR_USER_TRACKING) is up; 0 also "
    "where tracking is off (ctr_user_tracking_enabled 0)",
    multiprocess_mode="liveall",
)
USER_TRACKING_ENABLED = Gauge(
    "ctr_user_tracking_enabled",
    "1 where the worker tracks users (CTR_USER_TRACKING on and a Redis that accepts "
    "tracking's set-up): ctr_user_tracking_up 0 then means the connection is down; 0 "
    "where off, or while Redis refuses the set-up (retried every 30 s)",
    multiprocess_mode="liveall",
)
USER_TRACKING_REFUSED = Gauge(
    "ctr_user_tracking_refused",
    "1 while Redis refuses the worker's tracking set-up (an error reply: Redis < 6, an "
    "ACL without CLIENT TRACKING, noeviction at maxmemory; or the set-up's probe not "
    "seen back): every request reads Redis; retried every 30 s",
    multiprocess_mode="liveall",
)


def set_tracking(enabled: bool, refused: bool = False) -> None:
    """The two tracking gauges together: configured and not refused is enabled."""
    USER_TRACKING_ENABLED.set(1 if enabled else 0)
    USER_TRACKING_REFUSED.set(1 if refused else 0)


USER_INVALIDATIONS = Counter(
    "ctr_user_invalidations_total",
    "User keys Redis reported written, deleted, expired or evicted (CTR_USER_TRACKING; "
    "BCAST: each worker hears of every user key written to this Redis, in any database; "
    "the workers' heartbeat probe keys not counted)",
)
ITEM_INVALIDATIONS = Counter(
    "ctr_item_invalidations_total",
    "Reports of item-feature hash writes Redis sent (ctr:item:<feature>, "
    "CTR_ITEM_TRACKING; in any database; writes to one hash within one turn of Redis's "
    "event loop come as one): each drops the worker's cached values of that feature and "
    "every encoded candidate row",
)
USER_TRACKING_RESETS = Counter(
    "ctr_user_tracking_resets_total",
    "Times every kept user row was distrusted at once (connection lost, flush, or the "
    "per-user table full): the requests that follow read Redis",
)
USER_TRACKING_CATCH_UPS = Counter(
    "ctr_user_tracking_catch_ups_total",
    "Times a drain found the invalidation socket full (the worker stalled while others "
    "wrote many user keys): no kept row was trusted until a probe written then came back",
)
# the hot path's children, bound once
REQUEST = Bound(REQUEST_DURATION)
STAGE = Bound(STAGE_DURATION)
ROWS = Bound(USER_ROWS)
IN_FLIGHT = Gauge(
    "ctr_requests_in_flight",
    "Scoring requests being served (CTR_MAX_IN_FLIGHT bounds each worker's)",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "ctr_model_info",
    "The loaded model (value 1): graph is fused or standard, precision fp32 or fp16",
    ["name", "version", "provider", "graph", "precision"],
    multiprocess_mode="liveall",
)
MODEL_FALLBACK = Gauge(
    "ctr_model_fallback",
    "1 while the worker serves an older version because the newest did not load at "
    "start-up (CTR_MODEL_VERSION=latest; /readyz's fallback says why); 0 otherwise",
    multiprocess_mode="liveall",
)
WORKER_MEMORY = Gauge(
    "ctr_worker_resident_memory_bytes",
    "Resident memory of each worker process (Linux); several workers: one series each (pid label)",
    multiprocess_mode="liveall",
)
WORKER_CPU = Counter(
    "ctr_worker_cpu_seconds",
    "CPU time (user + system, every thread) used by the worker processes",
)


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


class ProcessSampler:
    """Puts this process's resident memory and CPU time into ``WORKER_MEMORY`` and
    ``WORKER_CPU``: prometheus_client's own ``process_*`` metrics are not exported in
    multiprocess mode, where each worker's would be needed. One per process; each
    :meth:`sample` adds the CPU used since the last one, so several apps in a process
    (tests) count it once."""

    def __init__(self, statm: str = "/proc/self/statm") -> None:
        self.statm = Path(statm)
        self.page = _page_size()
        self.counted = 0.0  # CPU seconds already added to the counter

    def resident_bytes(self) -> int | None:
        """Resident set size from ``/proc/self/statm``; ``None`` where there is none."""
        try:
            return int(self.statm.read_text().split()[1]) * self.page
        except (OSError, IndexError, ValueError):
            return None

    def sample(self) -> None:
        rss = self.resident_bytes()
        if rss is not None:
            WORKER_MEMORY.set(rss)
        t = os.times()
        cpu = t.user + t.system
        if cpu > self.counted:
            WORKER_CPU.inc(cpu - self.counted)
            self.counted = cpu

    async def every(self, seconds: float) -> None:
        """Sample every ``seconds`` (from each worker: ``/metrics`` is answered by one
        of them, and the others' figures must not go stale)."""
        while True:
            self.sample()
            await asyncio.sleep(seconds)


PROCESS = ProcessSampler()


class WorstLag:
    """The largest of the values added over the last ``window`` seconds (those added at
    ``t`` with ``now - window < t``): a deque of the candidates, each larger than every
    one added after it, so each add costs O(1) amortised."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.kept: deque[tuple[float, float]] = deque()

    def add(self, at: float, value: float) -> float:
        """Adds ``value`` seen at ``at`` (seconds, not decreasing); returns the largest."""
        kept = self.kept
        while kept and kept[-1][1] <= value:
            kept.pop()
        kept.append((at, value))
        while kept[0][0] <= at - self.window:
            kept.popleft()
        return kept[0][1]


async def watch_loop_lag(interval: float) -> None:
    """Observe, every ``interval`` seconds, how late the event loop ran this task's
    timer (``ctr_event_loop_lag_seconds``): what a request arriving then would have
    waited before the loop looked at it. A blocking call, a long GC pause, a GIL-holding
    C call on another thread all show here; a stall of ``d`` seconds is seen with
    probability about ``d / interval`` (it must cover a timer's due time), as the part of
    it after that due time. ``ctr_event_loop_lag_max_seconds``: the worst of the last
    :data:`LOOP_LAG_WINDOW_S`, per worker."""
    worst = WorstLag(LOOP_LAG_WINDOW_S)
    while True:
        due = time.perf_counter() + interval
        await asyncio.sleep(interval)
        now = time.perf_counter()
        lag = max(0.0, now - due)
        LOOP_LAG.observe(lag)
        LOOP_LAG_MAX.set(worst.add(now, lag))


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        registry.register(_ServingInfoOnly(multiprocess.MultiProcessCollector(None)))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _ServingInfoOnly:
    """The workers' pooled metrics without the ``ctr_model_info`` series at 0: a
    replaced version's, which multiprocess mode cannot remove from a worker's file (one
    series more per worker with every reload, for good: a soak review's ``/metrics``);
    and without the histogram series none of whose files holds all of it
    (:func:`_whole_series`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        for metric in self.inner.collect():
            if metric.name == "ctr_model_info":
                metric.samples = [x for x in metric.samples if x.value != 0]
            elif metric.type == "histogram":
                metric.samples = _whole_series(metric.samples)
            yield metric


def _whole_series(samples: list[Any]) -> list[Any]:
    """A histogram's samples, but for the series with no ``+Inf`` bucket or no ``_sum``:
    a series whose keys a full metric file system took only some of (service.metricroom
    places each key on its own; the rest are held in the worker's memory) showed with
    some buckets, no ``+Inf`` and a ``_count`` from those (NaN quantiles, a rate of 0
    requests): a fault review, session 47. Missing instead, as documented, until the
    worker files the rest."""

    def series(sample: Any) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))

    # the series are the ones with a _count (any bucket) or a _sum: the keys of those
    # and of the +Inf buckets only (3 of a series' ~20 samples; ~4x faster)
    tops, sums, counts = set(), set(), set()
    for x in samples:
        name = x.name
        if name.endswith("_bucket"):
            if x.labels.get("le") == "+Inf":
                tops.add(series(x))
        elif name.endswith("_sum"):
            sums.add(series(x))
        elif name.endswith("_count"):
            counts.add(series(x))
    whole = tops & sums
    if len(whole) == len(sums) == len(tops) and counts <= whole:  # every series whole
        return samples
    return [x for x in samples if series(x) in whole]


def forget_dead_workers() -> list[int]:
    """With several workers (``PROMETHEUS_MULTIPROC_DIR``): drop the live gauges of
    workers that are gone (a crashed one that uvicorn replaced), so ``/metrics`` holds
    neither their model nor a request they died serving. Run at each worker's start.
    Returns the pids dropped."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return []
    from service.metricfiles import forget_dead

    return forget_dead(folder)


def forget_this_worker() -> None:
    """With several workers: drop this worker's live gauges as it exits. The sweep at
    start (:func:`forget_dead_workers`) cannot: uvicorn's restart (SIGHUP to the parent)
    starts each replacement before it stops the worker replaced, which is still alive
    then, and its model, memory and tracking series would stay in ``/metrics``."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(FileNotFoundError):
        multiprocess.mark_process_dead(os.getpid(), folder)


_current_info: list[tuple[str, ...]] = []


def init_dense_counts(features: list[str]) -> None:
    """Start ``ctr_dense_out_of_range_total`` at 0 for the loaded model's bounded dense
    features, so that a rate of 0 is a series, not an absent one."""
    for name in features:
        DENSE_OUT_OF_RANGE.labels(name)


def set_model_info(name: str, version: str, provider: str, graph: str, precision: str) -> None:
    """1 for the serving model; the one it replaced is removed (several workers: set to
    0, which ``/metrics`` leaves out, as ``remove()`` is not available in multiprocess
    mode)."""
    pooled = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    for old in _current_info:
        if pooled:
            MODEL_INFO.labels(*old).set(0)
        else:
            MODEL_INFO.remove(*old)
    labels = (name, version, provider, graph, precision)
    _current_info[:] = [labels]
    MODEL_INFO.labels(*labels).set(1)


class GCTimer:
    """A ``gc.callbacks`` entry that times each collection for ``ctr_gc_pause_seconds``.

    A collection can start inside any allocation, on any thread, including while that
    thread holds one of prometheus_client's (non-reentrant) metric locks; observing the
    histogram from the callback could then deadlock. So the callback only appends to a
    deque (atomic, lock-free from Python's side) and :meth:`flush` moves the pauses into
    the histogram from the event loop: after each scoring request and before a scrape."""

    def __init__(self, keep: int = 100_000) -> None:
        self.started = 0.0
        self.pending: deque[tuple[int, float]] = deque(maxlen=keep)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            self.pending.append((info.get("generation", -1), time.perf_counter() - self.started))
            self.started = 0.0

    def flush(self) -> None:
        pending = self.pending
        while pending:
            generation, seconds = pending.popleft()
            GC_PAUSE.labels(str(generation)).observe(seconds)


class ProcessHooks:
    """Process-wide runtime settings that every app in the process shares: the GIL
    switch interval and the GC timer. Reference-counted, so several apps in one process
    (tests, benchmarks) install them once and the last one out restores Python's own."""

    def __init__(self) -> None:
        self.users = 0
        self.saved_switch = 0.0
        self.gc_timer = GCTimer()

    def enter(self, switch_s: float) -> None:
        if self.users == 0:
            self.saved_switch = sys.getswitchinterval()
            gc.callbacks.append(self.gc_timer)
        self.users += 1
        sys.setswitchinterval(switch_s)

    def exit(self) -> None:
        self.users -= 1
        if self.users == 0:
            sys.setswitchinterval(self.saved_switch)
            if self.gc_timer in gc.callbacks:
                gc.callbacks.remove(self.gc_timer)
            self.gc_timer.flush()


HOOKS = ProcessHooks()
