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

It also reports each variant's max |p - p_cpu| on the same inputs, history fed once
vs copied N times on the GPU, and micro-batching capacity: U requests of N=500 merged
into one graph call (what one worker's GPU can sustain when requests are batched).
Needs onnxruntime-gpu for the CUDA variants (each is skipped, with the reason, without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.batcher import merge_feeds
from service.model import ProviderError, load_model
from service.settings import Settings
from training.bench_util import _time, full_history_feed, naive_feed, p50_p99

OFF = {"fused_ops": "off"}
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {"provider": "cpu", **OFF},
    "cpu+fused": {"provider": "cpu", "fused_ops": "on"},
    "cuda": {"provider": "cuda", **OFF},
    "cuda+iobinding": {"provider": "cuda", "io_binding": True, **OFF},
    "cuda+graphs": {"provider": "cuda", "cuda_graph": True, **OFF},
    "cuda+graphs+fp16": {"provider": "cuda", "cuda_graph": True, "precision": "fp16", **OFF},
    "cuda+graphs+fused": {"provider": "cuda", "cuda_graph": True, "fused_ops": "on"},
    "cuda+graphs+fused+fp16": {
        "provider": "cuda",
        "cuda_graph": True,
        "precision": "fp16",
        "fused_ops": "on",
    },
}
BATCHED = ("cuda+graphs", "cuda+graphs+fused")  # micro-batching capacity measured for these
BUCKETS = "64,128,256,512,1024,2048,4096,8192"


def _variant(
    model: Any,
    label: str,
    res: dict[str, Any],
    reference: dict[int, np.ndarray],
    n_values: list[int],
    reps: int,
    users: list[int],
) -> dict[str, Any]:
    rows: dict[str, Any] = {
        "runner": f"{model.runner.kind}, {model.graph}",
        "precision": model.precision,
        "note": "; ".join(x for x in (model.precision_note, model.graph_note) if x),
        "provider": model.provider,
        "n": {},
    }
    for n in n_values:
        feed = full_history_feed(model.bundle, n, n)
        probs = model.run(feed, False)[0]
        reference.setdefault(n, probs)  # the first variant (cpu) is the reference
        p50, p99 = p50_p99(_time(lambda f=feed: model.run(f, False), reps, warmup=10))
        diff = float(np.max(np.abs(probs - reference[n])))
        rows["n"][n] = {"p50_ms": p50, "p99_ms": p99, "max_diff_vs_cpu": diff}
    if label == "cuda+iobinding":
        for n in n_values:
            naive = naive_feed(full_history_feed(model.bundle, n, n))
            t = _time(lambda f=naive: model.run(f, False), max(10, reps // 4), warmup=3)
            res["copied"][n] = float(np.median(t))
    if label in BATCHED:
        one = full_history_feed(model.bundle, 500, 500)
        for u in users:
            merged = merge_feeds([one] * u)
            t = _time(lambda f=merged: model.run(f, False), reps, warmup=10)
            ms, p99 = p50_p99(t)
            res["batched"].setdefault(label, {})[u] = {
                "call_ms": ms,
                "p99_ms": p99,
                "req_s": u * 1000.0 / ms,
            }
    return rows


def bench_bundle(
    models_dir: Path, name: str, n_values: list[int], reps: int, users: list[int]
) -> dict[str, Any]:
    res: dict[str, Any] = {"variants": {}, "copied": {}, "batched": {}, "skipped": {}}
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
        res["variants"][label] = _variant(model, label, res, reference, n_values, reps, users)
    return res


def render(results: dict[str, Any], device: str, reps: int) -> str:
    lines = [f"Model alone on {device}; p50 / p99 ms over {reps} calls, host arrays in and out."]
    for name, res in results.items():
        v = res["variants"]
        ns = list(next(iter(v.values()))["n"])
        lines += [
            "",
            f"**{name}**, L=50, one user, full history",
            "",
            "| variant | runner | precision | "
            + " | ".join(f"N={n}" for n in ns)
            + " | max abs diff vs CPU |",
            "|---|---|---|" + "---:|" * len(ns) + "---:|",
        ]
        for label, rows in v.items():
            cells = [f"{rows['n'][n]['p50_ms']:.2f} / {rows['n'][n]['p99_ms']:.2f}" for n in ns]
            diff = max(r["max_diff_vs_cpu"] for r in rows["n"].values())
            prec = rows["precision"] + (f" ({rows['note']})" if rows["note"] else "")
            lines.append(
                f"| {label} | {rows['runner']} | {prec} | " + " | ".join(cells) + f" | {diff:.1e} |"
            )
        for label, why in res["skipped"].items():
            lines.append(f"| {label} | skipped: {why} | | " + " | " * len(ns) + " |")
        if res["copied"]:
            io = v["cuda+iobinding"]["n"]
            lines.append(
                "| history copied N times (cuda+iobinding) | | | "
                + " | ".join(
                    f"{res['copied'][n]:.2f} ({res['copied'][n] / io[n]['p50_ms']:.1f}x)"
                    for n in ns
                )
                + " | |"
            )
        for label, batched in res["batched"].items():
            lines += [
                "",
                f"Micro-batching, {label}: U requests of N=500 in one call",
                "",
                "| U | call p50 ms | call p99 ms | requests/s |",
                "|---:|---:|---:|---:|",
            ]
            for u, b in batched.items():
                lines.append(f"| {u} | {b['call_ms']:.2f} | {b['p99_ms']:.2f} | {b['req_s']:.0f} |")
    return "\n".join(lines)


def run(
    models_dir: Path, names: list[str], n_values: list[int], reps: int, users: list[int]
) -> dict[str, Any]:
    return {name: bench_bundle(models_dir, name, n_values, reps, users) for name in names}
