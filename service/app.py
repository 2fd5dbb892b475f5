"""The FastAPI app. ``create_app()`` reads settings; the lifespan owns the ONNX Runtime
session, the Redis pool and the inference thread pool. The routes are in
:mod:`service.routes` (the scoring path in :mod:`service.scoring`), the error answers in
:mod:`service.handlers`, the ASGI serving in :mod:`service.serving` and
:mod:`service.asgi`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType

from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from service import codec, lifecycle, logs, tracking
from service import hup as early_hup
from service import metrics as m
from service.asgi import CORS_EXPOSED, Handler, cors_headers, header, with_id
from service.callthreads import CallThreads
from service.handlers import install_handlers
from service.impressions import ImpressionLog
from service.openapi import install_openapi
from service.reloadbus import MIN_TIMEOUT_S, ReloadBus
from service.requestid import CURRENT, HEADER, install_log_records, request_id
from service.routes import install_routes
from service.serving import OriginCORS, ServingMiddleware, timed_serve
from service.settings import Settings
from service.state import State
from service.store import EventWriter, Reader, check_refused, make_client

log = logging.getLogger("ctr.service")


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
        rid = request_id(header(scope, HEADER))
        token = CURRENT.set(rid)
        allowed = self.allowed_origins
        extra = cors_headers(allowed, header(scope, b"origin")) if allowed else []
        send = with_id(send, [(HEADER, rid.encode()), *extra])
        handler = self.fast_routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await timed_serve(handler, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
        # reset on a normal return only: an exception keeps the ID for the server's own
        # lines about it, made in this task after the app raised (uvicorn's traceback)
        CURRENT.reset(token)


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
    state.item_cache.close()
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
            state.tracker = await tracking.start_tracking(settings, state.item_cache.reported)
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
    install_handlers(app)
    score = install_routes(app, state)
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
