"""``ctr bench-model``: model-only latency, ORT vs naive history copies vs torch eager.

For each model and N it reports ORT median/p99 with the history fed once (U=1,
``user_idx`` zeros), and in the same run the ratio against (a) the same graph fed
the history copied N times (U=N, the naive way) and (b) torch eager on the same
inputs. DIN and DIEN also get "(fused)" rows: the graph with DIN's activation unit or
DIEN's AUGRU and attention unit as custom-op nodes (``native/``), when the op library
can be built. Weights are random: latency does not depend on them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ctr import native
from ctr.bundle import random_inputs
from ctr.spec import FeatureConfig, load_config
from training.bench_util import _time, naive_feed
from training.export import ExportWrapper, export_onnx, fusable
from training.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def session(
    path: Path, threads: int, level: str = "all", ops_library: Path | None = None
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if ops_library is not None:
        so.register_custom_ops_library(str(ops_library))
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_model(
    config: FeatureConfig,
    n_values: list[int],
    threads: int,
    repeats: int,
    vocab: int = 5000,
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    sizes = {t.name: vocab for t in config.tables}
    model = build_model(config, sizes).eval()
    wrapper = ExportWrapper(model).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path)
        sess = session(path, threads)
        fused = None  # the same model with its fusable parts as custom-op nodes
        if fusable(model):
            try:
                lib = native.library()
                export_onnx(model, Path(tmp) / "f.onnx", fused=True)
                fused = session(Path(tmp) / "f.onnx", threads, ops_library=lib.path)
            except native.NativeError as exc:
                print(f"[bench-model] no fused rows: {exc}")
        rng = np.random.default_rng(0)
        torch.set_num_threads(threads)
        graphs = [(config.model.type, sess)]
        if fused is not None:
            graphs.append((f"{config.model.type} (fused)", fused))
        for n in n_values:
            feed = random_inputs(config, sizes, 1, n, config.max_seq_len, rng)
            naive = naive_feed(feed)
            timed = []
            for label, s in graphs:
                once = _time(lambda f=feed, s=s: s.run(["probs"], f), repeats)
                copied = _time(lambda f=naive, s=s: s.run(["probs"], f), max(5, repeats // 2))
                timed.append((label, once, copied))
            targs = tuple(torch.from_numpy(v) for v in feed.values())

            def eager(a: tuple = targs) -> None:
                with torch.inference_mode():
                    wrapper(*a)

            tq = _time(eager, max(5, repeats // 2))
            for label, once, copied in timed:
                rows.append(
                    {
                        "model": label,
                        "n": n,
                        "ort_p50_ms": float(np.median(once)),
                        "ort_p99_ms": float(np.percentile(once, 99)),
                        "samples": len(once),
                        "L": config.max_seq_len,
                        "naive_p50_ms": float(np.median(copied)),
                        "torch_p50_ms": float(np.median(tq)),
                    }
                )
    return rows


def render(rows: list[dict[str, Any]], threads: int) -> str:
    """The table; L is each config's own (``--set max_seq_len`` wins over ``--seq-len``),
    and a p99 of fewer than 1,000 samples (``--repeats``) is marked rough."""
    lengths = ", ".join(str(n) for n in sorted({int(r["L"]) for r in rows})) or "?"
    lines = [
        f"model-only latency, CPU, ORT intra-op threads={threads}, L={lengths}, history fed once",
        "| model | N | ORT p50 ms | ORT p99 ms | naive (history x N) p50 ms | naive / once |"
        " torch eager p50 ms | torch / ORT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['ort_p50_ms']:.2f} | {_p99(r)} | "
            f"{r['naive_p50_ms']:.2f} | {r['naive_p50_ms'] / r['ort_p50_ms']:.2f}x | "
            f"{r['torch_p50_ms']:.2f} | {r['torch_p50_ms'] / r['ort_p50_ms']:.2f}x |"
        )
    return "\n".join(lines)


def _p99(row: dict[str, Any]) -> str:
    """p99 with its sample count; "<1,000" marks a rough one (of 50, it is the max)."""
    count = int(row["samples"])
    rough = ", <1,000" if count < 1000 else ""
    return f"{row['ort_p99_ms']:.2f} (n={count}{rough})"


def run(
    models: list[str],
    n_values: list[int],
    threads: int,
    repeats: int,
    length: int,
    overrides: dict[str, Any] | None = None,
) -> str:
    tables = []
    all_rows = []
    for mt in models:
        cfg_file = "synthetic_dien.yaml" if mt == "dien" else "synthetic_din.yaml"
        over = {"model.type": mt, "max_seq_len": length, **(overrides or {})}
        config = load_config(ROOT / "configs" / cfg_file, over)
        all_rows += bench_model(config, n_values, threads, repeats)
    tables.append(render(all_rows, threads))
    return "\n".join(tables)


def ablation(n: int, threads: int, repeats: int, length: int) -> str:
    """DIN at one N: split vs concatenated first attention layer, ORT optimization level,
    and intra-op threads; each row is a ratio against the shipped default in this run."""
    config = load_config(ROOT / "configs" / "synthetic_din.yaml", {"max_seq_len": length})
    sizes = {t.name: 5000 for t in config.tables}
    torch.manual_seed(0)
    model = build_model(config, sizes).eval()
    rng = np.random.default_rng(0)
    feed = random_inputs(config, sizes, 1, n, length, rng)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for split in (True, False):
            for att in model.att:  # type: ignore[attr-defined]
                att.split_first_layer = split
            paths[split] = Path(tmp) / f"split{int(split)}.onnx"
            export_onnx(model, paths[split])
        for att in model.att:  # type: ignore[attr-defined]
            att.split_first_layer = True
        cases = [
            (f"default: split first layer, ORT_ENABLE_ALL, threads={threads}", True, "all",
             threads),
            ("concatenated first layer [q,k,q-k,q*k]", False, "all", threads),
            ("ORT_ENABLE_BASIC", True, "basic", threads),
            ("ORT_ENABLE_EXTENDED", True, "extended", threads),
            ("intra-op threads=1", True, "all", 1),
        ]  # fmt: skip
        for label, split, level, th in cases:
            sess = session(paths[split], th, level)
            t = _time(lambda s=sess: s.run(["probs"], feed), repeats)
            rows.append((label, float(np.median(t))))
    base = rows[0][1]
    lines = [
        f"DIN ablation, N={n}, L={length} (p50 over {repeats} runs; ratio = variant / default)",
        "| variant | p50 ms | ratio |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {ms:.2f} | {ms / base:.2f}x |" for label, ms in rows]
    return "\n".join(lines)
