"""Torch-free helpers shared by the benchmarks: timing, percentiles, request bodies and
the graph feeds the service builds for them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson

from ctr.bundle import Bundle, random_inputs

if TYPE_CHECKING:
    import pandas as pd

    from ctr.spec import FeatureConfig
    from service.settings import Settings
    from service.store import UserData

T = TypeVar("T")

Feeds = dict[str, np.ndarray]
# (user ID, item feature -> item IDs to look up) per request -> what the store returns
Reader = Callable[[list[tuple[str, dict[str, list[str]]]]], list["UserData"]]


def uvloop_module() -> Any:
    """uvloop, the event loop the service runs on; None where it is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on uvloop (asyncio's own loop where uvloop is missing). The benchmarks'
    HTTP clients run here: on the service's two cores, the closed-loop client took 0.06
    ms of CPU per request on uvloop against 0.08 on asyncio's default loop, and the
    service served 4-10 % more requests/s at N = 50 (docs/benchmarks.md, "Session
    21")."""
    uv = uvloop_module()
    return asyncio.run(coro) if uv is None else uv.run(coro)


def _time(fn: Any, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1000.0


def cycled_times(call: Callable[[Feeds], Any], feeds: list[Feeds], repeats: int) -> np.ndarray:
    """Milliseconds of ``repeats`` calls of ``call``, cycling through ``feeds`` (each
    feed once as warm-up first), so no single request's shape stands for all of them."""
    for feed in feeds:
        call(feed)
    out = np.empty(repeats)
    for i in range(repeats):
        feed = feeds[i % len(feeds)]
        t = time.perf_counter()
        call(feed)
        out[i] = time.perf_counter() - t
    return out * 1000.0


def timed_rate(
    call: Callable[[int, Feeds], Any],
    feeds: list[Feeds],
    streams: int,
    seconds: float,
    per_call: int = 1,
) -> dict[str, float]:
    """Completed calls over a timed window: ``streams`` threads call ``call(stream, feed)``
    back to back (ORT drops the GIL), cycling through ``feeds``, for ``seconds`` (each
    stream warmed up by one call first); a call that started in the window counts and the
    window lasts until it ends. ``per_call``: requests each call serves (a micro-batch).
    Requests/s, calls, window length and the process's CPU ms per request (all its
    threads)."""
    for k in range(streams):
        call(k, feeds[k % len(feeds)])
    counts = [0] * streams
    gate = threading.Barrier(streams + 1)
    stop = [0.0]
    failed: list[BaseException] = []
    # each stream's own word that it has ended: Thread.is_alive() is not it after an
    # interrupted join (Python 3.11 marks the joined thread stopped while it still runs)
    ended = [False] * streams

    def loop(k: int) -> None:
        try:
            try:
                gate.wait()
            except threading.BrokenBarrierError:  # the window called off (Ctrl-C)
                return
            i = k
            try:
                while time.perf_counter() < stop[0] and not failed:
                    call(k, feeds[i % len(feeds)])
                    counts[k] += 1
                    i += streams
            except Exception as exc:  # a failed call voids the window: raised below
                failed.append(exc)
        finally:
            ended[k] = True

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(streams)]
    try:
        for th in threads:
            th.start()
        cpu, started = time.process_time(), time.perf_counter()  # the window from here
        stop[0] = started + seconds
        gate.wait()
        for th in threads:
            th.join()
    except BaseException:
        # Ctrl-C: end the streams and wait for their calls before unwinding. Python
        # 3.11's Thread.join, interrupted, marks a running thread stopped (bpo-45274's
        # release), so the interpreter finalized under a stream still inside ORT's run,
        # which aborted the process (SIGABRT, "terminate called without an active
        # exception") instead of exiting 130
        stop[0] = 0.0
        for k, th in enumerate(threads):
            if th.ident is None:  # never started (a failed start, Ctrl-C between starts)
                ended[k] = True
        gate.abort()
        while not all(ended):  # at most one call each; a second Ctrl-C waits too
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.01)
        raise
    if failed:  # a stream that died would leave a rate too low, and a ratio too high
        raise RuntimeError(f"a model-only call failed: {failed[0]!r}") from failed[0]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    done = sum(counts) * per_call
    return {"streams": streams, "calls": sum(counts), "seconds": elapsed,
            "rps": done / elapsed, "cpu_ms": cpu * 1000 / max(1, done)}  # fmt: skip


def full_history_feed(bundle: Bundle, n: int, seed: int = 0) -> Feeds:
    """One user with a full history (the worst case) and ``n`` random candidates."""
    c = bundle.config
    rng = np.random.default_rng(seed)
    return random_inputs(c, bundle.mapper.table_sizes(), 1, n, c.max_seq_len, rng)


def full_history_feeds(bundle: Bundle, n: int, count: int = 4) -> list[Feeds]:
    """``count`` worst-case feeds (:func:`full_history_feed`, seeds 0..count-1)."""
    return [full_history_feed(bundle, n, seed) for seed in range(count)]


def merged_feeds(feeds: list[Feeds], users: int) -> list[Feeds]:
    """Micro-batches of ``users`` distinct requests each (as the service's batcher merges
    them), one starting at each feed of ``feeds`` in turn."""
    from service.batcher import merge_feeds

    if users <= 1:
        return feeds
    k = len(feeds)
    return [merge_feeds([feeds[(g * users + j) % k] for j in range(users)]) for g in range(k)]


def p50_p99(ms: np.ndarray | list[float]) -> tuple[float, float]:
    return float(np.median(ms)), float(np.percentile(ms, 99))


def latency_row(ms: np.ndarray) -> dict[str, float]:
    """p50 / p99 and the number of samples behind them."""
    p50, p99 = p50_p99(ms)
    return {"p50_ms": p50, "p99_ms": p99, "samples": int(len(ms))}


def naive_feed(feed: Feeds) -> Feeds:
    """Copy the single user's tensors N times on the host (what the graph avoids)."""
    n = len(feed["user_idx"])
    out = dict(feed)
    for k in ("user_sparse", "user_dense", "hist", "hist_len"):
        if k in feed:
            out[k] = np.repeat(feed[k], n, axis=0)
    out["user_idx"] = np.arange(n, dtype=np.int64)
    return out


def bodies_for(frame: Any, n: int, count: int = 64, seed: int = 0) -> list[bytes]:
    """``count`` ``/v1/score`` bodies: a user of ``frame`` each and ``n`` distinct
    candidates (known items first, then unknown IDs)."""
    rng = np.random.default_rng(seed)
    users = frame["user_id"].astype(str).unique()
    items = frame["item_id"].astype(str).unique()
    out = []
    for _ in range(count):
        chosen = rng.choice(items, size=min(n, len(items)), replace=False).tolist()
        while len(chosen) < n:  # more candidates than known items: add unknown (OOV) IDs
            chosen.append(f"new-{len(chosen)}")
        body = {"user_id": str(rng.choice(users)), "candidates": [{"item_id": i} for i in chosen]}
        out.append(orjson.dumps(body))
    return out


def request_feeds(
    bundle: Bundle, settings: Settings, bodies: list[bytes], read: Reader
) -> list[Feeds]:
    """The graph feeds the service builds for ``bodies``: parsed by its own
    ``score_input`` (without the native scan, which reads the same request), candidates
    and user rows encoded by ``service.features`` (the code path of
    ``service.scoring.score``) from what ``read`` returns for each user. The caches are off,
    so every row is encoded from the store's data."""
    from service.features import build_feeds, candidates
    from service.itemcache import ItemCache
    from service.rowcache import ItemRowCache
    from service.usercache import UserRowCache
    from service.validate import score_input

    c = bundle.config
    rows = ItemRowCache(0, 0, len(c.item_sparse), len(c.item_dense))
    reqs = [score_input(b, settings.max_candidates, settings.max_id_length, None) for b in bodies]
    cands = [candidates(c, rows, r.item_ids, r.features) for r in reqs]
    lookups = [cs.items.take_cached(ItemCache(0, 0)) for cs in cands]
    data = read([(r.user_id, lk) for r, lk in zip(reqs, lookups, strict=True)])
    out = []
    for req, cs, d in zip(reqs, cands, data, strict=True):
        cs.items.fill(d.item_features)
        cs.finish(bundle, rows, cacheable=False)
        prepared = build_feeds(bundle, req.user_id, {}, d, cs.sparse, cs.dense, UserRowCache(0))
        out.append(prepared.feeds)
    return out


def redis_reader(url: str, history: int) -> Reader:
    """A :data:`Reader` over the service's own store code (``service.store.fetch``, one
    pipelined round trip per request) on the Redis at ``url``."""
    from service.store import Reader as StoreReader
    from service.store import fetch, make_client

    async def read_all(wanted: list[tuple[str, dict[str, list[str]]]]) -> list[UserData]:
        client = make_client(url, False, 10.0, 10.0, 4)
        reader = StoreReader(client, 4)
        try:
            return [await fetch(reader, uid, history, lk) for uid, lk in wanted]
        finally:
            await reader.aclose()
            await client.aclose()

    return lambda wanted: asyncio.run(read_all(wanted))


def frame_reader(config: FeatureConfig, frame: pd.DataFrame) -> Reader:
    """A :data:`Reader` without Redis: what ``ctr load`` (``service.loader``) stores for
    ``frame``'s users and items, as ``service.store.fetch`` would return it."""
    from service.loader import item_records, user_records
    from service.store import UserData

    users = {u: (p, ev) for u, p, ev in user_records(config, frame)}
    items = item_records(config, frame)
    keep = config.max_seq_len  # what `ctr load` keeps, and the newest the service reads

    def one(uid: str, lookups: dict[str, list[str]]) -> UserData:
        profile, events = users.get(uid, ({}, []))
        raw = [orjson.dumps(e) for e in events[-keep:]]
        feats = {f: [items.get(f, {}).get(i) for i in ids] for f, ids in lookups.items() if ids}
        return UserData(dict(profile), raw, feats)

    return lambda wanted: [one(uid, lk) for uid, lk in wanted]


def mean_history(feeds: list[Feeds]) -> float:
    """Mean history length (``hist_len``) over single-user ``feeds``."""
    return float(np.mean([int(f["hist_len"][0]) for f in feeds])) if feeds else 0.0
