"""Service settings from ``CTR_*`` environment variables (read in ``create_app``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# the longest CTR_SEQUENCE_TTL_S: ten years
MAX_TTL_S = 10 * 365 * 24 * 3600
# the largest count passed to Redis (LTRIM through the append script's Lua numbers, XADD
# MAXLEN): 1e17 already printed as "1e+17" there and every /v1/events was a 503
MAX_REDIS_COUNT = 10**14


# setting -> (its shortest value above 0, what its 0 means)
OFF_OR_AT_LEAST: dict[str, tuple[float, str]] = {
    "loop_lag_interval_ms": (10, "off"),
    "process_metrics_s": (0.1, "start and scrapes only"),
    "user_tracking_drain_ms": (1, "read whenever readable"),
}


class Settings(BaseSettings):
    # hide_input_in_errors: an error names the setting, never its value (a key, a
    # password in a URL)
    model_config = SettingsConfigDict(env_prefix="CTR_", extra="ignore", hide_input_in_errors=True)

    models_dir: str = Field("models", description="model store root")
    model_name: str = Field("din", description="bundle name under models_dir")
    model_version: str = Field("latest", description="a version number or 'latest'")
    manifest_child_bytes: int = Field(
        8_000_000,
        ge=0,
        description="a manifest of at least this many bytes (a vocabulary of a few hundred "
        "thousand entries) is read, checked and digested in a child process at a load or "
        "reload, so that the worker keeps serving meanwhile (0 = always in the worker)",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_cluster: bool = Field(False, description="the URL names a Redis Cluster node")
    redis_timeout_ms: int = Field(
        50,
        gt=0,
        description="a scoring request's Redis read (its own timer, moved on a late loop; "
        "the socket timeout of the service's other Redis calls and of a Cluster's reads)",
    )
    redis_connect_timeout_ms: int = Field(200, gt=0, description="connect timeout")
    ready_requires_redis: bool = Field(
        False,
        description="/readyz answers 503 while Redis does not answer (false: 200 with "
        "`degraded: true`, as the scoring route still serves then; a readiness probe that "
        "failed on a shared Redis would take every replica out at once)",
    )
    redis_max_connections: int = Field(
        64,
        gt=0,
        description="connections per worker, for the scoring reads and, separately, for "
        "everything else (events, readiness)",
    )
    redis_warm_connections: int = Field(
        64,
        ge=0,
        description="scoring-read connections a worker opens at start-up (at most "
        "CTR_REDIS_MAX_CONNECTIONS), so that a burst on a fresh worker does not open them "
        "inside its reads' budget; 0: opened by the first requests",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="ORT execution provider")
    require_gpu: bool = Field(False, description="refuse to start on a CPU fallback")
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0 = ORT default)")
    intra_op_spin: Literal["run", "always", "never"] = Field(
        "run",
        description="ORT pool threads busy-wait: during a run only, also between runs "
        "(ORT's default; steals CPU from the event loop), or never",
    )
    inference_concurrency: int = Field(1, gt=0, le=256, description="ORT runs in flight per worker")
    inline_max_ms: float = Field(
        10.0,
        ge=0,
        description="CPU only: a scoring request that came in to an idle worker and is still "
        "alone in flight, with no graph call running on the ORT thread, runs its own on "
        "the event loop thread (no hand-off to the ORT thread and back) when the call is "
        "expected (from this worker's recent calls of about that many candidates) to take "
        "at most this many ms and to end before the request's deadline; a request "
        "arriving meanwhile waits for it (0 = always hand off)",
    )
    single_thread_max_candidates: int = Field(
        64,
        ge=0,
        description="CPU only: graph calls with at most this many candidates run on a second "
        "session with one intra-op thread (no pool thread to wake; 0 = off)",
    )
    share_weights_min_bytes: int = Field(
        65536,
        ge=0,
        description="CPU only: the served graph's initializers of at least this many bytes "
        "(its embedding tables) are read once and shared by all of the model's sessions "
        "instead of each holding its own copy (0 = off)",
    )
    native_parallel_calls: int = Field(
        2,
        ge=1,
        le=16,
        description="CPU, native runner, with the one-thread session, where the main "
        "session has at most this many intra-op threads: a call of more than "
        "CTR_SINGLE_THREAD_MAX_CANDIDATES candidates that comes while other requests are in flight "
        "runs on the one-thread session, up to this many such at once (1 = off); a call "
        "alone keeps the main session's threads",
    )
    native_runner: bool = Field(
        True,
        description="CPU only: plain scoring calls (not explain, not micro-batched) run on "
        "native threads through ORT's C API, which never wait for the GIL (a Python "
        "thread per call otherwise); the sessions are checked against the Python ones at "
        "load, and the Python runner serves if they do not or the library cannot be built",
    )
    io_binding: bool = Field(
        False,
        description="bind inputs/outputs per call (slower than a plain run on the H100 "
        "measured; CUDA graphs bind fixed buffers once instead)",
    )
    cuda_graph: bool = Field(
        False, description="replay CUDA graphs per (users, candidates) bucket (CUDA only)"
    )
    cuda_graph_streams: int = Field(
        1,
        ge=1,
        le=8,
        description="CUDA-graph runners, each its own session and CUDA stream, so a "
        "batch can start while another is on the GPU",
    )
    cuda_graph_buckets: str = Field(
        "64,128,256,512,1024,2048,4096", description="candidate counts N with a CUDA graph"
    )
    gpu_copy: Literal["ort", "direct"] = Field(
        "ort",
        description="CUDA graphs: copies into and out of the fixed buffers through ORT "
        "(holds the GIL while the copy waits on the driver) or direct: cudaMemcpy "
        "through ctypes, which releases it; checked against ORT's at load, falls back "
        "to ort (not yet measured on a GPU; docs/benchmarks.md 3.4)",
    )
    cuda_graph_user_buckets: str = Field(
        "1,2,4,8,16", description="user counts U with a CUDA graph (micro-batches)"
    )
    fused_ops: Literal["auto", "on", "off"] = Field(
        "auto",
        description="serve the bundle's fused graph (DIN's attention unit, DIEN's AUGRU and "
        "attention unit as custom-op nodes; on CUDA only the ops with a CUDA kernel) "
        "after a parity check against model.onnx: auto = when the bundle has one; on = "
        "also say why not when it has none; off = never",
    )
    ops_library: str = Field(
        "",
        description="a prebuilt custom-op library file, or a folder of CPU levels "
        "(`ctr build-ops --arch ... --out DIR`: the highest level this CPU supports is "
        "loaded); empty: build native/ into $CTR_OPS_CACHE when needed",
    )
    native_json: Literal["auto", "off"] = Field(
        "auto",
        description="read a plain candidate list from the body's bytes and write the ranked "
        "items with the custom-op library's C functions (native/codec.cc; the same answers "
        "as orjson, checked at start; orjson where it cannot be built or loaded): auto = "
        "when available; off = orjson",
    )
    precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="fp16: convert at load, serve it only within 1e-3 of fp32"
    )
    batch_max_users: int = Field(
        1, gt=0, description="users per graph call across requests (1 = no micro-batching)"
    )
    batch_max_candidates: int = Field(4096, gt=0, description="candidates per batched call")
    batch_wait_ms: float = Field(
        0.0, ge=0, le=50, description="extra wait for a micro-batch to fill (0 = none)"
    )
    switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="how long a thread may hold the GIL while another waits for it "
        "(Python's default is 5 ms: a finished ORT run could wait that long for the "
        "event loop's thread to let go)",
    )
    max_candidates: int = Field(2000, gt=0, description="most candidates per request")
    max_body_bytes: int = Field(1_000_000, gt=0, description="request body size limit")
    max_id_length: int = Field(
        256,
        gt=0,
        description="longest user/item/event ID accepted, and longest string value of a "
        "feature or context key",
    )
    sequence_keep: int = Field(
        0, ge=0, le=MAX_REDIS_COUNT, description="events kept per user (0 = model's L)"
    )
    allowed_origins: str = Field(
        "",
        description="comma-separated origins (scheme://host[:port]) whose web pages may "
        "send requests with a body (a request carrying an Origin header not listed is a 403 "
        "origin_not_allowed; API clients send none); empty: none may",
    )
    sequence_event_types: str = Field(
        "", description="comma-separated event types appended to sequences (empty = all)"
    )
    event_dedup_window: int = Field(
        1000,
        gt=0,
        le=MAX_REDIS_COUNT,
        description="event IDs remembered per user (at least the events kept: a retry of a "
        "kept event is always known)",
    )
    event_legacy_ids: bool = Field(
        True,
        description="also check and write the event IDs where releases before session 27 "
        "keep them ({u:<id>}:events), so that a retry reaching a worker of such a release "
        "(a rolling deploy, a rollback) is known; off once none runs: half the dedup "
        "memory and less Redis time per event",
    )
    impression_stream: str = Field(
        "",
        max_length=512,
        description="Redis stream that every scored response is added to (the impression "
        "log: user, context, the response as served; service.impressions); empty = off",
    )
    impression_sample: float = Field(
        1.0, gt=0, le=1, description="share of scored responses the impression log keeps"
    )
    impression_maxlen: int = Field(
        100_000,
        gt=0,
        le=MAX_REDIS_COUNT,
        description="entries the impression stream keeps (XADD MAXLEN ~): each holds its "
        "response body, about 7.5 KB of Redis memory for 100 ranked items",
    )
    impression_queue: int = Field(
        10_000,
        gt=0,
        description="impressions held in memory while Redis is slow or down; beyond "
        "them new ones are dropped (ctr_impressions_dropped_total)",
    )
    impression_queue_mb: int = Field(
        64,
        gt=0,
        description="the most memory the queued impressions (their contexts and response "
        "bodies) take per worker; beyond it new ones are dropped (queue_full)",
    )
    event_max_bytes: int = Field(
        4096,
        ge=256,
        description="an event whose features take more than this many bytes of JSON is a "
        "422 naming features (each is stored in the user's history and read with it)",
    )
    event_max_future_s: float = Field(
        300.0,
        ge=0,
        description="an event timestamp further ahead of this server's clock is a 422 (it "
        "would stay the newest behaviour for good)",
    )
    sequence_ttl_s: int = Field(
        0,
        ge=0,
        le=MAX_TTL_S,
        description="a user's behaviours and event IDs expire this long after the user's "
        "last event (0 = never; at most 10 years: Redis refuses an EXPIRE past its clock's "
        "range, and the append script's numbers print exactly below 1e14)",
    )
    max_in_flight: int = Field(64, gt=0, description="requests in flight per worker before 503")
    max_body_buffer_bytes: int = Field(
        64_000_000,
        gt=0,
        description="request body bytes a worker holds for requests still arriving, all "
        "together, before it refuses more with 503 overloaded (CTR_MAX_IN_FLIGHT counts a "
        "request once its body is read: stalled 1 MB bodies on many connections grew a "
        "worker without bound)",
    )
    request_timeout_ms: int = Field(1000, gt=0, description="per-request deadline")
    item_cache_ttl_s: float = Field(60.0, ge=0, description="item-feature cache TTL (0 = off)")
    item_cache_size: int = Field(200_000, gt=0, description="item-feature cache entries")
    user_cache_size: int = Field(
        20_000,
        ge=0,
        description="users whose encoded rows are kept, reused only while their profile, "
        "stored behaviours and request context are unchanged (0 = off)",
    )
    user_tracking: bool = Field(
        True,
        description="skip the Redis read for a user whose cached rows no write has touched "
        "since they were read: Redis CLIENT TRACKING (BCAST on the user keys) tells each "
        "worker of every change; single-node redis:// and unix:// only, and only with "
        "CTR_USER_CACHE_SIZE > 0 (false: read on every request)",
    )
    item_tracking: bool = Field(
        True,
        description="with user tracking on, track the item-feature hashes (ctr:item:*) "
        "too: a write Redis reports to one drops the worker's cached values of that "
        "feature and every encoded candidate row (at once after a quiet "
        "CTR_ITEM_TRACKING_HOLD_MS, else at its end), so a changed catalogue is scored "
        "on every worker within milliseconds, or that hold, instead of within "
        "CTR_ITEM_CACHE_TTL_S (false: the TTL alone)",
    )
    item_tracking_hold_ms: float = Field(
        1000.0,
        ge=0,
        le=60_000,
        description="item-hash reports applied at most once per this many ms: the first "
        "after a quiet period at once, the rest together at the period's end, so a writer "
        "that changes item features many times a second empties the caches about once a "
        "period, and a served item value is at most this much older than Redis's "
        "(0 = every report at once)",
    )
    user_tracking_drain_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="how the tracking connection is read: 0 = whenever it is readable (each "
        "invalidation message wakes the worker); above 0 = only before a request trusts or "
        "reads a user's rows, and every this many ms (a worker woken at most that often "
        "by other users' writes; at least 1 when above 0)",
    )
    explain_top: int = Field(3, gt=0, description="history items returned per item by explain")
    api_key: SecretStr | None = Field(None, description="key for write/admin endpoints")
    reload_channel: str = Field(
        "ctr:reload",
        description="Redis pub/sub channel on which POST /admin/reload reaches the other "
        "workers of the deployment (empty = this worker only)",
    )
    protect_scoring: bool = Field(False, description="require the API key for scoring too")
    host: str = Field("0.0.0.0", description="bind address for `ctr serve`")
    port: int = Field(8000, ge=0, le=65535, description="port for `ctr serve`")
    workers: int = Field(1, gt=0, description="uvicorn worker processes for `ctr serve`")
    worker_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="with several workers, how long a SIGHUP restart waits for each new "
        "worker to be ready (its model loaded) before it gives up and keeps the old ones",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="log level (`trace`: uvicorn's, and `debug` for the service's own)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text`: `LEVEL:logger:message request_id=<id>` (uvicorn's own lines "
        "as uvicorn writes them, its access lines with the request's ID at the end); "
        "`json`: every line one JSON object with time, level, logger, message and "
        "request_id (access lines with client, method, path and status too)",
    )
    http_front: bool = Field(
        True,
        description="`ctr serve`: uvicorn's HTTP protocol with `POST /v1/score` served "
        "without the ASGI layers (service.front; where httptools is installed); off: "
        "uvicorn's own protocol, every request through ASGI",
    )
    read_timeout_ms: int = Field(
        10_000,
        ge=0,
        description="`ctr serve`: the longest a request may take to arrive, from its first "
        "byte (or the connection's opening) to its body's last; past it the connection is "
        "closed, with a 408 where its headers had not all come and nothing else was in "
        "flight on it (0: no limit, as uvicorn). CTR_REQUEST_TIMEOUT_MS counts from the "
        "body's end",
    )
    access_log: bool = Field(
        True,
        description="`ctr serve`: uvicorn's access log, one line per request at `info` "
        "(off: no line; the request metrics still count every request)",
    )

    loop_lag_interval_ms: int = Field(
        50,
        ge=0,
        description="each worker times how late its event loop runs a timer due this "
        "often (ctr_event_loop_lag_seconds), whole milliseconds, 0 (off) or at least 10 "
        "(uvloop rounds timers to milliseconds; a shorter one would wake the loop "
        "all the time)",
    )
    process_metrics_s: float = Field(
        5.0,
        ge=0,
        description="each worker puts its resident memory and CPU time into /metrics "
        "(ctr_worker_resident_memory_bytes, ctr_worker_cpu_seconds_total) this often, "
        "and the worker answering a scrape at the scrape; 0 = at start and scrapes only; "
        "else at least 0.1",
    )

    # periods whose 0 turns the timer off, and the shortest other value: a shorter one
    # keeps a worker busy on its own timer (0.1 ms: a whole core, idle); uvloop rounds
    # timers to milliseconds
    @field_validator(*OFF_OR_AT_LEAST)
    @classmethod
    def _off_or_at_least(cls, v: float, info: ValidationInfo) -> float:
        least, off = OFF_OR_AT_LEAST[str(info.field_name)]
        if 0 < v < least:
            raise ValueError(f"must be 0 ({off}) or at least {least:g}")
        return v

    @field_validator("model_version")
    @classmethod
    def _version(cls, v: str) -> str:
        from ctr.bundle import version_of

        v = v.strip()
        # as /admin/reload takes it: the folder's own name (an `01` served version 1 here
        # while a reload to "01" was refused)
        if v != "latest" and version_of(v) is None:
            raise ValueError("must be a version number (digits, no leading zero) or 'latest'")
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, v: object) -> object:
        # `CTR_API_KEY=` (set but empty) must not become a key that an absent header matches
        if not isinstance(v, str):
            return v
        # a secret mounted from a file ends in a newline: servers strip the blanks around
        # a header's value, so a key that kept them could never match
        v = v.strip()
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError("holds control characters, which an X-API-Key header cannot carry")
        return v or None

    @field_validator(
        "models_dir", "ops_library", "impression_stream", "reload_channel",
        "sequence_event_types", "allowed_origins", "host", mode="before",
    )  # fmt: skip
    @classmethod
    def _strip(cls, v: object) -> object:
        # a blank value (`X= ` in an env file) is the empty one: CTR_OPS_LIBRARY=" " turned
        # the fused graph, native JSON and native runner off, CTR_IMPRESSION_STREAM=" "
        # logged to a key named " "
        return v.strip() if isinstance(v, str) else v

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _level_any_case(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _redis_urls(self) -> Settings:
        # what the client would refuse at its first connection (a traceback in the
        # lifespan), refused here; a cluster's node list may leave out the scheme
        from redis.connection import parse_url

        from service.store import cluster_options, node_urls, url_options_problem, url_problem

        urls = node_urls(self.redis_url) if self.redis_cluster else [self.redis_url]
        try:
            if not urls:
                raise ValueError("no Redis URL")
            for url in urls:
                try:
                    parse_url(url)  # ValueError naming the schemes it takes
                except ValueError as exc:  # its text may quote a password: not repeated
                    raise ValueError(url_problem(exc)) from None
                check_db(url)
            if self.redis_cluster:
                cluster_options(urls[0])  # the options the cluster client takes
            elif problem := url_options_problem(urls[0]):
                raise ValueError(problem)
        except ValueError as exc:  # the URL itself not repeated: it may hold a password
            raise ValueError(f"CTR_REDIS_URL: {exc}") from None
        return self

    def check_serving(self) -> None:
        """Refuse (``ValueError`` naming the setting) what would serve open or from
        outside the model store; checked where the service starts (``ctr serve``,
        ``create_app``), not by the commands that only read Redis settings (``ctr load``,
        ``ctr impressions``)."""
        from ctr.spec import is_model_name

        # asked for, and silently off: a secret file mounted empty left scoring, explain
        # (any user's history) and events open to anyone, with one warning in the log
        if self.protect_scoring and self.api_key is None:
            raise ValueError(
                "CTR_PROTECT_SCORING=true needs CTR_API_KEY (unset, empty or blank here: "
                "scoring, explain and events would be open to anyone)"
            )
        # origins are compared as listed (:func:`origin_key`, as the service compares
        # them): "*" is no wildcard here (Starlette's CORS answer read it as one
        # on the GET routes while the service refused it), and "null" is every sandboxed
        # or file:// page
        for origin in self.allowed_origins.split(","):
            if origin_key(origin) in ("*", "null"):
                raise ValueError(f"CTR_ALLOWED_ORIGINS: {origin.strip()!r} is not an origin to "
                                 "allow: list each page's scheme://host[:port]")  # fmt: skip
        # a folder name under CTR_MODELS_DIR, as ctr export names one: "../x" loaded a
        # bundle from outside the model store
        if not is_model_name(self.model_name):
            raise ValueError("CTR_MODEL_NAME must be a model name: letters, digits, _ . - "
                             "(not first), no path")  # fmt: skip

    @model_validator(mode="after")
    def _body_buffer(self) -> Settings:
        # under the size limit, a body that can never be admitted was a 503 to retry for good
        if self.max_body_buffer_bytes < self.max_body_bytes:
            raise ValueError(
                f"CTR_MAX_BODY_BUFFER_BYTES ({self.max_body_buffer_bytes}) must be at least "
                f"CTR_MAX_BODY_BYTES ({self.max_body_bytes}): a body between the two could "
                "never be received"
            )
        return self

    @field_validator("cuda_graph_buckets", "cuda_graph_user_buckets")
    @classmethod
    def _buckets(cls, v: str) -> str:
        parse_buckets(v)
        return v


def check_dbs(url: str, cluster: bool) -> None:
    """:func:`check_db` for ``url``, or for each node a cluster's URL lists."""
    from service.store import node_urls

    for one in node_urls(url) if cluster else [url]:
        check_db(one)


def check_db(url: str) -> None:
    """A redis:// URL's path is its database number: redis-py ignores one that is not
    (``/O`` for ``/0`` silently used database 0)."""
    from urllib.parse import urlparse

    parsed = urlparse(url if "://" in url else f"redis://{url}")
    if parsed.scheme in ("redis", "rediss"):
        db = parsed.path.strip("/")
        if db and not db.isdigit():
            # the value not repeated: a malformed URL can put a password there
            raise ValueError("the database (the URL's path) must be a number")


def parse_buckets(text: str) -> list[int]:
    """``"64,128"`` -> ``[64, 128]`` (sorted, unique, each > 0)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise ValueError(f"comma-separated positive integers expected, got {text!r}") from exc
    if not values or values[0] <= 0:
        raise ValueError(f"comma-separated positive integers expected, got {text!r}")
    return values


def origin_key(origin: str) -> str:
    """An origin as compared with ``CTR_ALLOWED_ORIGINS``: scheme and host in lower case
    (browsers send them so; a listed ``https://Tools.Example.com`` is the same page), no
    trailing slash, and no port where it is the scheme's default (browsers leave it out)."""
    key = origin.strip().rstrip("/").lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if key.startswith(scheme) and key.endswith(port):
            return key[: -len(port)]
    return key
