"""``ctr profile-graph``: where a bundle's graph spends its time, node by node.

ONNX Runtime's own profiler on the CPU provider: one user with a full history and N
candidates (the shapes the service feeds), each node's mean kernel time over ``runs`` runs
after ``WARM_UP`` more. ``graph="fused"`` profiles ``model_fused.onnx`` with
the custom-op library. Kernel times only: the gaps between nodes and the session's own
overhead are not in the total.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ctr import native
from ctr.bundle import load_bundle
from training.bench_util import full_history_feed

WARM_UP = 5


def profile(
    models_dir: Path, name: str, n: int, graph: str, threads: int, runs: int
) -> dict[str, Any]:
    """Per-node kernel time (µs per run), highest first, and their total."""
    b = load_bundle(models_dir, name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        if graph == "fused":
            so.register_custom_ops_library(str(native.library().path))
            sess = ort.InferenceSession(b.fused_bytes(), so, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(str(b.model_path), so, providers=["CPUExecutionProvider"])
        feed = full_history_feed(b, n)
        for _ in range(runs + WARM_UP):
            sess.run(["probs"], feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    durations: dict[str, list[float]] = {}
    info: dict[str, tuple[str, str]] = {}
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        durations.setdefault(node, []).append(float(e["dur"]))
        args = e.get("args", {})
        info[node] = (args.get("op_name", "?"), json.dumps(args.get("output_type_shape", "")))
    nodes = [  # the first WARM_UP runs of every node are left out
        {"node": k, "op": info[k][0], "us": statistics.fmean(v[WARM_UP:]), "output": info[k][1]}
        for k, v in durations.items()
        if len(v) > WARM_UP
    ]
    nodes.sort(key=lambda x: -x["us"])
    return {"model": name, "graph": graph, "n": n, "threads": threads, "runs": runs,
            "total_us": sum(x["us"] for x in nodes), "nodes": nodes}  # fmt: skip


def render(res: dict[str, Any], top: int) -> str:
    lines = [
        f"{res['model']} ({res['graph']} graph), N={res['n']}, L full, ORT CPU, "
        f"{res['threads']} intra-op threads: kernel time per run, summed over "
        f"{len(res['nodes'])} nodes: {res['total_us']:.0f} µs",
        "",
        "| node | op | µs per run | share | output |",
        "|---|---|---:|---:|---|",
    ]
    for x in res["nodes"][:top]:
        share = x["us"] / res["total_us"] if res["total_us"] else 0.0
        lines.append(
            f"| {x['node'][:60]} | {x['op']} | {x['us']:.0f} | {share:.0%} | {x['output'][:60]} |"
        )
    return "\n".join(lines)
