"""Two versions of one bundle's graph, timed interleaved on the same feeds.

    .venv/bin/python scripts/bench_graph_pair.py --models-dir DIR --name din \\
        --a 2 --b 1 [--graph model_fused.onnx] [--threads 1] [--n 200] [--blocks 30]

Each block runs one graph ``--runs`` times back to back and records the process's CPU
time per run; blocks alternate A B, B A, ... so that a drift of the machine's speed
falls on both. Prints the median CPU µs per run of each side, B / A, and in how many
blocks B was the cheaper. The feeds are :func:`ctr.bundle.random_inputs` for one user
and ``--n`` candidates (dense values made non-negative), built from version A's bundle;
both versions must take the same inputs. Session 33 compared a DIN graph with its dense
clamp (version 1) against the same weights without it (version 2) this way.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort

from ctr import native
from ctr.bundle import Bundle, load_bundle, random_inputs


def session(bundle: Bundle, graph: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if graph != "model.onnx":
        so.register_custom_ops_library(str(native.library().path))
    return ort.InferenceSession(str(bundle.path / graph), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--name", default="din")
    p.add_argument("--a", type=int, required=True, help="version A")
    p.add_argument("--b", type=int, required=True, help="version B")
    p.add_argument("--graph", default="model_fused.onnx", help="model.onnx or model_fused.onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--blocks", type=int, default=30, help="blocks per side (even)")
    p.add_argument("--runs", type=int, default=300, help="graph runs per block")
    args = p.parse_args(argv)
    if args.blocks < 2 or args.blocks % 2:
        p.error("--blocks must be an even number of at least 2")
    bundles = {
        k: load_bundle(args.models_dir, args.name, v) for k, v in (("A", args.a), ("B", args.b))
    }
    sessions = {k: session(b, args.graph, args.threads) for k, b in bundles.items()}
    a = bundles["A"]
    feed = random_inputs(
        a.config, a.mapper.table_sizes(), 1, args.n, None, np.random.default_rng(0)
    )
    for name in ("item_dense", "user_dense"):  # where the graph takes them
        if name in feed:
            feed[name] = np.abs(feed[name])
    for s in sessions.values():  # warm-up
        for _ in range(max(args.runs // 2, 1)):
            s.run(["probs"], feed)
    per_run: dict[str, list[float]] = {"A": [], "B": []}
    for block in range(args.blocks):
        for side in ("A", "B") if block % 2 == 0 else ("B", "A"):
            s = sessions[side]
            c0 = time.process_time()
            for _ in range(args.runs):
                s.run(["probs"], feed)
            per_run[side].append((time.process_time() - c0) / args.runs * 1e6)
    ma, mb = float(np.median(per_run["A"])), float(np.median(per_run["B"]))
    lower = sum(b < x for b, x in zip(per_run["B"], per_run["A"], strict=True))
    print(
        f"{args.graph}, {args.threads} thread(s), N = {args.n}: A (v{args.a}) {ma:.1f} µs CPU "
        f"per run, B (v{args.b}) {mb:.1f}; B / A {mb / ma:.3f}, B lower in {lower} of "
        f"{args.blocks} blocks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
