"""The service's own /metrics as ``ctr bench`` reads them: scrapes taken around a
measured window, and what changed between them (stage means, degraded responses and
errors, where the users' rows came from, GC pauses, slow observations)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str, metrics: tuple[str, ...]) -> Iterator[Any]:
    """The samples of the metric families ``metrics`` in a /metrics scrape
    (prometheus_client's own parser)."""
    for family in text_string_to_metric_families(text):
        if family.name in metrics:
            yield from family.samples


def _sums(text: str, metric: str, label: str) -> dict[tuple[str, str], float]:
    """``{(label value, "sum"|"count"): value}`` of histogram ``metric``."""
    out: dict[tuple[str, str], float] = {}
    for sample in _samples(text, (metric,)):
        for kind in ("sum", "count"):
            if sample.name == f"{metric}_{kind}":
                key = (sample.labels.get(label, ""), kind)
                out[key] = out.get(key, 0.0) + sample.value
    return out


STAGES = ("parse", "redis_fetch", "feature_mapping", "inference", "serialization", "write")


def stage_means(before: str, after: str) -> dict[str, float]:
    """Mean seconds per request of each stage between two /metrics scrapes."""
    a = _sums(before, "ctr_stage_duration_seconds", "stage")
    b = _sums(after, "ctr_stage_duration_seconds", "stage")
    res = {}
    for stage in STAGES:
        n = b.get((stage, "count"), 0) - a.get((stage, "count"), 0)
        total = b.get((stage, "sum"), 0) - a.get((stage, "sum"), 0)
        res[stage] = total / n if n else float("nan")
    return res


def counter(text: str, metric: str) -> dict[str, float]:
    """``{labels as text: value}`` of counter ``metric`` (its ``_total`` samples)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if metric in (family.name, family.name + "_total"):
            for smp in family.samples:
                if smp.name == metric:
                    key = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                    out[key] = out.get(key, 0.0) + smp.value
    return out


def user_rows_between(before: str, after: str) -> dict[str, float]:
    """Scoring requests by where the user's rows came from (``ctr_user_rows_total``:
    tracked, read, degraded) between two /metrics scrapes."""
    r0, r1 = counter(before, "ctr_user_rows_total"), counter(after, "ctr_user_rows_total")
    return {k.removeprefix("source="): v - r0.get(k, 0.0) for k, v in r1.items()}


def window_counts(before: str, after: str) -> dict[str, Any]:
    """Degraded responses (``ctr_degraded_responses_total``), service errors
    (``ctr_errors_total``, in all and by kind), graph calls run on the event loop
    thread (``ctr_inline_runs_total``, ``CTR_INLINE_MAX_MS``) and requests by where the
    user's rows came from (``ctr_user_rows_total``: tracked, read, degraded) between two
    /metrics scrapes."""

    def diff(metric: str) -> float:
        return sum(counter(after, metric).values()) - sum(counter(before, metric).values())

    e0, e1 = counter(before, "ctr_errors_total"), counter(after, "ctr_errors_total")
    kinds = {k: v - e0.get(k, 0.0) for k, v in e1.items() if v - e0.get(k, 0.0) > 0}
    return {"degraded": diff("ctr_degraded_responses_total"),
            "service_errors": sum(kinds.values()), "errors_by_kind": kinds,
            "inline_calls": diff("ctr_inline_runs_total"),
            "user_rows": user_rows_between(before, after)}  # fmt: skip


def gc_pauses(before: str, after: str) -> dict[str, float]:
    """The service's GC pauses between two /metrics scrapes (``ctr_gc_pause_seconds``,
    all generations): how many, and their total in ms."""

    def totals(text: str) -> tuple[float, float]:
        sums = _sums(text, "ctr_gc_pause_seconds", "generation")
        count = sum(v for (_, kind), v in sums.items() if kind == "count")
        return count, sum(v for (_, kind), v in sums.items() if kind == "sum")

    (c0, s0), (c1, s1) = totals(before), totals(after)
    return {"count": c1 - c0, "total_ms": (s1 - s0) * 1000}


def slow_counts(before: str, after: str, over: float = 0.03) -> dict[str, float]:
    """How many observations took longer than ``over`` seconds between two /metrics
    scrapes, per scoring stage and for whole requests as the service timed them: where a
    tail comes from (a stage, or outside the handler if none of them shows it)."""

    def above(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        names = ("ctr_stage_duration_seconds", "ctr_request_duration_seconds")
        for smp in _samples(text, names):
            key = smp.labels.get("stage") or f"request {smp.labels.get('route', '')}"
            if smp.name.endswith("_count"):
                out[key] = out.get(key, 0.0) + smp.value
            elif smp.name.endswith("_bucket") and float(smp.labels["le"]) == over:
                out[key] = out.get(key, 0.0) - smp.value
        return out

    a, b = above(before), above(after)
    return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0) > 0}
