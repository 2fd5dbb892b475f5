"""The service's routes (``/v1/score``, ``/v1/events``, health, ``/v1/models``,
``/admin/reload``, ``/metrics``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ctr.bundle import BundleError, graph_inputs
from service import asgi, lifecycle, scoring, tracking
from service import metrics as m
from service.access import (
    HIDDEN_ERROR,
    check_key,
    hide_refusal,
    key_holder,
    load_errors,
    read_body,
    read_json,
)
from service.asgi import AFTER_WRITE, Handler, header_reader, orjson_response, written
from service.errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    StoreDataError,
    StoreRefused,
    StoreUnavailable,
)
from service.features import item_columns, stamp_event
from service.handlers import bad_request
from service.model import ProviderError
from service.openapi import body_schema
from service.requestid import CURRENT
from service.runner import copy_info
from service.schemas import (
    ErrorBody,
    EventResponse,
    ReadyBody,
    ReloadConflict,
    ReloadRequest,
    ReloadResponse,
    ScoreResponse,
)
from service.state import State
from service.store import (
    APPENDED,
    OUTSIDE_WINDOW,
    REDIS_ERRORS,
    SEEN,
    data_error,
    fetch_items,
    refusal,
    refused_code,
)
from service.validate import has_surrogate, parse_event, score_input

log = logging.getLogger("ctr.service")


# the answers every route with a body may give (each route adds its own 5xx, and the
# admin route its 403)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "malformed JSON, or an `Upgrade` request; `ctr serve`: an HTTP/1.1 "
        "request with no `Host`, or one with two (`bad_host`)",
    },
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key (where a key is set)"},
    403: {
        "model": ErrorBody,
        "description": "sent by a web page of an origin not in "
        "CTR_ALLOWED_ORIGINS (`origin_not_allowed`)",
    },
    408: {
        "model": ErrorBody,
        "description": "`ctr serve`: the request's head did not all "
        "arrive within CTR_READ_TIMEOUT_MS (`request_timeout`)",
    },
    413: {"model": ErrorBody, "description": "body over the size limit"},
    415: {
        "model": ErrorBody,
        "description": "a compressed body (`Content-Encoding`, or a `Transfer-Encoding` "
        "other than chunked)",
    },
    422: {"model": ErrorBody, "description": "invalid field (named in `field`)"},
    431: {
        "model": ErrorBody,
        "description": "`ctr serve`: a request head over 64 KB (`header_too_large`)",
    },
    505: {
        "model": ErrorBody,
        "description": "`ctr serve`: an HTTP version other than 1.0 and 1.1 "
        "(`http_version_not_supported`)",
    },
}


def install_routes(app: FastAPI, state: State) -> Handler:
    """The routes; returns the scoring handler, which
    :class:`~service.serving.ServingMiddleware` also serves straight from ASGI."""
    s = state.settings

    def admit() -> float:
        """The request's deadline (``loop.time()`` units), counted from now: once its
        body is read, so that parsing it counts. Raises :class:`Overloaded` at
        ``CTR_MAX_IN_FLIGHT``, before the body is parsed (a shed request costs no parse;
        nothing awaits between this check and :func:`guarded`'s count)."""
        if state.in_flight >= s.max_in_flight:
            raise Overloaded(f"more than {s.max_in_flight} requests in flight", None)
        return asyncio.get_running_loop().time() + s.request_timeout_ms / 1000

    async def guarded(
        deadline: float, work: Callable[[float, bool], Awaitable[Response]]
    ) -> Response:
        """Runs ``work(deadline, idle)`` within the request deadline (``loop.time()``
        units, from :func:`admit`); ``idle``: no other request was in flight when this
        one came in."""
        idle = state.in_flight == 0
        state.in_flight += 1
        m.IN_FLIGHT.inc()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):  # no extra task
                response = await work(deadline, idle)
        except TimeoutError as exc:
            raise _late(s.request_timeout_ms) from exc
        finally:
            state.in_flight -= 1
            m.IN_FLIGHT.dec()
        # the timer fires only at an await: work that blocked the loop past the deadline
        # must not come back as a late 200
        if loop.time() > deadline:
            raise _late(s.request_timeout_ms)
        return response

    @app.post(
        "/v1/score",
        responses={
            200: {"model": ScoreResponse},
            **ERROR_RESPONSES,
            500: {"model": ErrorBody, "description": "a non-finite score (`non_finite_score`)"},
            503: {
                "model": ErrorBody,
                "description": "model not ready (model_not_ready), overloaded (overloaded), "
                "deadline exceeded (deadline_exceeded) or shutting down (shutting_down); "
                "with Retry-After",
            },
        },
        openapi_extra={"requestBody": body_schema("ScoreRequest")},
        summary="Rank candidates for a user",
    )
    async def score(request: Request) -> Response:
        """Through FastAPI's router (where the front door does not answer it: ``ctr
        bench-path``): the after-write action runs once Starlette has sent it."""
        response = await score_handler(header_reader(request), request.stream())
        response.background = BackgroundTask(written, response)  # its write stage too
        return response

    async def score_handler(
        header: Callable[[str], str | None], chunks: AsyncIterator[bytes]
    ) -> Response:
        if s.protect_scoring:
            check_key(state, header)
        body = await read_body(header, chunks, s.max_body_bytes, state)
        deadline = admit()
        t_parse = asgi.STAGE_CLOCK()
        req = score_input(body, s.max_candidates, s.max_id_length, state.codec)
        parse_s = asgi.STAGE_CLOCK() - t_parse  # recorded with the others, once the work ends
        if req.explain and not s.protect_scoring:
            # explain lists the user's behaviours: the key where one is set, open scoring
            # or not (it is the scoring route's one read of a user's history)
            check_key(state, header)
        model = state.require_model()
        response = await guarded(
            deadline,
            lambda deadline, idle: scoring.score(state, model, req, deadline, idle, parse_s),
        )
        impressions = state.impressions
        if impressions is not None:  # what is answered 200 (past the deadline check), once
            # it is written: a client gone meanwhile (499) never saw it, and its rows
            # would read as unclicked
            sources = model.context_sources
            setattr(response, AFTER_WRITE, lambda: impressions.add(
                req.user_id, req.context, response.body, sources))  # fmt: skip
        return response

    @app.post(
        "/v1/events",
        status_code=202,
        responses={
            202: {"model": EventResponse},
            **ERROR_RESPONSES,
            500: {
                "model": ErrorBody,
                "description": "Redis holds a key of another type than "
                "the service writes for this user or item (`store_data_error`), or "
                "refuses the service's credentials or commands (`store_refused`): not "
                "retryable until it is fixed",
            },
            503: {
                "model": ErrorBody,
                "description": "the behaviour store is unavailable or "
                "slow (`store_unavailable`), no model loaded yet (`model_not_ready`), "
                "request bodies still arriving over CTR_MAX_BODY_BUFFER_BYTES "
                "(`overloaded`), or shutting down (`shutting_down`); with Retry-After: "
                "retry with the same event_id",
            },
        },
        openapi_extra={"requestBody": body_schema("EventRequest")},
        summary="Append a behaviour to the user's sequence (idempotent by event_id)",
    )
    async def events(request: Request) -> Response:
        check_key(state, request.headers.get)
        body = await read_json(header_reader(request), request.stream(), s.max_body_bytes, state)
        ev = parse_event(body, s.max_id_length)
        if ev.timestamp > time.time() + s.event_max_future_s:
            # the list is kept in time order: a behaviour from the future would stay the
            # newest for good, and `keep` of them would shut every real event out
            raise BadRequest(
                f"timestamp is more than {s.event_max_future_s:g} s ahead of the server's "
                "clock (unix seconds)",
                "timestamp",
            )
        model = state.require_model()  # the model's config says which fields to store
        if state.event_types and ev.type not in state.event_types:
            return orjson_response({"appended": False, "duplicate": False, "ignored": True}, 202)
        config = model.bundle.config
        payload: dict[str, Any] = {k: v for k, v in ev.features.items() if v is not None}
        if payload and (size := len(orjson.dumps(payload))) > s.event_max_bytes:
            # stored in the history and read (and parsed) with it on every request: one
            # event of a 1 MB body would slow every later score of this user
            raise BadRequest(
                f"features take {size} bytes of JSON (nulls left out), more than "
                f"CTR_EVENT_MAX_BYTES ({s.event_max_bytes}): send the features the models read",
                "features",
            )
        payload[config.item_id_feature.source] = ev.item_id
        # the item features the model's sequences read, as training histories have them
        # (e.g. the clicked item's category): from the event, else cache, else Redis
        items = item_columns(config, [ev.item_id], [payload])
        needed = {t.source for t in config.sequence_targets}
        items.missing = {k: v for k, v in items.missing.items() if k in needed}
        # from Redis, not the item cache: a cached "absent" or an old value written into
        # a behaviour would stay in the user's history for good
        ids = items.ids
        lookups = {src: [ids[k] for k in holes] for src, holes in items.missing.items()}
        assert state.write_reader is not None and state.events is not None
        try:
            # one deadline for the item lookup and the append, on the write clients
            async with asyncio.timeout(s.request_timeout_ms / 1000):
                if lookups:
                    read_at, generation = time.monotonic(), state.item_cache.generation
                    fetched = await fetch_items(state.write_reader, lookups)
                    for source, found in fetched.items():
                        state.item_cache.put(
                            source, lookups[source], found, read_at, generation
                        )
                    items.fill(fetched)
                for k, col in items.values.items():
                    v = col[0]
                    if isinstance(v, str) and has_surrogate(v):  # stored bytes, not UTF-8
                        log.warning("item %s: stored %s is not UTF-8; left out", ev.item_id, k)
                    elif v is not None:
                        payload[k] = v
                stamp_event(payload, needed, ev.type, ev.timestamp)
                outcome = await state.events.append(
                    ev.user_id,
                    ev.event_id,
                    ev.timestamp,
                    payload,
                    s.sequence_keep or config.max_seq_len,
                )
        except REDIS_ERRORS as exc:
            wrong = data_error(exc)
            if wrong is not None:  # a retry meets the same key: say so, not "retry"
                log.error("event not stored: a key read or written for user %r (its "
                          "sequence, or an item's features) holds another type: %s",
                          ev.user_id[:100], wrong)  # fmt: skip
                raise StoreDataError(
                    "the behaviour store holds a key of another type than the service "
                    f"writes for this user or its item ({wrong}); not retryable until it "
                    "is fixed",
                    None,
                ) from exc
            if (refused := refusal(exc)) is not None:  # configuration: no retry helps
                log.error("event not stored: the Redis %s (%s)", refused, str(exc)[:300])
                raise StoreRefused(
                    f"the behaviour store refuses the service{refused_code(exc)}; not "
                    "retryable until the service's Redis settings are fixed",
                    None,
                ) from exc
            log.warning("event not stored (redis): %s: %s", type(exc).__name__, str(exc)[:300])
            raise StoreUnavailable(
                f"the behaviour store is unavailable{refused_code(exc)}; retry", None
            ) from exc
        finally:
            # this worker's next request for the user reads again at once (a timed-out
            # append may still have been written); Redis tells the other workers
            if state.tracker is not None:
                state.tracker.invalidate(ev.user_id)
        body = {"appended": outcome == APPENDED, "duplicate": outcome == SEEN}
        if outcome == OUTSIDE_WINDOW:
            body["outside_window"] = True
        return orjson_response(body, 202)

    # HEAD too: some load balancers' and monitors' checks send it
    # (one route per method: a route of two methods gives both one OpenAPI operationId)
    @app.get("/healthz", summary="Liveness")
    @app.head("/healthz", summary="Liveness", operation_id="healthz_head")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    ready_doc: dict[str, Any] = {
        "summary": "Readiness: model loaded (and Redis reachable with CTR_READY_REQUIRES_REDIS)",
        "responses": {
            200: {
                "model": ReadyBody,
                "description": "ready: `ready` and `model` true; `degraded` true while "
                "Redis does not answer (scoring serves without it)",
            },
            503: {
                "model": ReadyBody,
                "description": "not ready: the same body, with what is missing false",
            },
        },
    }

    @app.get("/readyz", **ready_doc)
    @app.head("/readyz", operation_id="readyz_head", **ready_doc)
    async def readyz(request: Request) -> Response:
        redis_ok = False
        try:
            assert state.redis is not None
            redis_ok = bool(await asyncio.wait_for(state.redis.ping(), s.redis_timeout_ms / 1000))
        except (*REDIS_ERRORS, AssertionError):
            redis_ok = False
        body = {
            # without Redis scoring serves degraded: ready unless the deployment says not
            "ready": state.model is not None and (redis_ok or not s.ready_requires_redis),
            "degraded": not redis_ok,
            "model": state.model is not None,
            # model_error, and fallback (serving an older version: the newest did not load)
            **load_errors(state, request.headers.get),
            "redis": redis_ok,
        }
        if body["ready"]:
            return orjson_response(body)
        return orjson_response(body, 503, {"Retry-After": "1"})  # as every 503 says it

    @app.get(
        "/v1/models",
        summary="The loaded bundle",
        responses={503: {"model": ErrorBody, "description": "no model loaded yet"}},
    )
    async def models(request: Request) -> Response:
        model = state.require_model()
        c = model.bundle.config
        holder = key_holder(state, request.headers.get)

        def note(text: str | None) -> str | None:
            """A note's text (a library's path, a compiler's output) to key holders."""
            return (text if holder else HIDDEN_ERROR) if text else None

        body = {
            "name": model.name,
            "version": model.version,
            "provider": model.provider,
            "runner": model.runner.kind,
            "single_thread_max_candidates": model.single_thread_max,
            "precision": model.precision,
            "precision_note": note(model.precision_note),
            "graph": model.graph,
            "graph_note": note(model.graph_note),
            "graph_ops": model.graph_ops,
            "micro_batching": model.batcher is not None,
            "redis_data": model.redis_data,
            "native_runner": model.native is not None,
            "native_runner_note": note(model.native_note),
            # larger calls at once on its one-thread session (1: one at a time)
            "native_parallel_calls": model.native.parallel if model.native is not None else 0,
            # one copy of the large initializers, read by every session of the model
            "shared_weights": {
                "count": len(model.shared_weights),
                "bytes": sum(w.array.nbytes for w in model.shared_weights),
                "native": model.native.shared_weights if model.native is not None else 0,
                "note": note(model.shared_note),
            },
            "json_encoder": "native" if state.codec is not None else "orjson",
            "gpu_copy": copy_info(model.runner),
            "worker_pid": os.getpid(),
            **{k: v for k, v in load_errors(state, request.headers.get).items()
               if k != "model_error"},  # fmt: skip
            "reload_bus": None
            if state.bus is None
            else {"channel": state.bus.channel, "subscribed": state.bus.subscribed},
            "user_tracking": hide_refusal(tracking.describe(state.tracker, s), note),
            "model_type": c.model.type,
            "max_seq_len": c.max_seq_len,
            "created_at": model.bundle.manifest.get("created_at"),
            "metrics": model.bundle.manifest.get("metrics", {}).get("test"),
            "features": {
                "user": [f.name for f in c.user_sparse + c.user_dense],
                "item": [f.name for f in c.item_sparse + c.item_dense],
                "sequence": [f.name for f in c.sequences],
                # of "user", the ones the request's context alone gives (ctr load stores
                # none: one left out scores as out of vocabulary)
                "context": [f.name for f in c.features if f.side == "context"],
            },
            # the graph's inputs (their names checked against the graph at load), not
            # the manifest's copy, which nothing reads
            "inputs": [dict(i.__dict__) for i in graph_inputs(c)],
            # {feature: [lo, hi]} the graph clamps dense inputs to ({} for older bundles)
            "dense_range": model.bundle.manifest.get("dense_range") or {},
        }
        return orjson_response(body)

    @app.post(
        "/admin/reload",
        responses={
            200: {"model": ReloadResponse},
            409: {
                "model": ReloadConflict,
                "description": "the version could not be loaded; "
                "`serving` is the version the worker still serves",
            },
            **ERROR_RESPONSES,
            403: {
                "model": ErrorBody,
                "description": "admin endpoints are off (CTR_API_KEY unset; "
                "`admin_disabled`), or sent by a web page of an origin not in "
                "CTR_ALLOWED_ORIGINS (`origin_not_allowed`)",
            },
            503: {
                "model": ErrorBody,
                "description": "request bodies still arriving over "
                "CTR_MAX_BODY_BUFFER_BYTES (`overloaded`), or shutting down "
                "(`shutting_down`); with Retry-After",
            },
        },
        openapi_extra={"requestBody": {**body_schema("ReloadRequest"), "required": False}},
        summary="Load a model version, warm it up and swap it in (keeps the old on failure); "
        "the other workers load the same version",
    )
    async def reload(request: Request) -> Response:
        check_key(state, request.headers.get, admin=True)  # before the body is looked at
        # no body means `{}`: the newest version
        obj = await read_json(
            header_reader(request), request.stream(), s.max_body_bytes, state, {}
        )
        try:
            version = ReloadRequest.model_validate(obj).version or "latest"
        except ValidationError as exc:
            raise bad_request(exc.errors()) from exc
        async with state.reload_lock:  # the load and its broadcast, in one turn
            try:
                model = await lifecycle.load(state, version)
            except (BundleError, ProviderError) as exc:
                current = state.model.version if state.model else None
                return orjson_response(
                    {
                        "error": "reload_failed",
                        "field": "version",
                        "detail": str(exc),
                        "serving": current,
                        "request_id": CURRENT.get(),
                    },
                    409,
                )
            peers = await state.bus.publish(model.version) if state.bus is not None else None
        return orjson_response(
            {"name": model.name, "version": model.version, "peers_notified": peers}
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        m.HOOKS.gc_timer.flush()
        m.PROCESS.sample()  # this worker's at the scrape; the others' from their timers
        data, ctype = m.render()
        return Response(data, media_type=ctype)

    return score_handler


def _late(timeout_ms: int) -> DeadlineExceeded:
    return DeadlineExceeded(f"request took longer than {timeout_ms} ms")
