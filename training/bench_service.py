"""``ctr bench``: the real service, a real Redis and loaded users, driven over HTTP.

For each model (DIN, DIEN at L=50) and N it measures, in one run:

* end-to-end p50/p99 at concurrency 1 (a minimal keep-alive HTTP/1.1 client over
  asyncio streams, precomputed bodies, so client CPU barely counts);
* requests/s and candidates/s at saturation (a sweep of client concurrency), 200
  replies only;
* the per-stage breakdown from the service's own ``/metrics`` (mean per request), and
  per window the degraded responses and service errors (a window with any is invalid);
* the model alone, loaded by the service's own ``load_model`` from the same settings
  and fed what the service builds for the same requests (users, stored histories and
  candidates): latency right before and after the service's c=1 window, and the
  requests it completes over a timed window for each count of concurrent calls the
  service allows, so the service overhead shows as a ratio. A full-history figure is
  kept apart as the worst case.

The client shares the machine with the service: on a 2-core box its CPU use is part
of what is measured, and the report says so.

Its parts: :mod:`training.bench_server` (the service's process),
:mod:`training.bench_client` (the load generators), :mod:`training.bench_metrics` (its
/metrics), :mod:`training.bench_baseline` (the model alone), :mod:`training.bench_measure`
(the windows per N) and :mod:`training.bench_report` (tables and plots).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ctr.bundle import load_bundle
from ctr.spec import load_config
from training.bench_baseline import load_baseline
from training.bench_measure import BODIES, REPS, measure_model
from training.bench_report import workers
from training.bench_server import (
    ROOT,
    device,
    ports_free,
    served_model,
    service_env,
    start_service,
    stop_service,
)
from training.bench_util import uvloop_module


def make_bundle(
    model_type: str, models_dir: Path, length: int, overrides: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """A bundle with random weights (latency does not depend on them) and a real mapping."""
    import torch

    from training.data import load_frame
    from training.dataset import prepare
    from training.export import export_bundle
    from training.models import build_model

    cfg = "synthetic_dien.yaml" if model_type == "dien" else "synthetic_din.yaml"
    config = load_config(
        ROOT / "configs" / cfg,
        {
            "name": f"bench-{model_type}",
            "model.type": model_type,
            "max_seq_len": length,
            **(overrides or {}),
        },
    )
    frame = load_frame(config)
    prep = prepare(config, frame)
    torch.manual_seed(0)
    model = build_model(config, prep.mapper.table_sizes()).eval()
    export_bundle(model, config, prep.mapper, {}, models_dir)
    return config, frame


def bundle_for(
    mt: str, models_dir: Path | None, tmp: str, overrides: dict[str, Any] | None
) -> tuple[Path, Any, Any]:
    """Where the bundle ``mt`` is, its config and its data frame (built when no
    ``models_dir``)."""
    from training.data import load_frame

    if models_dir is not None:
        config = load_bundle(models_dir, mt).config
        return models_dir, config, load_frame(config)
    config, frame = make_bundle(mt, Path(tmp), 50, overrides)
    return Path(tmp), config, frame


def run(
    models: list[str],
    n_values: list[int],
    concurrency: list[int],
    seconds: float,
    threads: int,
    redis_url: str,
    port: int,
    overrides: dict[str, Any] | None = None,
    inflight: int = 1,
    env: dict[str, str] | None = None,
    models_dir: Path | None = None,
    rates: list[float] | None = None,
    writes: float = 0.0,
) -> dict[str, Any]:
    """``inflight``: the service's ``CTR_INFERENCE_CONCURRENCY`` (ORT runs in flight).
    ``writes``: the share of closed-loop requests before which the client appends a
    behaviour to the request's user in Redis (:mod:`training.bench_writes`).
    ``env``: more ``CTR_*`` settings for the service (e.g. ``CTR_PROVIDER=cuda``); the
    model-only baseline is loaded by the service's own loader from the same settings.
    ``models_dir``: score existing bundles, named by ``models``, instead of building.
    ``rates``: also drive each N open-loop at these request rates (req/s)."""
    from service.loader import load_bench_db

    env = env or {}
    results: dict[str, Any] = {
        "threads": threads,
        "inflight": inflight,
        "env": env,
        "device": device(env),
        "client_loop": "asyncio" if uvloop_module() is None else "uvloop",
        "seconds": seconds,
        "bodies": BODIES,
        "writes": writes,
        "models": {},
    }
    ports_free(port)
    with tempfile.TemporaryDirectory() as tmp:
        for mt in models:
            where, config, frame = bundle_for(mt, models_dir, tmp, overrides)
            load_bench_db(config, frame, redis_url)
            svc_env = service_env(where, config.name, redis_url, threads, inflight, env)
            base = load_baseline(svc_env)
            proc, url = start_service(svc_env, port)
            try:
                graphs = {"service": served_model(url, env=svc_env),
                          "model_only": base.describe()}  # fmt: skip
                plan = {"seconds": seconds, "concurrency": concurrency, "rates": rates or [],
                        "reps": REPS, "loop_cpu": workers(results) == 1,
                        "writes": (redis_url, writes, config.max_seq_len)}  # fmt: skip
                results["models"][mt] = measure_model(
                    mt, url, proc.pid, base, frame, n_values, {**plan, "graphs": graphs}
                )
                results["models"][mt]["L"] = config.max_seq_len
            finally:
                stop_service(proc)
    return results
