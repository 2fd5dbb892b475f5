"""The FastAPI app. ``create_app()`` reads settings; the lifespan owns the ONNX Runtime
session, the Redis pool and the inference thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctr.bundle import BundleError, graph_inputs
from service import codec, lifecycle, logs, tracking
from service import hup as early_hup
from service import metrics as m
from service.callthreads import CallThreads
from service.codec import items_python
from service.errors import (
    SHUTDOWN_DETAIL,
    AdminDisabled,
    BadRequest,
    CorsRefused,
    DeadlineExceeded,
    NonFiniteScore,
    OriginNotAllowed,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    ShuttingDown,
    StoreDataError,
    StoreRefused,
    StoreUnavailable,
    Unauthorized,
    UnsupportedEncoding,
    UnsupportedUpgrade,
)
from service.features import (
    build_feeds,
    candidates,
    history_items,
    item_columns,
    rows_feeds,
    stamp_event,
)
from service.impressions import ImpressionLog
from service.model import CPU, LoadedModel, ProviderError
from service.nativerun import NativeRunError
from service.openapi import body_schema, install_openapi
from service.reloadbus import MIN_TIMEOUT_S, ReloadBus
from service.requestid import (
    CURRENT,
    HEADER,
    install_log_records,
    request_id,
)
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
from service.settings import Settings, origin_key
from service.state import State
from service.store import (
    APPENDED,
    OUTSIDE_WINDOW,
    REDIS_ERRORS,
    SEEN,
    EventWriter,
    Reader,
    UserData,
    check_refused,
    data_error,
    fetch,
    fetch_items,
    make_client,
    refusal,
    refused_code,
)
from service.throttle import held_note
from service.validate import (
    MAX_DETAIL,
    check_numbers,
    has_surrogate,
    parse_event,
    parse_json,
    safe_field,
    score_input,
)

log = logging.getLogger("ctr.service")

# the clock of the per-stage timings (ctr_stage_duration_seconds); `ctr bench-path` sets
# it to time.thread_time for a while to split the event loop's CPU by stage
STAGE_CLOCK: Callable[[], float] = time.perf_counter
# request methods counted by name; any other (a client's own token) as "other", so that
# clients cannot grow the metric's label set
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# the status recorded for a request whose client went away before its body was read
# (nginx's convention); no response is sent
CLIENT_CLOSED = 499
# set in a request's scope by service.front when the service closed the connection
# because the body did not all arrive within CTR_READ_TIMEOUT_MS: recorded as 408, not 499
READ_TIMED_OUT = "ctr.read_timed_out"
# set likewise when the HTTP parser refused the request's body (a bad chunk size, ...):
# the client got the protocol's 400, recorded as such, not 499
MALFORMED_BODY = "ctr.malformed_body"
# set in a request's scope by service.front when its connection was lost before its
# answer was all written: uvicorn's send to a gone client is silent, so the plain
# protocol's answer would count 200 and log its impression (:func:`_serve`)
CLIENT_GONE = "ctr.client_gone"
# set in a fast route's scope when it is answered through ASGI (uvicorn's own protocol,
# ``CTR_HTTP_FRONT=false``): the task answering it, which service.front.TimedProtocol
# cancels when the connection goes before the answer has begun (as the front's)
SERVE_TASK = "ctr.serve_task"
# set on an unexpected exception once its 500 has been sent
ANSWERED = "ctr_answered"


def gone_status(scope: Scope) -> int:
    """The status recorded for a request that ended with its connection closed before
    its body was read: 408 when the service closed it (the read timeout), 400 when the
    parser refused the body (the protocol's 400 was the answer), else 499."""
    if scope.get(READ_TIMED_OUT):
        return 408
    return 400 if scope.get(MALFORMED_BODY) else CLIENT_CLOSED


def orjson_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


Handler = Callable[[Callable[[str], str | None], AsyncIterator[bytes]], Awaitable[Response]]


class ScoringApp(FastAPI):
    """FastAPI, with the hot route answered at its front door.

    ``POST /v1/score`` (``fast_routes``) is answered before FastAPI's and Starlette's
    middleware stack and router: no telemetry check, no error, telemetry and body-limit
    middlewares (each of which wraps ``send`` again), no request object or dependency
    solving. It calls the same handler the FastAPI route calls, so both behave alike
    (``tests/test_fast_path.py``): a :class:`ServiceError` is rendered by the function
    the app's exception handler uses, and any other exception gets the app's 500 body,
    as from Starlette's error middleware, and is raised on for the server to log.
    Every other request goes through the stack, where :class:`ServingMiddleware` times
    it. FastAPI's own OpenTelemetry instrumentation, if set up, does not see this route.

    Every HTTP request gets its ID here (``service.requestid``), on either path: the
    client's ``X-Request-ID`` where it is a plain token, else one drawn. It is served
    as the ``X-Request-ID`` response header and in the body (``request_id``, errors
    included), and every log record made meanwhile carries it: outside the stack, so
    that the error middleware's 500 has it too."""

    fast_routes: dict[tuple[str, str], Handler]
    read_timeout_s: float = 0.0  # CTR_READ_TIMEOUT_MS, for service.front.TimedProtocol
    allowed_origins: frozenset[str] = frozenset()  # CTR_ALLOWED_ORIGINS (cors_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # always this request's own ID, whatever CURRENT held: a task can inherit a
        # finished request's (uvicorn starts a pipelined request's task inside the
        # previous one's send)
        rid = request_id(_header(scope, HEADER))
        token = CURRENT.set(rid)
        allowed = self.allowed_origins
        extra = cors_headers(allowed, _header(scope, b"origin")) if allowed else []
        send = _with_id(send, [(HEADER, rid.encode()), *extra])
        handler = self.fast_routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await _timed_serve(handler, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
        # reset on a normal return only: an exception keeps the ID for the server's own
        # lines about it, made in this task after the app raised (uvicorn's traceback)
        CURRENT.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` (lower case) header of a request, as text; None if absent."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def _with_id(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, with the ``extra`` headers (``X-Request-ID``, and the CORS headers of
    :func:`cors_headers`, unless the response has them already: a preflight's) added to
    the response's start."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ())]
            if len(extra) > 1 and any(k.lower() == CORS_ORIGIN for k, _ in headers):
                headers.append(extra[0])
            else:
                headers += extra
            message = {**message, "headers": headers}
        await send(message)

    return send_with_id


async def _timed_serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    start = time.perf_counter()
    status = 500
    scope[SERVE_TASK] = asyncio.current_task()  # type: ignore[typeddict-unknown-key]
    try:
        status = await _serve(handler, scope, receive, send)
    except asyncio.CancelledError:  # SERVE_TASK's, as its client went: nothing to answer
        if not scope.get(CLIENT_GONE):
            raise
        status = gone_status(scope)
    finally:
        m.REQUEST(scope["path"], scope["method"], str(status)).observe(time.perf_counter() - start)


class ServingMiddleware:
    """Request duration by route template, method and status (pure ASGI, low overhead).

    ``fast`` routes are answered here, as :class:`ScoringApp` answers its
    ``fast_routes`` (``ctr bench-path`` measures the two places against each other)."""

    def __init__(
        self,
        app: ASGIApp,
        fast: dict[tuple[str, str], Handler] | None = None,
        named: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.fast = fast or {}
        # paths FastAPI serves without a route object in the scope (its docs and schema):
        # labelled as themselves, not "unmatched", which is for unknown paths
        self.named = named

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is not None:
            await _timed_serve(handler, scope, receive, send)
            return
        start = time.perf_counter()
        code = {"status": 500, "started": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                code["status"] = message["status"]
                code["started"] = 1
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # the end of a graceful shutdown's wait: the app's 503 with its request ID
            # where nothing was sent yet (uvicorn answered a plain-text 500), as the
            # fast route does (service.front.serve_direct)
            if code["started"]:
                raise
            code["status"] = 503
            await shutdown_response()(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.named else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            m.REQUEST(route, method, str(code["status"])).observe(time.perf_counter() - start)


def request_headers(scope: Scope) -> dict[str, str]:
    """A request's headers by (lower-case) name, the first of repeated ones (as
    Starlette's ``Headers.get``); a repeated ``Content-Encoding``'s values joined by
    commas, as HTTP reads a list header (:func:`header_reader`)."""
    headers: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.decode("latin-1")
        if name == "content-encoding" and name in headers:
            headers[name] += ", " + v.decode("latin-1")
        else:
            headers.setdefault(name, v.decode("latin-1"))
    return headers


def header_reader(request: Request) -> Callable[[str], str | None]:
    """``request``'s headers as :func:`request_headers` reads them: the first of repeated
    ones, a repeated ``Content-Encoding``'s values joined (``identity`` then ``gzip`` is
    a gzip body)."""

    def get(name: str) -> str | None:
        if name == "content-encoding":
            values = request.headers.getlist(name)
            return ", ".join(values) if values else None
        return request.headers.get(name)

    return get


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks from ASGI ``receive``; ``ClientDisconnect`` if the
    client goes away first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


# what a page of a CTR_ALLOWED_ORIGINS origin may read of an answer besides its body
CORS_EXPOSED = ["x-request-id", "retry-after"]


CORS_ORIGIN = b"access-control-allow-origin"


def cors_headers(allowed: frozenset[str], origin: str | None) -> list[tuple[bytes, bytes]]:
    """The CORS headers of every answer to a page of a ``CTR_ALLOWED_ORIGINS`` origin
    (``allowed``), its errors, a shutdown's 503 and a bug's 500 included: without them
    the browser keeps the answer from the page. Empty for another origin, or none."""
    if origin is None or origin_key(origin) not in allowed:
        return []
    return [
        (CORS_ORIGIN, origin.encode("latin-1")),
        (b"access-control-expose-headers", ", ".join(CORS_EXPOSED).encode()),
        (b"vary", b"Origin"),
    ]


# a response's attribute: what to do once it is written to the client (the impression
# log's entry), run by whoever writes it (:func:`written`)
AFTER_WRITE = "ctr_after_write"
# a scored response's attribute: when its body was built (STAGE_CLOCK), where the
# ``write`` stage begins
WRITE_FROM = "ctr_write_from"


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


def written(response: Response) -> None:
    """``response`` reached the client: the ``write`` stage of a scored one (from its
    body built to its bytes handed to the socket: the deadline check, the access-log
    line, the write), then its :data:`AFTER_WRITE` action, if any."""
    since = getattr(response, WRITE_FROM, None)
    if since is not None:
        m.STAGE("write").observe(STAGE_CLOCK() - since)
    action = getattr(response, AFTER_WRITE, None)
    if action is not None:
        action()


async def answer(handler: Handler, headers: dict[str, str], receive: Receive) -> Response | None:
    """``handler``'s response to the request, or the domain error's it raised; None if
    the client went away before its body was read (nobody to answer). Any other
    exception is raised on: a bug."""
    try:
        return await handler(headers.get, body_chunks(receive))
    except ServiceError as exc:
        return error_response(exc)
    except ClientDisconnect:
        return None


async def _serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> int:
    # the request's ID (CURRENT) and its header: ScoringApp's, which comes in first
    try:
        response = await answer(handler, request_headers(scope), receive)
        if response is None:
            return gone_status(scope)  # counted, not logged as a server error
    except asyncio.CancelledError:
        if scope.get(CLIENT_GONE):  # its connection went (TimedProtocol): _timed_serve's
            raise
        # the end of a graceful shutdown's wait, before anything was sent: the app's
        # 503, not uvicorn's plain-text 500 (as ServingMiddleware and the front do)
        response = shutdown_response()
    except Exception as exc:
        # a bug: the app's 500 (nothing has been sent yet), then raised for the server's
        # log, as Starlette's error middleware does
        await internal_error_response(exc)(scope, receive, send)
        # answered, logged and counted: not again by the error middleware of a stack
        # this route was answered in (`ctr bench-path`)
        with contextlib.suppress(AttributeError):
            setattr(exc, ANSWERED, True)
        raise
    await response(scope, receive, send)
    if scope.get(CLIENT_GONE):  # nobody read it: a client gone, and no impression
        return CLIENT_CLOSED
    written(response)
    return response.status_code


async def _shut_down(state: State, loop: asyncio.AbstractEventLoop, hooked: bool = True) -> None:
    """The lifespan's end: background work cancelled, then the reload bus, the tracking
    connection, the graph threads, the native runner and the Redis clients closed; the
    impression log writes what it holds first (for up to 2 s). Also after a start-up
    that failed part way: what it had not opened yet is None (``hooked``: whether it
    had entered the process hooks)."""
    if state.impressions is not None:
        await state.impressions.close()
    for task in list(state.tasks):  # a SIGHUP reload, the fallback's retries
        task.cancel()
    for task in list(state.tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if state.bus is not None:
        await state.bus.aclose()
    if state.tracker is not None:
        await state.tracker.aclose()
    if state.executor is not None:
        state.executor.shutdown(wait=True)
    if state.model is not None and state.model.native is not None:
        state.model.native.close()  # released once its calls in flight are done
    for runner in state.retired:  # a swap's release must not outlive the process
        await asyncio.to_thread(runner.wait_released, 5.0)
    if hooked:
        m.HOOKS.exit()
    for reader, client in (
        (state.reader, state.redis),
        (state.write_reader, state.write_redis),
    ):
        if reader is not None:
            await reader.aclose()
        if client is not None:
            await client.aclose()
            if isinstance(client, Redis):
                await client.connection_pool.disconnect()
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        loop.remove_signal_handler(signal.SIGHUP)
        # SIG_DFL again would end the process on a SIGHUP before it exits
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _before_handler(sig: int, first: Callable[[], None]) -> Callable[[], None]:
    """Run ``first`` before the Python handler installed for ``sig`` (uvicorn's shutdown).
    Nothing where there is none, or off the main thread (a test's app). Returns what puts
    the handler back (where it is still this one)."""
    prior = signal.getsignal(sig)

    def handler(signum: int, frame: FrameType | None) -> None:
        first()
        prior(signum, frame)  # type: ignore[operator]  # callable: checked below

    def restore() -> None:
        with contextlib.suppress(ValueError):
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prior)

    if callable(prior):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, handler)
    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    early_hup.take_over()  # a worker `ctr serve` spawned: its SIGHUP noted from here on
    settings = settings or Settings()
    settings.check_serving()
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    install_log_records()  # each record names the request it was made for
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter(settings.log_format))
    logging.basicConfig(level=level, handlers=[handler])  # none if logging is set up
    logs.route_stray_output(settings.log_format)
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if dropped := m.forget_dead_workers():
            log.info("metrics of exited workers dropped: pids %s", dropped)
        state.redis = make_client(
            settings.redis_url,
            settings.redis_cluster,
            settings.redis_timeout_ms / 1000,
            settings.redis_connect_timeout_ms / 1000,
            settings.redis_max_connections,
        )
        # SIGHUP (reload) from the start: before its handler is in place the signal's
        # default action would end the process. During start-up a reload waits for the
        # first load; during shutdown it is ignored.
        loop = asyncio.get_running_loop()
        hup = {"phase": "starting", "pending": False}

        def on_hup() -> None:
            if hup["phase"] == "serving":
                lifecycle.spawn(state, lifecycle.reload_quietly(state))
            elif hup["phase"] == "starting":
                hup["pending"] = True
                log.info("SIGHUP during start-up: reloading once the first load is done")
            else:
                log.info("SIGHUP during shutdown: ignored")

        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        # shutdown begins with the server's SIGTERM/SIGINT handler, up to 10 s before the
        # lifespan's end (open connections drain): from then on SIGHUP is ignored too
        restores = [
            _before_handler(sig, lambda: hup.__setitem__("phase", "stopping"))
            for sig in (signal.SIGTERM, signal.SIGINT)
        ]
        # a start-up that fails part way closes what it opened (the graph threads, the
        # Redis clients, the tracker...): they outlived it before (a review, session 46)
        hooked = False
        try:
            if early_hup.pending:  # noted by `ctr serve` before this handler was in place
                early_hup.pending = False
                hup["pending"] = True
            # a Redis that answers and refuses the service (its password, its database) ends
            # the start-up; one that does not answer is served through degraded
            await check_refused(
                state.redis,
                settings.redis_url,
                (settings.redis_connect_timeout_ms + settings.redis_timeout_ms) / 1000,
            )
            # no socket timeout on a scoring read's reply: its request's asyncio.timeout
            # bounds it and LateTimer moves that on a loop that came to it late; redis-py's
            # own timer (CTR_REDIS_TIMEOUT_MS too) cut a read the loop came back to late, the
            # reply in the socket (a degraded answer, Redis idle: soak review, session 45)
            state.reader = Reader(state.redis, settings.redis_max_connections, caller_bounds=True)
            # a burst on a fresh worker finds its connections open (Redis down: none, within
            # the connect timeout)
            await state.reader.warm(
                settings.redis_warm_connections, settings.redis_connect_timeout_ms / 1000
            )
            state.write_redis = make_client(
                settings.redis_url,
                settings.redis_cluster,
                settings.request_timeout_ms / 1000,
                settings.redis_connect_timeout_ms / 1000,
                settings.redis_max_connections,
            )
            state.write_reader = Reader(state.write_redis, settings.redis_max_connections)
            state.executor = CallThreads(settings.inference_concurrency, "ort")
            if settings.reload_channel:
                state.bus = ReloadBus(
                    # its own client: the scoring client's socket timeout is
                    # CTR_REDIS_TIMEOUT_MS (50 ms), under the bus's bound for a Redis that
                    # stalls a moment (a broadcast cut short, a start-up on the wrong version)
                    make_client(
                        settings.redis_url,
                        settings.redis_cluster,
                        max(settings.redis_timeout_ms / 1000, MIN_TIMEOUT_S),
                        settings.redis_connect_timeout_ms / 1000,
                        4,
                    ),
                    settings.redis_url,
                    settings.reload_channel,
                    settings.models_dir,
                    settings.model_name,
                    settings.redis_timeout_ms / 1000,
                    settings.redis_connect_timeout_ms / 1000,
                    state.reload_lock,
                    lambda version: lifecycle.load(state, version),
                    configured=settings.model_version,
                    serving=lambda: state.model.version if state.model is not None else None,
                    agreed=lambda version: lifecycle.agreed(state, version),
                    serving_digest=lambda: (
                        state.model.bundle.manifest.get("onnx_sha256")
                        if state.model is not None
                        else None
                    ),
                    owns_redis=True,
                )
                # before the load: a broadcast meanwhile is caught up; and the deployment's
                # last broadcast version, if it is the one to start on
                deployed = await state.bus.baseline()
            else:
                deployed = None
            # the native JSON codec (service.codec): the custom-op library is built (or
            # found) here, once per process, and the model's fused graph reuses it
            state.codec = await loop.run_in_executor(None, codec.load, settings)
            await lifecycle.start_up(state, deployed)
            state.events = EventWriter(
                state.write_redis,
                settings.event_dedup_window,
                settings.sequence_ttl_s,
                settings.event_legacy_ids,
            )
            state.tracker = await tracking.start_tracking(settings, state.item_cache.changed)
            if state.tracker is None:  # else the tracker says (0 while Redis refuses it)
                m.set_tracking(False)
            if settings.impression_stream:
                state.impressions = ImpressionLog(
                    state.write_redis,
                    settings.impression_stream,
                    settings.impression_maxlen,
                    settings.impression_queue,
                    settings.impression_sample,
                    settings.impression_queue_mb << 20,
                )
                state.impressions.start()
            if state.bus is not None:
                state.bus.start()
            if settings.api_key is None and not _loopback(settings.host):
                log.warning("CTR_API_KEY is not set and the service binds %s: anyone who reaches "
                            "it can append to any user's history (POST /v1/events) and read it "
                            "back with explain; set CTR_API_KEY (and CTR_PROTECT_SCORING)",
                            settings.host)  # fmt: skip
            if (supervisor := multiprocessing.parent_process()) is not None:
                lifecycle.spawn(state, lifecycle.watch_supervisor(supervisor))
            m.PROCESS.sample()  # this worker's memory and CPU in /metrics from the start
            if settings.process_metrics_s > 0:
                lifecycle.spawn(state, m.PROCESS.every(settings.process_metrics_s))
            if settings.loop_lag_interval_ms > 0:
                lifecycle.spawn(state, m.watch_loop_lag(settings.loop_lag_interval_ms / 1000))
            else:  # not watched: unknown, not a reassuring 0
                m.LOOP_LAG_MAX.set(float("nan"))
            if hup["phase"] == "starting":  # not if a SIGTERM came meanwhile: it is stopping
                hup["phase"] = "serving"
            if hup["pending"] and hup["phase"] == "serving":
                lifecycle.spawn(state, lifecycle.reload_quietly(state))
            app.state.ctr = state
            m.HOOKS.enter(settings.switch_interval_ms / 1000)
            hooked = True
            yield
        finally:
            hup["phase"] = "stopping"
            try:
                await _shut_down(state, loop, hooked)
            finally:
                m.forget_this_worker()  # whatever the steps before raised
                for restore in restores:
                    restore()

    app = ScoringApp(
        title="CTR scoring service",
        version="0.1.0",
        description="Scores candidate items for a user with a DIN/DIEN model (ONNX Runtime).",
        lifespan=lifespan,
    )
    app.state.ctr = state
    # an unknown path is a 404, also with a trailing slash: Starlette's redirect to the
    # path without it names http:// whatever the client used (a TLS proxy's clients)
    app.router.redirect_slashes = False
    _install_handlers(app)
    score = _install_routes(app, state)
    app.fast_routes = {("POST", "/v1/score"): score}
    app.read_timeout_s = settings.read_timeout_ms / 1000  # service.front.TimedProtocol
    app.allowed_origins = state.allowed_origins
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    # and the routes' own paths, for what is answered before routing (CORS preflights)
    paths = {getattr(r, "path", "") for r in app.routes}
    named = frozenset(p for p in (*docs, *paths) if p and "{" not in p)
    if state.allowed_origins:  # their pages' preflights, and answers they may read
        app.add_middleware(
            OriginCORS,
            allow_origins=sorted(state.allowed_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["content-type", "x-api-key", "x-request-id"],
            expose_headers=CORS_EXPOSED,
            max_age=600,
        )
    app.add_middleware(ServingMiddleware, named=named)  # times every other request
    install_openapi(
        app, settings.max_id_length, settings.api_key is not None, settings.protect_scoring
    )
    return app


# what a refused preflight asked for, as Starlette names it -> the header that asked
PREFLIGHT_FIELDS = {
    "origin": "Origin",
    "method": "Access-Control-Request-Method",
    "headers": "Access-Control-Request-Headers",
    "private-network": "Access-Control-Request-Private-Network",
}


class OriginCORS(CORSMiddleware):
    """Starlette's CORS with origins compared as the service compares them
    (:func:`~service.settings.origin_key`: case, a trailing slash, a default port): a
    preflight from ``https://Tools.example.com:443`` was refused while the request it
    announced was served. A refused preflight answers the service's JSON error body
    naming the header (403 ``origin_not_allowed`` as the request would get, else 400
    ``cors_refused``), not Starlette's plain text."""

    def is_allowed_origin(self, origin: str) -> bool:
        return origin_key(origin) in self.allow_origins

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        said = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        asked = [PREFLIGHT_FIELDS.get(f, f) for f in said.split(", ")]
        origin = request_headers.get("origin", "")
        if asked[0] == "Origin":
            exc: ServiceError = OriginNotAllowed(
                f"requests from web pages of origin {origin[:100]!r} are not served (a "
                "page could change or read users' data): add it to CTR_ALLOWED_ORIGINS",
                "Origin",
            )
        else:
            exc = CorsRefused(
                f"the preflight asks for a method or headers this service does not take "
                f"({', '.join(asked)}): methods {', '.join(self.allow_methods)}; headers "
                f"{', '.join(sorted(self.allow_headers))}",
                asked[0],
            )
        answer = error_response(exc)
        for name, value in response.headers.items():  # the CORS headers it had
            if name.startswith("access-control-") or name == "vary":
                answer.headers[name] = value
        return answer


def _loopback(host: str) -> bool:
    """Whether ``host`` (``CTR_HOST``, which ``ctr serve`` sets to the address it binds)
    is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to be local
        return False


def error_response(exc: ServiceError) -> Response:
    """The JSON error body for a domain error (counted in ``ctr_errors_total``), with
    the ID of the request it answers."""
    m.ERRORS.labels(exc.kind).inc()
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    field = safe_field(exc.field) if exc.field else exc.field
    body = {
        "error": exc.kind,
        "field": field,
        "detail": safe_field(exc.message, MAX_DETAIL),
        "request_id": CURRENT.get(),
    }
    return orjson_response(body, exc.status, headers)


def shutdown_response() -> Response:
    """The answer to a request the graceful shutdown cancelled before it was answered
    (503 ``shutting_down``, Retry-After), logged as such; uvicorn's own was a plain-text
    500 without the request's ID, and a traceback of the cancellation."""
    log.warning("request cancelled by the shutdown before it was answered")
    return error_response(ShuttingDown(SHUTDOWN_DETAIL))


def internal_error_response(exc: Exception) -> Response:
    """The 500 for a bug: the same JSON body as every error, no internals in it. Logged
    here in one line that names the request (the server logs the traceback after)."""
    log.error("internal error answered with a 500: %s: %s", type(exc).__name__, exc)
    return error_response(
        ServiceError(f"internal error ({type(exc).__name__}); see the service log")
    )


def bad_request(errors: Sequence[Any], skip: int = 0) -> BadRequest:
    """The first of pydantic's ``errors`` as a 422 naming its field (the path after the
    first ``skip`` parts of its location)."""
    first = errors[0] if errors else {}
    path = ".".join(str(p) for p in first.get("loc", ())[skip:])
    if first.get("type") == "extra_forbidden":  # as the scoring body's (validate.py)
        name = path or '""'
        return BadRequest(f"unknown field {name!r}", name)
    field = path or "body"
    # a validator's own message, without pydantic's "Value error, " before it
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return BadRequest(f"{field}: {msg}", field)


def routing_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's 404 (no such path) or 405 (a method the path does not take) in the
    body every error of the service has (FastAPI's was ``{"detail": "Not Found"}``,
    without the request's ID: the one answer a client could not read as the others).
    Not counted in ``ctr_errors_total``: a scanner's paths are no service error (the
    request metrics time them under the route ``unmatched``)."""
    path = safe_field(str(request.scope.get("path", "")), 200)
    if exc.status_code == 404:
        kind, detail = "not_found", f"no such path: {path} (the API is listed at /docs)"
    else:
        allow = (exc.headers or {}).get("Allow", "")
        kind = "method_not_allowed"
        detail = f"{safe_field(request.method, 20)} is not allowed on {path}" + (
            f": use {allow}" if allow else ""
        )
    body = {"error": kind, "field": None, "detail": detail, "request_id": CURRENT.get()}
    return orjson_response(body, exc.status_code, exc.headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(bad_request(exc.errors(), skip=1))  # loc[0]: body, query…

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """An unknown path's 404 or a method's 405 (:func:`routing_error`), a 405's
        ``Allow`` naming every method the path takes: the route that matched first
        names its own (GET and HEAD are two routes here, to keep their OpenAPI operation
        IDs apart, and Allow said GET only)."""
        if exc.status_code == 405:
            path = request.scope.get("path")
            methods = {
                m for r in app.router.routes if getattr(r, "path", None) == path
                for m in (getattr(r, "methods", None) or ())
            }  # fmt: skip
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        if exc.status_code in (404, 405):
            return routing_error(request, exc)
        return await http_exception_handler(request, exc)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=gone_status(request.scope))  # not sent: it has gone

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        """A bug, not a domain error: the same JSON body as every error, with no internals
        in it (Starlette's error middleware re-raises it after, so the server logs the
        traceback)."""
        if getattr(exc, ANSWERED, False):  # a fast route's, answered in the stack: not sent
            return Response(status_code=500)
        return internal_error_response(exc)


async def _read_body(
    header: Callable[[str], str | None], chunks: AsyncIterator[bytes], limit: int, state: State
) -> bytes:
    """The request body's bytes; ``header(name)`` reads a (lower-case) request header.
    The bytes of all bodies still arriving are counted in ``state.body_bytes``: past
    ``CTR_MAX_BODY_BUFFER_BYTES`` the request is refused (503 ``overloaded``), as many
    connections each holding a stalled body up to the size limit grew the worker
    without bound (``CTR_MAX_IN_FLIGHT`` counts a request once its body is read). A
    request a web page sent from an origin not in ``CTR_ALLOWED_ORIGINS`` is refused
    before its body is read (cross-site request forgery, DNS rebinding).
    A body sent compressed (``Content-Encoding`` other than ``identity``) is refused
    before it is read: read as JSON it would only be malformed. A request that asks to
    switch protocols (``Upgrade``) and whose body did not come is refused too: uvicorn's
    parser reads no body after such a head (whatever ``Connection`` headers made it one),
    which would otherwise be answered as an empty body."""
    origin = header("origin")  # browsers send it with every POST (same-origin ones too)
    if origin is not None and not _origin_allowed(origin, header("host"), state):
        raise OriginNotAllowed(
            f"requests from web pages of origin {origin[:100]!r} are not served (a page "
            "could change or read users' data): add it to CTR_ALLOWED_ORIGINS",
            "Origin",
        )
    coding = header("transfer-encoding")  # "gzip, chunked": the parser undoes only chunked
    if coding is not None and any(
        c.strip().lower() not in ("", "chunked", "identity") for c in coding.split(",")
    ):
        raise UnsupportedEncoding(
            f"Transfer-Encoding {coding!r} is not supported: send the body uncompressed, "
            "with a Content-Length or chunked",
            "Transfer-Encoding",
        )
    encoding = header("content-encoding")  # a list: "identity, gzip" is a gzip body
    if encoding is not None and any(
        coding.strip().lower() not in ("", "identity") for coding in encoding.split(",")
    ):
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
            "Content-Encoding",
        )
    length = header("content-length")
    if length is not None and length.isascii() and length.isdigit():
        # 20 digits and more are over any limit (and past 4,300 int() would refuse them);
        # leading zeros are HTTP's too
        digits = length.lstrip("0")
        if len(digits) > 19 or int(digits or "0") > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", "body")
    body = bytearray()
    cap = state.settings.max_body_buffer_bytes
    try:
        async for chunk in chunks:
            body.extend(chunk)
            state.body_bytes += len(chunk)
            if len(body) > limit:
                raise PayloadTooLarge(f"body is larger than {limit} bytes", "body")
            if state.body_bytes > cap:
                raise Overloaded(
                    f"request bodies still arriving hold more than {cap} bytes "
                    "(CTR_MAX_BODY_BUFFER_BYTES)",
                    None,
                )
    finally:
        state.body_bytes -= len(body)
    if header("upgrade") is not None and (
        not body or (length is not None and length.strip().lstrip("0") != str(len(body) or ""))
    ):
        raise UnsupportedUpgrade(
            "a request asking to switch protocols (Upgrade) is not served, and its body did "
            "not reach the service: send it as plain HTTP/1.1, without Upgrade",
            "Upgrade",
        )
    return bytes(body)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _origin_allowed(origin: str, host: str | None, state: State) -> bool:
    """``origin`` is in ``CTR_ALLOWED_ORIGINS``, or is the service's own page on a
    loopback name (``/docs``' "Try it out" at ``http://localhost:8000``). Another own
    origin is not enough: a DNS-rebinding page is same-origin with the service under its
    own host name, which ``Host`` then carries."""
    origin = origin_key(origin)
    if origin in state.allowed_origins:
        return True
    scheme, _, authority = origin.partition("://")
    name = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    return (
        scheme in ("http", "https")
        and host is not None
        and authority == host.strip().lower()
        and name in LOOPBACK_NAMES
    )


async def _read_json(
    header: Callable[[str], str | None],
    chunks: AsyncIterator[bytes],
    limit: int,
    state: State,
    empty: Any = ...,
) -> Any:
    """The request body as JSON; ``header(name)`` reads a (lower-case) request header;
    ``state.codec``'s C walk looks for repeated keys (None: Python does). An empty body
    is an error unless ``empty`` is given: then it stands for it."""
    body = await _read_body(header, chunks, limit, state)
    if not body and empty is not ...:
        return empty
    return parse_json(body, state.codec)


def _check_key(state: State, header: Callable[[str], str | None], admin: bool = False) -> None:
    key = state.settings.api_key
    if key is None:
        if admin:
            raise AdminDisabled("admin endpoints need CTR_API_KEY to be set", "X-API-Key")
        return
    given = header("x-api-key") or ""
    # header values arrive as latin-1 text: back to the bytes sent, against the key's UTF-8
    if not hmac.compare_digest(given.encode("latin-1"), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key", "X-API-Key")


HIDDEN_ERROR = "hidden: send X-API-Key to read it"


def _hide_refusal(
    described: dict[str, Any], note: Callable[[str | None], str | None]
) -> dict[str, Any]:
    """``/v1/models``' ``user_tracking`` with Redis's refusal shown to key holders only
    (it may name an ACL user or a command)."""
    if described.get("refused"):
        described["refused"] = note(described["refused"])
    return described


def _key_holder(state: State, header: Callable[[str], str | None]) -> bool:
    """Whether the caller may read a load error's text (file paths, the store's layout):
    anyone where no ``CTR_API_KEY`` is set, else who sends it."""
    try:
        _check_key(state, header)
    except Unauthorized:
        return False
    return True


def _load_errors(state: State, header: Callable[[str], str | None]) -> dict[str, Any]:
    """``model_error``, ``fallback`` and ``reload_error`` as ``/readyz`` and
    ``/v1/models`` show them: their error text only to a key holder (the health routes
    need no key)."""
    error, fallback, reload = state.model_error, state.fallback, state.reload_error
    if not _key_holder(state, header):
        error = None if error is None else HIDDEN_ERROR
        fallback = None if fallback is None else {**fallback, "error": HIDDEN_ERROR}
        reload = None if reload is None else {**reload, "error": HIDDEN_ERROR}
    return {"model_error": error, "fallback": fallback, "reload_error": reload}


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


def _install_routes(app: FastAPI, state: State) -> Handler:
    """The routes; returns the scoring handler, which :class:`ServingMiddleware` also
    serves straight from ASGI."""
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
            _check_key(state, header)
        body = await _read_body(header, chunks, s.max_body_bytes, state)
        deadline = admit()
        t_parse = STAGE_CLOCK()
        req = score_input(body, s.max_candidates, s.max_id_length, state.codec)
        parse_s = STAGE_CLOCK() - t_parse  # recorded with the others, once the work ends
        if req.explain and not s.protect_scoring:
            # explain lists the user's behaviours: the key where one is set, open scoring
            # or not (it is the scoring route's one read of a user's history)
            _check_key(state, header)
        model = state.require_model()
        response = await guarded(
            deadline, lambda deadline, idle: _score(state, model, req, deadline, idle, parse_s)
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
        _check_key(state, request.headers.get)
        body = await _read_json(header_reader(request), request.stream(), s.max_body_bytes, state)
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
            **_load_errors(state, request.headers.get),
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
        holder = _key_holder(state, request.headers.get)

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
            **{k: v for k, v in _load_errors(state, request.headers.get).items()
               if k != "model_error"},  # fmt: skip
            "reload_bus": None
            if state.bus is None
            else {"channel": state.bus.channel, "subscribed": state.bus.subscribed},
            "user_tracking": _hide_refusal(tracking.describe(state.tracker, s), note),
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
        _check_key(state, request.headers.get, admin=True)  # before the body is looked at
        # no body means `{}`: the newest version
        obj = await _read_json(
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


def _late(timeout_ms: int) -> DeadlineExceeded:
    return DeadlineExceeded(f"request took longer than {timeout_ms} ms")


async def _score(
    state: State, model: LoadedModel, req: Any, deadline: float, idle: bool, parse_s: float
) -> Response:
    """Score ``req`` before ``deadline`` (``loop.time()`` units); ``idle``: it came in
    to a worker with no other request in flight; ``parse_s``: its body's parse, recorded
    with the other stages (a request refused after the parse, 503 not ready or 401 for
    explain, adds to no stage)."""
    s = state.settings
    t0 = STAGE_CLOCK()
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
    t_read = STAGE_CLOCK()  # the candidates mapped: feature work, not the read's
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
            t_fetched = STAGE_CLOCK()
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
            t_fetched = STAGE_CLOCK()
    t1 = STAGE_CLOCK()
    # rows with a missing feature because the store failed are not cached, nor rows
    # whose values may predate an item hash write reported meanwhile
    fresh = state.item_cache.generation == generation
    cands.finish(bundle, model.rows, cacheable=fresh and not (degraded and lookups))
    if rows is not None:
        m.ROWS("tracked").inc()
        prepared = rows_feeds(bundle, rows, cands.sparse, cands.dense)
        t2 = STAGE_CLOCK()  # the yield below is others' work: the inference stage's wait
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
        t2 = STAGE_CLOCK()
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
    t3 = STAGE_CLOCK()
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
        "request_id": CURRENT.get(),  # set where the request came in (_serve)
        "degraded": degraded,
        "cold_start": not prepared.found and not degraded,
        "items": items,
    }
    response = orjson_response(body)
    t4 = STAGE_CLOCK()
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
