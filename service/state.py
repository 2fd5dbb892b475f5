"""What the app's lifespan owns: settings, the loaded model, the Redis clients, the
caches, the inference executor and the reload machinery (one :class:`State` per app)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from service import metrics as m
from service.callthreads import CallThreads
from service.codec import NativeCodec
from service.errors import ModelNotReady
from service.impressions import ImpressionLog
from service.itemcache import ItemCache
from service.model import LoadedModel
from service.nativerun import NativeRunner
from service.reloadbus import ReloadBus
from service.settings import Settings, origin_key
from service.store import AnyRedis, EventWriter, Reader
from service.throttle import Throttle
from service.tracking import UserTracker

T = TypeVar("T")


class GraphCalls:
    """Graph calls running on the inference executor. A request whose deadline passed
    stops waiting for its call, but a call that has started runs on to its end (one
    still queued is dropped): only the executor's thread knows, so the count is kept
    there."""

    def __init__(self) -> None:
        self.running = 0
        self._lock = threading.Lock()

    def submit(self, executor: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on ``executor``, counted while it runs."""
        if isinstance(executor, CallThreads):
            return executor.call(self._run, fn, *args)
        return asyncio.get_running_loop().run_in_executor(executor, self._run, fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self.running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.running -= 1


class State:
    """Everything the lifespan owns. ``model`` is swapped atomically on reload."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: LoadedModel | None = None
        self.model_error: str | None = None
        self.redis: AnyRedis | None = None
        self.reader: Reader | None = None  # the scoring request's reads
        self.item_cache = ItemCache(
            settings.item_cache_ttl_s,
            settings.item_cache_size,
            settings.item_tracking_hold_ms / 1000,
        )
        self.events: EventWriter | None = None
        self.impressions: ImpressionLog | None = None  # CTR_IMPRESSION_STREAM
        # /v1/events on clients of their own, bounded by the request deadline rather
        # than the scoring reads' short socket timeout: a slow store delays writes, and
        # fails them only past CTR_REQUEST_TIMEOUT_MS
        self.write_redis: AnyRedis | None = None
        self.write_reader: Reader | None = None
        # Redis's invalidations of the cached user rows (None: read on every request)
        self.tracker: UserTracker | None = None
        self.executor: CallThreads | None = None  # the inference threads
        # the candidate-list scan and ranked-items writer in C (None: orjson throughout)
        self.codec: NativeCodec | None = None
        self.event_types = frozenset(
            t.strip() for t in settings.sequence_event_types.split(",") if t.strip()
        )
        self.allowed_origins = frozenset(
            origin_key(o) for o in settings.allowed_origins.split(",") if o.strip()
        )
        self.in_flight = 0
        # body bytes held by requests still arriving (access.read_body), all routes
        self.body_bytes = 0
        self.loads = 0  # models swapped in (lifecycle.load: which of them settle fully)
        # models swapped out, while still alive (lifecycle.load: a full settle frees them)
        self.replaced: list[weakref.ref[LoadedModel]] = []
        self.graph_calls = GraphCalls()  # running on the inference executor
        self.reload_lock = asyncio.Lock()
        self.bus: ReloadBus | None = None
        # set when start-up with CTR_MODEL_VERSION=latest fell back to an older version
        # because the newest does not load (cleared by the next successful load)
        self.fallback: dict[str, Any] | None = None
        # the last load that failed while a model served (a reload, a broadcast's load,
        # a fallback's retry): {"version", "error", "at"}; cleared by the next that loads
        self.reload_error: dict[str, Any] | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # background work (a SIGHUP reload)
        # swapped-out models' native runners, released on threads of their own
        # (lifecycle.load); shutdown waits for those releases
        self.retired: list[NativeRunner] = []
        # the C heap's trim after a swap (service.heaptrim), and how many have run
        self.trim_task: asyncio.Task[None] | None = None
        self.heap_trims = 0
        self.trim_due = 0.0  # loop.time() the pending trim waits for: the last swap's
        self.held_task: asyncio.Task[None] | None = None  # the served model's data-set check
        # the scoring read's failures, logged once per period while they last (Redis
        # down: every request); ctr_errors_total counts each
        self.read_failures = Throttle()
        self.wrong_keys = Throttle()  # reads failed on a key of another type

    def set_fallback(self, fallback: dict[str, Any] | None) -> None:
        """Note (or clear) a start-up fallback, for ``/readyz`` and ``ctr_model_fallback``."""
        self.fallback = fallback
        m.MODEL_FALLBACK.set(0 if fallback is None else 1)

    def require_model(self) -> LoadedModel:
        if self.model is None:
            # why (a path in the model store, a parse error) is for operators: /readyz
            # and the log say it; a caller of the API learns only whether to retry
            why = "it did not load (see /readyz)" if self.model_error else "starting"
            raise ModelNotReady(f"model not loaded: {why}")
        return self.model
