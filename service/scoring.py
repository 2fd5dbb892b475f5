"""The scoring path: one request's candidates mapped, the user's data read from Redis
(or the kept rows), the graph called (inline, batched, on a native thread or the ORT
thread) and the ranked answer written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from service import asgi
from service import metrics as m
from service.asgi import WRITE_FROM, orjson_response
from service.codec import items_python
from service.errors import NonFiniteScore
from service.features import build_feeds, candidates, history_items, rows_feeds
from service.model import CPU, LoadedModel
from service.nativerun import NativeRunError
from service.requestid import CURRENT
from service.state import State
from service.store import REDIS_ERRORS, UserData, data_error, fetch
from service.throttle import held_note
from service.validate import check_numbers

log = logging.getLogger("ctr.service")


class LateTimer:
    """Keeps a Redis read's timeout (``limit``, an entered ``asyncio.timeout``) from
    cutting the read short on an event loop that came to it late: busy with other
    requests' work (a burst past what the worker serves), Redis's reply may be in the
    socket, unread. A check due just before the timeout finds the loop late (by more
    than :data:`LATE_S`) and moves the timeout :data:`GRACE_S` on from then, up to
    :data:`GRACES` times while the loop stays late: a reply already there is read (a
    full answer, where the loop's lateness made a degraded one, Redis idle), and a
    Redis that is slow still times out, at most ``GRACES * GRACE_S`` later. On time,
    it does nothing."""

    __slots__ = ("_graces", "_handle", "_limit", "_loop")

    def __init__(self, limit: asyncio.Timeout) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._graces = GRACES
        when = limit.when()
        assert when is not None
        self._handle = self._loop.call_at(when - EARLY_S, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        when = self._limit.when()
        if when is None or now - (when - EARLY_S) <= LATE_S or not self._graces:
            return  # on time (or out of graces): the timeout stands
        self._graces -= 1
        with contextlib.suppress(RuntimeError):  # expired meanwhile: nothing to move
            self._limit.reschedule(now + GRACE_S)
            self._handle = self._loop.call_at(now + GRACE_S - EARLY_S, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


GRACES = 3  # the most times a late loop moves one read's timeout on
LATE_S = 0.005  # a check this late found the loop busy, not Redis
GRACE_S = 0.005  # how far a late loop moves the timeout on, each time
EARLY_S = 0.0005  # the check runs this long before the timeout would


def _inline(
    state: State, model: LoadedModel, n: int, deadline: float, idle: bool, explain: bool = False
) -> bool:
    """Whether a graph call for ``n`` candidates runs on the event loop thread: only on
    the CPU, for a request that came in to an idle worker (``idle``) and is still alone in
    flight, with no handed-off call still running (one whose request timed out), and a
    call (``explain``: one that also returns the attention weights, timed apart) expected
    to take at most ``CTR_INLINE_MAX_MS`` and to end before ``deadline``
    (a call that blocks the loop cannot be cut short by the deadline's timer). Under load
    requests overlap and their calls go to the ORT thread, so that the next request's
    reads and parsing overlap them."""
    limit = state.settings.inline_max_ms
    if limit <= 0 or not idle or state.in_flight > 1:
        return False
    if state.graph_calls.running:  # a call left by a request that timed out runs on
        return False
    if model.native is not None and model.native.pending:  # the same, on a native thread
        return False
    if model.executor is not None or model.provider != CPU:
        return False
    expected = model.expected_run_s(n, explain)  # None until a like call has run
    if expected is None or expected * 1000 > limit:
        return False
    return asyncio.get_running_loop().time() + expected < deadline


async def score(
    state: State, model: LoadedModel, req: Any, deadline: float, idle: bool, parse_s: float
) -> Response:
    """Score ``req`` before ``deadline`` (``loop.time()`` units); ``idle``: it came in
    to a worker with no other request in flight; ``parse_s``: its body's parse, recorded
    with the other stages (a request refused after the parse, 503 not ready or 401 for
    explain, adds to no stage)."""
    s = state.settings
    t0 = asgi.STAGE_CLOCK()
    bundle = model.bundle
    check_numbers(req.features, req.context, model.dense_sources)
    tracker = state.tracker
    if tracker is not None:
        # invalidations that have reached this host apply first: before cached item
        # values and rows and kept user rows are trusted, and before a read's stamp (a
        # change from before the read is not one after it)
        tracker.poll()
    # reads from here on store their item values and rows only while no item hash has
    # been reported written since (the item cache's generation)
    generation = state.item_cache.generation
    model.rows.follow(generation)
    cands = candidates(bundle.config, model.rows, req.item_ids, req.features)
    lookups = cands.items.take_cached(state.item_cache)
    # only the context keys the model reads: the others must not be kept with the
    # user's cached rows, nor make them miss; a null value is absent (the stored
    # profile's value stands)
    keep = model.context_sources
    context = (
        {k: v for k, v in req.context.items() if k in keep and v is not None} if req.context else {}
    )
    t_read = asgi.STAGE_CLOCK()  # the candidates mapped: feature work, not the read's
    degraded = False
    data = UserData()
    rows = None
    t_fetched: float | None = None  # the read answered (or failed): then feature work
    if tracker is not None and not lookups and not req.explain:
        rows = model.users.trusted(req.user_id, context, tracker)
    if rows is None:
        stamp = tracker.stamp() if tracker is not None else None  # before the read is sent
        limit = asyncio.timeout(s.redis_timeout_ms / 1000)
        try:
            assert state.reader is not None
            read_at = time.monotonic()
            try:
                async with limit:
                    late = LateTimer(limit)
                    try:
                        data = await fetch(state.reader, req.user_id,
                                           bundle.config.max_seq_len, lookups,
                                           stamp is not None,
                                           model.profile_fields
                                           if tracker and tracker.field_ttl
                                           else ())  # fmt: skip
                    finally:
                        late.cancel()
            finally:  # a failed read too
                m.REDIS_READ.observe(time.monotonic() - read_at)
            t_fetched = asgi.STAGE_CLOCK()
            for source, ids in lookups.items():
                state.item_cache.put(
                    source, ids, data.item_features[source], read_at, generation
                )
            # rows encoded from these values expire with them (TTL 0: no row is kept)
            cands.items.fill(data.item_features, read_at + s.item_cache_ttl_s)
        except REDIS_ERRORS as exc:
            wrong = data_error(exc)
            due = (state.read_failures if wrong is None else state.wrong_keys).ready()
            if due is None:
                pass  # one line per period while failures last: counted below
            elif wrong is not None:  # not the store down: a key to fix (degraded all the same)
                log.error("a key read for user %r (profile, sequence, or a candidate's "
                          "features) holds another type, degraded response: %s%s",
                          req.user_id[:100], wrong, held_note(due))  # fmt: skip
            else:
                # the request's own timer says nothing (asyncio's TimeoutError is empty)
                text = str(exc)[:300] or (
                    f"no reply within CTR_REDIS_TIMEOUT_MS={s.redis_timeout_ms}"
                    if isinstance(exc, TimeoutError) else "")  # fmt: skip
                log.warning("redis fetch failed, degraded response: %s: %s%s",
                            type(exc).__name__, text, held_note(due))  # fmt: skip
            m.ERRORS.labels("redis" if wrong is None else "redis_data").inc()
            degraded = True  # data stays empty
            t_fetched = asgi.STAGE_CLOCK()
    t1 = asgi.STAGE_CLOCK()
    # rows with a missing feature because the store failed are not cached, nor rows
    # whose values may predate an item hash write reported meanwhile
    fresh = state.item_cache.generation == generation
    cands.finish(bundle, model.rows, cacheable=fresh and not (degraded and lookups))
    if rows is not None:
        m.ROWS("tracked").inc()
        prepared = rows_feeds(bundle, rows, cands.sparse, cands.dense)
        t2 = asgi.STAGE_CLOCK()  # the yield below is others' work: the inference stage's wait
        # nothing awaited so far: let the requests that came in with this one start
        # (and count in state.in_flight), so that under load this call goes to the ORT
        # thread and their work overlaps it, as after a read; alone, it runs inline
        await asyncio.sleep(0)
    else:
        prepared = build_feeds(
            bundle, req.user_id, context, data, cands.sparse, cands.dense, model.users
        )
        # the kept rows match this read: trusted until Redis invalidates the user, and
        # no longer than the first of the user's keys lives
        model.users.note_read(req.user_id, None if degraded else stamp, read_at + data.ttl_s)
        m.ROWS("degraded" if degraded else "read").inc()
        t2 = asgi.STAGE_CLOCK()
    executor = model.executor or state.executor  # a CUDA-graph model runs on its own thread
    assert executor is not None
    if model.batcher is not None:
        outs = await model.batcher.submit(executor, prepared.feeds, req.explain)
    elif _inline(state, model, len(req.item_ids), deadline, idle, req.explain):
        # nothing else in flight to serve meanwhile: skip the hand-off to the ORT thread
        # and back (the main session's pool threads still share a large call)
        outs = model.run(prepared.feeds, req.explain)  # an overrun: guarded's 503
        m.INLINE_RUNS.inc()
        m.BATCH_USERS.observe(1)
    elif model.native is not None and not req.explain and not model.native.closed:
        # on a native thread, which never waits for the GIL (service.nativerun); it
        # notes the call's time in the model's expected run times itself
        try:
            # busy: other requests in flight, whose calls a larger one may run beside
            busy = state.in_flight > 1
            outs = [(await model.native.run(prepared.feeds, busy))[0]]
        except NativeRunError as exc:  # the Python runner serves the call instead
            log.warning("native graph call failed, running it through ORT's Python API: %s", exc)
            m.ERRORS.labels("native_runner").inc()
            outs = await state.graph_calls.submit(executor, model.run, prepared.feeds, False)
        m.BATCH_USERS.observe(1)
    else:
        outs = await state.graph_calls.submit(executor, model.run, prepared.feeds, req.explain)
        m.BATCH_USERS.observe(1)  # one user per graph call without micro-batching
    t3 = asgi.STAGE_CLOCK()
    probs = outs[0]
    # the C ranking declines a score that is not finite: only then is there one to find
    order = state.codec.rank(probs, req.top_k) if state.codec is not None else None
    if order is None:
        if not np.isfinite(probs).all():  # a 500 that says so, never `null` as a probability
            bad = np.flatnonzero(~np.isfinite(probs))
            log.error("non-finite scores for %d of %d candidates", bad.size, probs.size)
            raise NonFiniteScore(
                f"the model returned no finite score for {bad.size} candidate(s)",
                f"candidates[{int(bad[0])}]",
            )
        order = np.argsort(-probs, kind="stable")[: req.top_k]
    items: Any = None
    if state.codec is not None and not req.explain:
        json_items = state.codec.encode(req.item_ids, probs, order, req.raw_ids)
        items = None if json_items is None else orjson.Fragment(json_items)
    if items is None:
        items = items_python(req.item_ids, probs, order)
    if req.explain and model.has_attention:
        # every item gets the key: [] for an empty history (a cold start, degraded)
        hist = history_items(bundle.config, data, prepared.hist_len) if len(outs) > 1 else []
        for item, i in zip(items, order.tolist(), strict=True):
            w = outs[1][i, : len(hist)] if hist else np.empty(0, np.float32)
            top = np.argsort(-np.abs(w), kind="stable")[: s.explain_top]
            item["attention"] = [{"item_id": hist[j], "weight": float(w[j])} for j in top]
    body = {
        "model": {"name": model.name, "version": model.version},
        "request_id": CURRENT.get(),  # set where the request came in (serving._serve)
        "degraded": degraded,
        "cold_start": not prepared.found and not degraded,
        "items": items,
    }
    response = orjson_response(body)
    t4 = asgi.STAGE_CLOCK()
    setattr(response, WRITE_FROM, t4)
    m.STAGE("parse").observe(parse_s)
    fetched = t1 if t_fetched is None else t_fetched
    m.STAGE("redis_fetch").observe(fetched - t_read)
    m.STAGE("feature_mapping").observe((t_read - t0) + (t2 - fetched))
    m.STAGE("inference").observe(t3 - t2)
    m.STAGE("serialization").observe(t4 - t3)
    m.CANDIDATES.observe(len(req.item_ids))
    if degraded:  # a degraded answer given (not a failed read that then ended otherwise)
        m.DEGRADED.inc()
    m.HOOKS.gc_timer.flush()  # GC pauses noted since the last request (see GCTimer)
    return response
