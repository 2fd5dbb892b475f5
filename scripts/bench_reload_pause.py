"""Where a model load stops the event loop: the longest pauses of a 1 ms ticker on an
asyncio loop while ``service.model.load_model`` runs in a thread, as a reload runs it,
each named by the load's steps it overlaps (ONNX Runtime sessions, the fused and shared
sessions, the native runner, the manifest's read).

Builds a DIN bundle whose user table has ``--buckets`` hash rows (2,000,000: a 64 MB
table, as ``ctr bench-pair --set features.0.mapping.buckets=2000000``), or loads
``--models-dir``/``--name``. One warm load first (the custom-op library, caches), then
``--repeat`` timed ones for each way of giving sessions the graph (``--graph-as``),
alternated.

Usage: .venv/bin/python scripts/bench_reload_pause.py [--buckets 2000000] [--repeat 2]
       [--models-dir DIR --name NAME] [--min-ms 15] [--graph-as file,bytes]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def instrument(events: list[tuple[str, float, float]]) -> None:
    """Record (step, start, end) of the load's steps into ``events``."""
    import onnxruntime as ort

    import service.model as sm

    def wrap(owner: Any, attr: str, label: str) -> None:
        real = getattr(owner, attr)

        @functools.wraps(real)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                events.append((label, start, time.perf_counter()))

        setattr(owner, attr, timed)

    for attr in ("load_bundle", "fused_session", "shared_session", "make_native", "warm_up"):
        wrap(sm, attr, attr)
    real_init: Callable[..., None] = ort.InferenceSession.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            real_init(self, *args, **kwargs)
        finally:
            source = "bytes" if isinstance(args[0] if args else None, bytes) else "path"
            events.append((f"InferenceSession({source})", start, time.perf_counter()))

    ort.InferenceSession.__init__ = init  # type: ignore[method-assign]


async def ticked(
    load: Callable[[], Any], min_s: float
) -> tuple[float, float, list[tuple[float, float]]]:
    """The load's wall time, the longest tick interval, and the intervals of ``min_s``
    or more."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    job = loop.run_in_executor(None, load)
    last, longest, gaps = time.perf_counter(), 0.0, []
    while not job.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        if now - last >= min_s:
            gaps.append((last, now))
        last = now
    await job
    return time.perf_counter() - start, longest, gaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buckets", type=int, default=2_000_000)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--name", default="bench-din")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--min-ms", type=float, default=15.0, help="shortest pause listed")
    ap.add_argument(
        "--graph-as",
        default="file,bytes",
        help="how sessions get the graph, alternated run by run: file (the service's "
        "way for graphs of 4 MB or more, service/graphfile.py) and/or bytes (before)",
    )
    args = ap.parse_args()

    from service.model import load_model
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        models = args.models_dir
        if models is None:
            from training.bench_service import make_bundle

            over = {"features.0.mapping.buckets": args.buckets}
            make_bundle("din", Path(tmp), 50, over)
            models = Path(tmp)
        settings = Settings(models_dir=str(models), model_name=args.name)
        events: list[tuple[str, float, float]] = []
        instrument(events)
        load_model(settings)  # warm
        what = f"user table {args.buckets:,} rows" if args.models_dir is None else str(models)
        print(f"command: {' '.join(sys.argv)}")
        print(f"load_model of {args.name} ({what}), a 1 ms ticker on the event loop:")
        import service.graphfile as graphfile

        modes = args.graph_as.split(",")
        default = graphfile.FILE_MIN_BYTES
        for k in range(args.repeat * len(modes)):
            mode = modes[k % len(modes)]
            graphfile.FILE_MIN_BYTES = default if mode == "file" else 1 << 62
            events.clear()
            total, worst, gaps = asyncio.run(
                ticked(lambda: load_model(settings), args.min_ms / 1e3)
            )
            t0 = min(e[1] for e in events)
            print(f"  run {k // len(modes) + 1}, graph as {mode}: load {total * 1e3:.0f} ms, "
                  f"{len(gaps)} pauses of {args.min_ms:.0f} ms or more, longest tick "
                  f"{worst * 1e3:.1f} ms (1 ms sleeps)")  # fmt: skip
            for a, b in gaps:
                steps = [f"{n} {(e - s) * 1e3:.0f} ms" for n, s, e in events if s < b and e > a]
                print(f"    {(a - t0) * 1e3:6.0f} ms +{(b - a) * 1e3:5.1f}: within {steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
