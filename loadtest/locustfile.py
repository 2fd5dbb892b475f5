"""Realistic traffic for the CTR scoring API (run with locust, or through loadtest/run.py).

* users: Zipf over ``u0..u{N-1}`` (rank 1 = ``u0``, the hottest user), N from
  ``LOCUST_USERS_N`` (default 2000), exponent ``LOCUST_ZIPF_A`` (default 1.2);
* candidates per request: a weighted mix, ``LOCUST_CANDIDATE_MIX`` such as
  ``"50:0.3,200:0.3,500:0.3,1000:0.1"`` (count:weight; weights are normalised); item
  IDs are drawn from ``i0..i{M-1}`` (M = ``LOCUST_ITEMS_N``, default 1200) without
  duplicates inside a request;
* a share ``LOCUST_EVENT_SHARE`` (default 0.1) of requests are ``POST /v1/events``
  clicks instead of scoring requests;
* score requests are named ``/v1/score [N=<count>]`` so locust's statistics split by
  candidate count.

A score counts as failed when it is not 200, when it ranks the wrong number of items,
and when it is ``degraded`` (scored without the user's Redis data, e.g. Redis down or
over its time budget: a run that passes must have measured the real path). An event
counts as failed when it is not 2xx or when it appended nothing (``duplicate``: each
event has a fresh ``event_id``, drawn outside ``LOCUST_SEED``; ``outside_window``), but
for an event type the service is set to ignore (``"ignored": true``). A
failure's message is the answer's ``error`` and ``field`` (``HTTP 503 overloaded``), not
its body, whose ``request_id`` differs every time, so that locust groups like failures
into one row; a request with no answer says why (``no response: ConnectionRefusedError(111, ...)``,
a timeout). The final failure counts are written at exit to ``<csv
prefix>_failures_final.csv`` (locust's own ``_failures.csv`` is rewritten once a second
and can miss the last one). Cold starts
(users Redis does not know: scored on a cheaper path) are counted, and the run fails
when they exceed ``LOCUST_MAX_COLD_START_SHARE`` (default 0.01) of the scores: exit
status 3, :data:`COLD_START_EXIT`, unless requests failed too (then locust's own 1).

Other knobs: ``LOCUST_TOP_K`` (default 100; 0 = no top_k), ``LOCUST_TIMEOUT`` (seconds,
default 10), ``LOCUST_WAIT_MIN``/``LOCUST_WAIT_MAX`` (think time in seconds, default
0/0.05), ``LOCUST_SEED`` (reproducible draws), ``CTR_API_KEY`` or ``LOCUST_API_KEY``
(sent as ``X-API-Key`` and ``Authorization: Bearer`` when set).

The sampling logic lives in plain functions (``sample_user``, ``sample_candidates``, ...)
that take a ``random.Random`` and a ``TrafficConfig``, so it can be tested without
running locust. Importing this module imports locust (which monkey-patches the
standard library through gevent): tests import it in a subprocess.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from locust import HttpUser, between, events, task

DEFAULT_MIX = "50:0.3,200:0.3,500:0.3,1000:0.1"


def parse_mix(spec: str) -> list[tuple[int, float]]:
    """``"50:0.3,200:0.7"`` -> ``[(50, 0.3), (200, 0.7)]`` with weights summing to 1."""
    pairs: list[tuple[int, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        count, sep, weight = part.partition(":")
        n, w = int(count), float(weight) if sep else 1.0
        if n <= 0 or w < 0:
            raise ValueError(f"bad candidate mix entry {part!r}")
        pairs.append((n, w))
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        raise ValueError(f"empty candidate mix {spec!r}")
    return [(n, w / total) for n, w in pairs]


def zipf_weights(n: int, a: float) -> list[float]:
    """Probabilities of ranks 1..n under a Zipf law truncated at n: p(k) ~ k**-a."""
    if n <= 0:
        raise ValueError("n must be positive")
    raw = [k ** (-a) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _cumulative(weights: list[float]) -> list[float]:
    cum = list(itertools.accumulate(weights))
    cum[-1] = 1.0  # guard against rounding: the last bucket always catches u == 1 - eps
    return cum


@dataclass(frozen=True)
class TrafficConfig:
    users_n: int = 2000
    zipf_a: float = 1.2
    items_n: int = 1200
    mix: tuple[tuple[int, float], ...] = tuple(parse_mix(DEFAULT_MIX))
    event_share: float = 0.1
    top_k: int = 100
    user_cum: tuple[float, ...] = field(default=(), repr=False, compare=False)
    mix_cum: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.event_share <= 1.0:
            raise ValueError("event share must be within [0, 1]")
        if self.items_n <= 0:
            raise ValueError("items_n must be positive")
        if not self.user_cum:
            cum = _cumulative(zipf_weights(self.users_n, self.zipf_a))
            object.__setattr__(self, "user_cum", tuple(cum))
        if not self.mix_cum:
            object.__setattr__(self, "mix_cum", tuple(_cumulative([w for _, w in self.mix])))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TrafficConfig:
        """The traffic the ``LOCUST_*`` variables ask for; a bad value is a ValueError
        naming its variable (``LOCUST_CANDIDATE_MIX='50:x': ...``)."""
        env = dict(os.environ if env is None else env)

        def read(name: str, default: str, conv):  # noqa: ANN001, ANN202
            value = env.get(name, default)
            try:
                return conv(value)
            except (ValueError, OverflowError) as exc:  # 1e400 digits: an OverflowError
                raise ValueError(f"{name}={value[:40]!r}: {exc}") from None

        def number(kind: type, low: float, high: float = math.inf):  # noqa: ANN202
            def conv(value: str) -> float:
                got = kind(value)
                if not (math.isfinite(got) and low <= got <= high):
                    span = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
                    raise ValueError(f"must be a finite {kind.__name__} {span}")
                return got

            return conv

        return cls(
            users_n=read("LOCUST_USERS_N", "2000", number(int, 1)),
            zipf_a=read("LOCUST_ZIPF_A", "1.2", number(float, 0)),
            items_n=read("LOCUST_ITEMS_N", "1200", number(int, 1)),
            mix=read("LOCUST_CANDIDATE_MIX", DEFAULT_MIX, lambda v: tuple(parse_mix(v))),
            event_share=read("LOCUST_EVENT_SHARE", "0.1", number(float, 0, 1)),
            top_k=read("LOCUST_TOP_K", "100", number(int, 0)),
        )


def sample_user_rank(rng: random.Random, cfg: TrafficConfig) -> int:
    """A Zipf rank in 1..users_n."""
    return bisect.bisect_left(cfg.user_cum, rng.random()) + 1


def sample_user(rng: random.Random, cfg: TrafficConfig) -> str:
    """A user ID ``u{rank-1}``: ``u0`` is the most frequent user."""
    return f"u{sample_user_rank(rng, cfg) - 1}"


def sample_candidate_count(rng: random.Random, cfg: TrafficConfig) -> int:
    """A candidate count from the configured mix (capped at the number of items)."""
    n = cfg.mix[bisect.bisect_left(cfg.mix_cum, rng.random())][0]
    return min(n, cfg.items_n)


def sample_candidates(rng: random.Random, cfg: TrafficConfig, n: int | None = None) -> list[str]:
    """``n`` distinct item IDs from ``i0..i{items_n-1}`` (n from the mix when omitted)."""
    if n is None:
        n = sample_candidate_count(rng, cfg)
    return [f"i{i}" for i in rng.sample(range(cfg.items_n), min(n, cfg.items_n))]


def request_name(n: int) -> str:
    """The locust stats name of a score request with ``n`` candidates."""
    return f"/v1/score [N={n}]"


def build_score_request(rng: random.Random, cfg: TrafficConfig) -> dict:
    """A ``POST /v1/score`` body following the service contract."""
    items = sample_candidates(rng, cfg)
    body: dict = {
        "user_id": sample_user(rng, cfg),
        "candidates": [{"item_id": item} for item in items],
        "context": {"hour": time.localtime().tm_hour},
        "explain": False,
    }
    if cfg.top_k > 0:
        body["top_k"] = cfg.top_k
    return body


def build_event(rng: random.Random, cfg: TrafficConfig) -> dict:
    """A ``POST /v1/events`` click body; item features come from Redis on the server."""
    return {
        "user_id": sample_user(rng, cfg),
        # a fresh ID on every run, seeded or not: a seeded run repeated against the same
        # Redis would otherwise post only duplicates, which append nothing
        "event_id": uuid.uuid4().hex,
        "item_id": f"i{rng.randrange(cfg.items_n)}",
        "type": "click",
        "timestamp": time.time(),
    }


def is_event(rng: random.Random, cfg: TrafficConfig) -> bool:
    return rng.random() < cfg.event_share


def auth_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    key = env.get("LOCUST_API_KEY") or env.get("CTR_API_KEY")
    if not key:
        return {}
    return {"X-API-Key": key, "Authorization": f"Bearer {key}"}


def _root_error(error: object) -> object:
    """The OS-level cause of a connection failure: requests wraps a refused connection as
    ``ConnectionError(MaxRetryError(... NewConnectionError(...)))``, 300+ characters whose
    cause (``[Errno 111] Connection refused``) the report cuts off; this gives
    ``ConnectionRefusedError(111, 'Connection refused')``. A timeout stays as it is
    (``ReadTimeout(... read timeout=10.0)``: its own text says which limit ran out)."""
    if not isinstance(error, BaseException) or "Timeout" in type(error).__name__:
        return error
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and type(error).__module__ in ("builtins", "socket", "ssl"):
            return error  # ConnectionRefusedError, ConnectionResetError, socket.gaierror...
        nxt = error.__cause__ or getattr(error, "reason", None)
        if nxt is None and error.args and isinstance(error.args[0], BaseException):
            nxt = error.args[0]
        if not isinstance(nxt, BaseException):
            break
        error = nxt
    return error


def http_failure(status: int, text: str, error: object = None) -> str:
    """The failure message for an answer that is not a success: ``HTTP <status>
    <error>[ <field>]`` from the service's error body (the same for every request that
    failed alike: no ``request_id``), the start of any other body, or why no answer came
    (``status`` 0: ``error``, the connection's exception)."""
    if status == 0:
        return f"no response: {_root_error(error)!r}" if error is not None else "no response"
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        field = body.get("field")
        return f"HTTP {status} {body['error']}" + (f" {field}" if field else "")
    return f"HTTP {status}: {text[:200]}"


def event_failure(body: object) -> str | None:
    """Why a 2xx answer to an event fails the run, or None: it appended nothing (a
    duplicate ``event_id``, or a timestamp outside the kept window). An event the
    service is set to ignore (``"ignored": true``: ``CTR_SEQUENCE_EVENT_TYPES`` leaves
    its type out) is a success: the service did what it was told."""
    if not isinstance(body, dict):
        return f"bad response body: {body!r}"[:200]
    if body.get("ignored"):
        return None
    if body.get("duplicate"):
        return "duplicate: the event_id was stored before, nothing appended"
    if body.get("outside_window"):
        return "outside_window: the timestamp is older than the stored history keeps"
    if not body.get("appended"):
        return f"not appended: {body!r}"[:200]
    return None


def score_failure(body: object, expected: int) -> str | None:
    """Why a 200 answer to a score request with ``expected`` items to rank fails the
    run, or None: a body without its items, the wrong number of them, or ``degraded``."""
    try:
        items = body["items"]  # type: ignore[index]
        degraded = body.get("degraded", False)  # type: ignore[union-attr]
    except (KeyError, TypeError, AttributeError) as exc:
        return f"bad response body: {exc!r}"
    if not isinstance(items, list):
        return f"bad response body: items is {items!r}"
    if len(items) != expected:
        return f"expected {expected} items, got {len(items)}"
    if degraded:
        return "degraded: scored without the user's Redis data"
    return None


@dataclass
class ColdStarts:
    """Score answers counted by ``cold_start``, for the check at the end of the run."""

    scores: int = 0
    cold: int = 0

    def verdict(self, max_share: float) -> str | None:
        """Why the run fails on its cold starts, or None."""
        if self.scores and self.cold / self.scores > max_share:
            return (
                f"{self.cold} of {self.scores} scores were cold starts "
                f"({self.cold / self.scores:.1%} > LOCUST_MAX_COLD_START_SHARE={max_share}): "
                "Redis does not hold these users (was the data loaded?)"
            )
        return None


try:
    CONFIG = TrafficConfig.from_env()
except ValueError as _exc:  # one line naming the variable, not locust's import traceback
    raise SystemExit(f"loadtest/locustfile.py: {_exc}") from None
COLD = ColdStarts()
MAX_COLD_SHARE = float(os.environ.get("LOCUST_MAX_COLD_START_SHARE", "0.01"))
COLD_START_EXIT = 3
_SEED = os.environ.get("LOCUST_SEED")
_SEEDS = itertools.count(int(_SEED)) if _SEED else None


class ScoringUser(HttpUser):
    """One simulated client: scores candidate lists, sometimes posts a click."""

    wait_time = between(
        float(os.environ.get("LOCUST_WAIT_MIN", "0")),
        float(os.environ.get("LOCUST_WAIT_MAX", "0.05")),
    )

    def on_start(self) -> None:
        self.rng = random.Random(next(_SEEDS) if _SEEDS is not None else None)
        self.timeout = float(os.environ.get("LOCUST_TIMEOUT", "10"))
        self.headers = {"Content-Type": "application/json", **auth_headers()}

    @task
    def traffic(self) -> None:
        if is_event(self.rng, CONFIG):
            self.post_event()
        else:
            self.score()

    def score(self) -> None:
        body = build_score_request(self.rng, CONFIG)
        n = len(body["candidates"])
        expected = min(n, CONFIG.top_k) if CONFIG.top_k > 0 else n
        with self.client.post(
            "/v1/score",
            json=body,
            headers=self.headers,
            name=request_name(n),
            timeout=self.timeout,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(http_failure(resp.status_code, resp.text or "", resp.error))
                return
            try:
                body = resp.json()
            except ValueError as exc:
                resp.failure(f"bad response body: {exc}")
                return
            reason = score_failure(body, expected)
            if reason is not None:
                resp.failure(reason)
                return
            COLD.scores += 1
            COLD.cold += bool(body.get("cold_start"))
            resp.success()

    def post_event(self) -> None:
        with self.client.post(
            "/v1/events",
            json=build_event(self.rng, CONFIG),
            headers=self.headers,
            name="/v1/events",
            timeout=self.timeout,
            catch_response=True,
        ) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(http_failure(resp.status_code, resp.text or "", resp.error))
                return
            try:
                reason = event_failure(resp.json())
            except ValueError as exc:
                reason = f"bad response body: {exc}"
            if reason is not None:
                resp.failure(reason)
            else:
                resp.success()


FINAL_FAILURES = "_failures_final.csv"


def write_final_failures(errors: dict, prefix: str) -> Path:
    """Locust's failure table (``runner.stats.errors``) as it stands at exit, to
    ``<prefix>_failures_final.csv`` in the columns of its ``_failures.csv``."""
    path = Path(prefix + FINAL_FAILURES)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["Method", "Name", "Error", "Occurrences"])
        for e in errors.values():
            out.writerow([e.method, e.name, e.parse_error(e.error), e.occurrences])
    return path


WINDOW = "_window.json"


def write_window(stats: object, prefix: str) -> Path:
    """The run's window as locust's own Requests/s divides by: from the test's start
    (``stats.start_time``, reset when the run starts) to its last answer. The rows of
    ``--json-file`` only start at their name's first answer, one latency into the run."""
    path = Path(prefix + WINDOW)
    path.write_text(
        json.dumps(
            {
                "start_time": stats.start_time,  # type: ignore[attr-defined]
                "last_request_timestamp": stats.last_request_timestamp,  # type: ignore[attr-defined]
            }
        )
    )
    return path


@events.quitting.add_listener
def _final_failures(environment: object, **_: object) -> None:
    runner = getattr(environment, "runner", None)
    options = getattr(environment, "parsed_options", None)
    prefix = getattr(options, "csv_prefix", None)
    if runner is not None and prefix:
        write_final_failures(runner.stats.errors, prefix)
        write_window(runner.stats, prefix)


VERDICT = "_verdict.txt"


@events.quitting.add_listener
def _cold_start_check(environment: object, **_: object) -> None:
    reason = COLD.verdict(MAX_COLD_SHARE)
    prefix = getattr(getattr(environment, "parsed_options", None), "csv_prefix", None)
    if reason is None:  # a passing run leaves no earlier run's FAIL behind (run.py reads it)
        if prefix:
            Path(prefix + VERDICT).unlink(missing_ok=True)
        return
    print(f"FAIL: {reason}", flush=True)
    if prefix:  # for run.py's report
        Path(prefix + VERDICT).write_text(f"FAIL: {reason}\n")
    # its own status, not taken for failed requests; a run with failed requests or
    # errors keeps locust's own status (1), which says more
    runner = getattr(environment, "runner", None)
    failed = runner is not None and bool(runner.errors or runner.exceptions)
    if not failed and getattr(environment, "process_exit_code", None) is None:
        environment.process_exit_code = COLD_START_EXIT  # type: ignore[attr-defined]
