"""``ctr bench``'s model-only baseline: the model loaded by the service's own loader from
the service's settings, fed what the service builds for the same requests, its latency
and the throughput it sustains, and the check that the two are comparable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.runner import SplitRunner
from service.settings import Settings
from training.bench_util import (
    Feeds,
    cycled_times,
    full_history_feeds,
    latency_row,
    mean_history,
    merged_feeds,
    redis_reader,
    request_feeds,
    timed_rate,
)

if TYPE_CHECKING:
    from service.model import LoadedModel


@dataclass
class Baseline:
    """The model alone as the service loads it: :func:`service.model.load_model` with the
    settings the service reads from the same environment (provider, graph and its parity
    fallback, threads, spinning, the one-thread session for small calls, precision), one
    loaded model per uvicorn worker, timed through its runner."""

    settings: Settings
    models: list[LoadedModel]

    @property
    def model(self) -> LoadedModel:
        return self.models[0]

    def run(self, stream: int, feeds: Feeds) -> list[np.ndarray]:
        """One graph call on stream ``stream``'s worker model (no ``explain``)."""
        return self.models[stream % len(self.models)].run(feeds, False)

    def side_by_side(self, n: int) -> int:
        """Calls of ``n`` candidates the service's native runner runs at once on its
        one-thread session (``CTR_NATIVE_PARALLEL_CALLS``; 1: none side by side)."""
        native = self.model.native
        if native is None or native.route(n, busy=True)[1] != 1:  # not side by side
            return 1
        return native.parallel * len(self.models)

    def run_single(self, stream: int, feeds: Feeds) -> list[np.ndarray]:
        """One call on the one-thread session of stream ``stream``'s worker model."""
        runner = self.models[stream % len(self.models)].runner
        assert isinstance(runner, SplitRunner)
        return runner.single.run(feeds, ["probs"])

    def describe(self) -> dict[str, Any]:
        """What the baseline serves: graph, runner, provider, precision."""
        m = self.model
        return {"graph": m.graph, "graph_note": m.graph_note, "runner": m.runner.kind,
                "provider": m.provider, "precision": m.precision,
                "single_thread_max_candidates": m.single_thread_max,
                "workers": len(self.models)}  # fmt: skip


def baseline_settings(env: dict[str, str]) -> Settings:
    """:class:`service.settings.Settings` from an environment dict, as ``ctr serve`` reads
    it from its own (``CTR_*`` keys; unknown ones are ignored)."""
    keys = {k[4:].lower(): v for k, v in env.items() if k.startswith("CTR_")}
    return Settings(**keys)  # type: ignore[arg-type]


def load_baseline(env: dict[str, str]) -> Baseline:
    """:class:`Baseline` for the service started with ``env`` (:func:`service_env`)."""
    from service.model import load_model

    settings = baseline_settings(env)
    return Baseline(settings, [load_model(settings) for _ in range(settings.workers)])


def baseline_feeds(base: Baseline, bodies: list[bytes], redis_url: str) -> list[Feeds]:
    """The feeds the service builds for ``bodies`` (same users, stored histories and
    candidates), read from the loaded Redis by the service's own store and encoding code."""
    bundle = base.model.bundle
    read = redis_reader(redis_url, bundle.config.max_seq_len)
    return request_feeds(bundle, base.settings, bodies, read)


def baseline_latency(base: Baseline, feeds: list[Feeds], reps: int) -> dict[str, float]:
    """Latency of ``reps`` single calls through the service's runner, cycling ``feeds``."""
    return latency_row(cycled_times(lambda f: base.run(0, f), feeds, reps))


def stream_counts(base: Baseline) -> list[int]:
    """Graph calls at once that the service's settings allow, from 1 to all: per worker,
    its CUDA-graph streams or ``CTR_INFERENCE_CONCURRENCY``, times the workers (powers of
    two in between)."""
    per = base.model.streams or base.settings.inference_concurrency
    total = per * len(base.models)
    return sorted({1, total, *(2**k for k in range(total.bit_length()) if 2**k <= total)})


def batch_fits(settings: Settings, n: int) -> int:
    """Requests of ``n`` candidates one micro-batched call holds (1: batching off)."""
    users = settings.batch_max_users
    return max(1, min(users, settings.batch_max_candidates // n)) if users > 1 else 1


def baseline_rates(
    base: Baseline, feeds: list[Feeds], n: int, seconds: float
) -> dict[int, dict[str, float]]:
    """What the model alone sustains: requests completed over a timed window of
    ``seconds`` for each count of concurrent calls the service allows
    (:func:`stream_counts`); with micro-batching, calls of full batches of distinct
    users (:func:`batch_fits`)."""
    fits = batch_fits(base.settings, n)
    work = merged_feeds(feeds, fits)
    rates = {s: timed_rate(base.run, work, s, seconds, fits) for s in stream_counts(base)}
    side = base.side_by_side(n)
    if side > 1:  # and as the native runner runs larger calls: side by side, one thread each
        r = timed_rate(base.run_single, work, side, seconds, fits)
        r["one-thread session"] = True
        if side not in rates or r["rps"] > rates[side]["rps"]:
            rates[side] = r
    return rates


def model_only_row(
    base: Baseline,
    feeds: list[Feeds],
    before: dict[str, float],
    after: dict[str, float],
    reps: int,
) -> dict[str, Any]:
    """Model-only latency on the matched feeds, from the runs right ``before`` and
    ``after`` the service's c=1 window (the mean of their p50s is the baseline), the
    history lengths fed, and the full-history worst case (in no ratio)."""
    n = int(feeds[0]["user_idx"].shape[0])
    full = full_history_feeds(base.model.bundle, n)
    return {
        "p50_ms": (before["p50_ms"] + after["p50_ms"]) / 2,
        "p99_ms": max(before["p99_ms"], after["p99_ms"]),
        "samples": before["samples"] + after["samples"],
        "before": before,
        "after": after,
        "mean_hist_len": mean_history(feeds),
        "full_history": baseline_latency(base, full, reps),
    }


def sustained(mo: dict[str, Any], rates: dict[int, dict[str, float]]) -> None:
    """Put the model-alone throughput (the best measured window) into row ``mo``."""
    best = max(rates.values(), key=lambda r: r["rps"])
    mo["rates"] = rates
    mo["sustained_rps"] = best["rps"]
    mo["sustained_streams"] = best["streams"]
    mo["cpu_ms"] = rates[1]["cpu_ms"]  # CPU per request of one stream of the runner


def speed_check(single: dict[str, Any], mo: dict[str, Any], graphs: dict[str, Any]) -> str:
    """ "ok", or why the row's ratio is suspect: the service's own inference stage more
    than 10 % below the model-only p50 (the machine's speed moved between them), or the
    baseline serving another graph than the service."""
    notes = []
    inference = single["stages_ms"]["inference"]
    if inference < 0.9 * mo["p50_ms"]:
        notes.append(
            f"suspect: machine speed moved (service inference {inference:.2f} ms < 0.9 x "
            f"model-only {mo['p50_ms']:.2f} ms)"
        )
    served, base = graphs.get("service", {}).get("graph"), graphs["model_only"]["graph"]
    if served is not None and served != base:
        notes.append(f"suspect: model-only graph {base} but the service serves {served}")
    return "; ".join(notes) or "ok"
