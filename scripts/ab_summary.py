"""Table of the runs written by scripts/gpu_ab.sh: one row per (variant, repeat)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    print(
        "| variant | rep | c=1 p50 ms | loop CPU ms/req | inference ms | open loop: offered"
        " req/s → achieved, p50 / p99 ms | served (provider, runner, graph, precision, copy) |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    for path in sorted(Path(folder).glob("*.json"), key=lambda p: p.stem.split("_")[::-1]):
        variant, rep = path.stem.rsplit("_", 1)
        for r in json.loads(path.read_text())["models"].values():
            for n, s in r["single"].items():
                runs = "; ".join(
                    f"{o['rate']:.0f} → {o['rps']:.0f}, {o['p50_ms']:.2f} / {o['p99_ms']:.2f}"
                    + (
                        f" (service GC {o['service_gc']['count']:.0f}x,"
                        f" {o['service_gc']['total_ms']:.1f} ms)"
                        if "service_gc" in o
                        else ""
                    )
                    + (
                        " [over 30 ms: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in o["slow_over_30ms"].items())
                        + "]"
                        if o.get("slow_over_30ms")
                        else ""
                    )
                    for o in r["open_loop"][n]
                )
                cpu = s.get("loop_cpu_ms")
                # what the service really served: a variant whose setting fell back
                # (CPU session, no graphs, standard graph, ort copies) must not pass unseen
                sv = r.get("graphs", {}).get("service", {})
                copy = (sv.get("gpu_copy") or {}).get("copy", "-")
                served = ", ".join(str(sv.get(k, "?")) for k in ("provider", "runner", "graph",
                                                                  "precision"))  # fmt: skip
                print(
                    f"| {variant} | {rep} | {s['p50_ms']:.2f} | "
                    f"{'-' if cpu is None else f'{cpu:.2f}'} | "
                    f"{s['stages_ms']['inference']:.2f} | {runs} | {served}, {copy} |"
                )


if __name__ == "__main__":
    main(sys.argv[1])
