"""``ctr bench-gpu``: the model alone on a GPU, through the service's own runners.

For each bundle and N it times ``LoadedModel.run`` (host arrays in, host arrays out:
the copies to and from the device are included) under each way the service can run
the graph, all loaded by :func:`service.model.load_model` from settings:

* ``cpu``: the CPU provider, ORT's default threads (the baseline in the same run);
* ``cpu+fused``: the same with the fused graph (the custom op's CPU kernel);
* ``cuda``: the CUDA provider with plain ``session.run``;
* ``cuda+iobinding``: outputs allocated on the device, copied back once;
* ``cuda+graphs``: CUDA graphs per (users, N) bucket;
* ``cuda+graphs+fp16``: the same on the fp16 graph (kept only within 1e-3 of fp32);
* ``cuda+graphs+fused`` and ``cuda+graphs+fused+fp16``: the bundle's fused graph for
  CUDA, where DIEN's AUGRU recurrence is one custom-op kernel (``native/``;
  ``model_fused_cuda.onnx``); DIN's fused graph holds only the attention op, which has no
  CUDA kernel, so for DIN (or a model with nothing to fuse) they equal the unfused rows
  (the runner column says "standard").

The feeds are the ones the service builds for ``ctr bench``'s request bodies (the same
users, real stored histories and candidates, encoded by the service's code from the
bundle's data as ``ctr load`` stores it), cycled; a full-history table is kept apart as
the worst case. It also reports each variant's max |p - p_cpu| on the same inputs,
history fed once vs copied N times on the GPU (full histories on both sides), and
micro-batching capacity: U distinct requests of N=500 merged into one graph call, in
requests completed over a timed window (what one worker's GPU can sustain when requests
are batched). Needs onnxruntime-gpu for the CUDA variants (each is skipped, with the
reason, without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctr.bundle import load_bundle
from service.model import ProviderError, load_model
from service.settings import Settings
from training.bench_util import (
    Feeds,
    _time,
    bodies_for,
    cycled_times,
    frame_reader,
    full_history_feed,
    full_history_feeds,
    latency_row,
    mean_history,
    merged_feeds,
    naive_feed,
    request_feeds,
    timed_rate,
)

OFF = {"fused_ops": "off"}
# a CUDA variant whose session came up on the CPU (ORT lists the CUDA provider even when
# its libraries fail to load, and then falls back without an error) is skipped, not timed
GPU = {"provider": "cuda", "require_gpu": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {"provider": "cpu", **OFF},
    "cpu+fused": {"provider": "cpu", "fused_ops": "on"},
    "cuda": {**GPU, **OFF},
    "cuda+iobinding": {**GPU, "io_binding": True, **OFF},
    "cuda+graphs": {**GPU, "cuda_graph": True, **OFF},
    "cuda+graphs+fp16": {**GPU, "cuda_graph": True, "precision": "fp16", **OFF},
    "cuda+graphs+fused": {**GPU, "cuda_graph": True, "fused_ops": "on"},
    "cuda+graphs+fused+fp16": {**GPU, "cuda_graph": True, "precision": "fp16", "fused_ops": "on"},
}
BATCHED = ("cuda+graphs", "cuda+graphs+fused")  # micro-batching capacity measured for these
BUCKETS = "64,128,256,512,1024,2048,4096,8192"
BODIES = 64  # request bodies per N, as `ctr bench` sends them
BATCH_N = 500  # candidates per request in the micro-batching figures
RATE_SECONDS = 2.0  # the timed window behind each requests/s figure


def _variant(
    model: Any,
    label: str,
    res: dict[str, Any],
    reference: dict[int, np.ndarray],
    feeds: dict[int, list[Feeds]],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """One variant: latency per N on the matched feeds (cycled) and on full histories
    (the worst case), its max |p - p_cpu|; the history-copy comparison and the
    micro-batching capacity where ``label`` calls for them. ``plan``: n_values, reps,
    users, rate_seconds."""
    rows: dict[str, Any] = {
        "runner": f"{model.runner.kind}, {model.graph}",
        "precision": model.precision,
        "note": "; ".join(x for x in (model.precision_note, model.graph_note) if x),
        "provider": model.provider,
        "n": {},
        "full_history": {},
    }
    reps = plan["reps"]
    for n in plan["n_values"]:
        probs = model.run(feeds[n][0], False)[0]
        reference.setdefault(n, probs)  # the first variant (cpu) is the reference
        ms = cycled_times(lambda f: model.run(f, False), feeds[n], reps)
        diff = float(np.max(np.abs(probs - reference[n])))
        rows["n"][n] = {**latency_row(ms), "max_diff_vs_cpu": diff}
        full = full_history_feeds(model.bundle, n)
        full_ms = cycled_times(lambda f: model.run(f, False), full, reps)
        rows["full_history"][n] = latency_row(full_ms)
    if label == "cuda+iobinding":
        res["copied"] = _copied(model, plan["n_values"], reps)
    if label in BATCHED:
        res["batched"][label] = _batched(model, feeds[BATCH_N], plan)
    return rows


def _copied(model: Any, n_values: list[int], reps: int) -> dict[int, dict[str, float]]:
    """A full history fed once vs copied N times on the host, same feed (a ratio within
    the worst case, so both sides have every history full)."""
    out = {}
    for n in n_values:
        once = full_history_feed(model.bundle, n, n)
        naive = naive_feed(once)
        times = max(10, reps // 4)
        out[n] = {
            "once_ms": float(np.median(_time(lambda f=once: model.run(f, False), times))),
            "copied_ms": float(np.median(_time(lambda f=naive: model.run(f, False), times))),
        }
    return out


def _batched(model: Any, feeds: list[Feeds], plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """U distinct requests of N=500 (the matched feeds) merged into one call: its latency
    (cycled over the groups), and requests completed over a timed window on the calls at
    once the runner allows (its CUDA-graph streams, else one)."""
    out = {}
    streams = model.streams or 1
    for u in plan["users"]:
        merged = merged_feeds(feeds, u)
        ms = cycled_times(lambda f: model.run(f, False), merged, plan["reps"])
        rate = timed_rate(lambda _, f: model.run(f, False), merged, streams,
                          plan["rate_seconds"], u)  # fmt: skip
        lat = latency_row(ms)
        out[u] = {"call_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                  "samples": lat["samples"], "req_s": rate["rps"], "streams": streams,
                  "window_s": rate["seconds"]}  # fmt: skip
    return out


def matched_feeds(
    models_dir: Path, name: str, n_values: list[int]
) -> tuple[dict[int, list[Feeds]], dict[int, float]]:
    """Per N, the feeds the service builds for ``ctr bench``'s request bodies over the
    bundle's own data as ``ctr load`` stores it (the users' real histories, encoded by the
    service's code; no Redis needed), and their mean history length."""
    from training.data import load_frame

    bundle = load_bundle(models_dir, name)
    frame = load_frame(bundle.config)
    read = frame_reader(bundle.config, frame)
    settings = Settings(models_dir=str(models_dir), model_name=name)
    feeds = {
        n: request_feeds(bundle, settings, bodies_for(frame, n, BODIES), read)
        for n in sorted({*n_values, BATCH_N})
    }
    return feeds, {n: mean_history(f) for n, f in feeds.items()}


def bench_bundle(
    models_dir: Path,
    name: str,
    n_values: list[int],
    reps: int,
    users: list[int],
    rate_seconds: float = RATE_SECONDS,
) -> dict[str, Any]:
    res: dict[str, Any] = {"variants": {}, "copied": {}, "batched": {}, "skipped": {}}
    feeds, res["mean_hist_len"] = matched_feeds(models_dir, name, n_values)
    plan = {"n_values": n_values, "reps": reps, "users": users, "rate_seconds": rate_seconds}
    reference: dict[int, np.ndarray] = {}
    for label, over in VARIANTS.items():
        settings = Settings(
            models_dir=str(models_dir), model_name=name, cuda_graph_buckets=BUCKETS, **over
        )
        try:
            model = load_model(settings)
        except ProviderError as exc:
            res["skipped"][label] = str(exc)
            continue
        res["variants"][label] = _variant(model, label, res, reference, feeds, plan)
    return res


def _variant_lines(res: dict[str, Any], ns: list[int], key: str) -> list[str]:
    """One row per variant: p50 / p99 per N from ``rows[key]``."""
    lines = []
    for label, rows in res["variants"].items():
        cells = [f"{rows[key][n]['p50_ms']:.2f} / {rows[key][n]['p99_ms']:.2f}" for n in ns]
        diff = max(r["max_diff_vs_cpu"] for r in rows["n"].values())
        prec = rows["precision"] + (f" ({rows['note']})" if rows["note"] else "")
        lines.append(
            f"| {label} | {rows['runner']} | {prec} | " + " | ".join(cells) + f" | {diff:.1e} |"
        )
    return lines


def _table(res: dict[str, Any], ns: list[int], key: str, title: str) -> list[str]:
    lines = [
        "",
        title,
        "",
        "| variant | runner | precision | "
        + " | ".join(f"N={n}" for n in ns)
        + " | max abs diff vs CPU |",
        "|---|---|---|" + "---:|" * len(ns) + "---:|",
    ]
    lines += _variant_lines(res, ns, key)
    for label, why in res["skipped"].items():
        lines.append(f"| {label} | skipped: {why} | | " + " | " * len(ns) + " |")
    return lines


def _copied_lines(res: dict[str, Any], ns: list[int]) -> list[str]:
    if not res["copied"]:
        return []
    cells = [
        f"{c['copied_ms']:.2f} ({c['copied_ms'] / c['once_ms']:.1f}x)"
        for c in (res["copied"][n] for n in ns)
    ]
    return [
        "",
        "History copied N times vs fed once (cuda+iobinding, full histories, p50 ms and "
        "ratio to fed once): " + ", ".join(f"N={n}: {c}" for n, c in zip(ns, cells, strict=True)),
    ]


def _batched_lines(res: dict[str, Any]) -> list[str]:
    lines = []
    for label, batched in res["batched"].items():
        lines += [
            "",
            f"Micro-batching, {label}: U distinct requests of N={BATCH_N} (matched feeds) in "
            "one call; requests/s: completed over a timed window, not from the median",
            "",
            "| U | call p50 ms | call p99 ms (samples) | requests/s | streams |",
            "|---:|---:|---:|---:|---:|",
        ]
        for u, b in batched.items():
            lines.append(
                f"| {u} | {b['call_ms']:.2f} | {b['p99_ms']:.2f} ({b['samples']}) | "
                f"{b['req_s']:.0f} | {b['streams']} |"
            )
    return lines


def render(results: dict[str, Any], device: str, reps: int) -> str:
    lines = [
        f"Model alone on {device}; p50 / p99 ms over {reps} calls (p99 from under 1,000 "
        "calls is rough), host arrays in and out. Matched feeds: the feeds the service "
        f"builds for `ctr bench`'s {BODIES} request bodies per N over the "
        "bundle's data as `ctr load` stores it (real histories), cycled."
    ]
    for name, res in results.items():
        ns = list(next(iter(res["variants"].values()))["n"]) if res["variants"] else []
        hist = ", ".join(f"N={n}: {res['mean_hist_len'][n]:.1f}" for n in ns)
        lines += _table(res, ns, "n", f"**{name}**, L=50, one user per call, matched feeds "
                        f"(mean history length {hist})")  # fmt: skip
        lines += _table(res, ns, "full_history", f"**{name}**, worst case (in no ratio): "
                        "every user a full history")  # fmt: skip
        lines += _copied_lines(res, ns) + _batched_lines(res)
    return "\n".join(lines)


def run(
    models_dir: Path, names: list[str], n_values: list[int], reps: int, users: list[int]
) -> dict[str, Any]:
    return {name: bench_bundle(models_dir, name, n_values, reps, users) for name in names}
