"""GPU-only checks, skipped where ONNX Runtime has no CUDA provider (CI has none; run
them on a GPU machine with onnxruntime-gpu): real CUDA graphs against the CPU
provider, fp16 on the GPU, the fused AUGRU's CUDA kernel, and the service on CUDA with
graphs and micro-batching."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.loader import load_into_redis
from service.model import load_model
from service.precision import probe_feeds
from tests.helpers import REDIS_URL, Built, build_bundle, fresh_redis, settings_for

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="ONNX Runtime has no CUDA provider here",
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    tmp = tmp_path_factory.mktemp("gpu")
    return {mt: build_bundle(tmp / mt, mt) for mt in ("din", "dien")}


@pytest.mark.parametrize(("mt", "fused"), [("din", "auto"), ("dien", "off"), ("dien", "auto")])
def test_cuda_graphs_match_cpu(bundles: dict[str, Built], mt: str, fused: str) -> None:
    cpu = load_model(settings_for(bundles[mt], provider="cpu", fused_ops="off"))
    gpu = load_model(
        settings_for(
            bundles[mt],
            provider="cuda",
            cuda_graph=True,
            cuda_graph_buckets="64,512",
            fused_ops=fused,
        )  # fmt: skip
    )
    assert gpu.provider == "CUDAExecutionProvider" and gpu.runner.kind == "cuda_graph"
    # auto: DIEN's AUGRU runs as the custom op's CUDA kernel (its CUDA variant graph, the
    # attention unit unfused); DIN's fused graph has only the CPU-only attention op
    want_graph = "fused" if (mt, fused) == ("dien", "auto") else "standard"
    assert gpu.graph == want_graph, gpu.graph_note
    if want_graph == "fused":
        assert gpu.graph_ops == ["ctr_ops.AttentionalGRU"]
    elif fused == "auto":
        assert "ctr_ops.DinAttention has no CUDA kernel" in gpu.graph_note
    for users, n, seed in ((1, 50, 0), (1, 64, 1), (3, 65, 2), (1, 500, 3), (2, 700, 4),
                           (1, 50, 5)):  # fmt: skip
        feeds = probe_feeds(cpu.bundle, users, n, seed)
        want = cpu.run(feeds, True)
        got = gpu.run(feeds, True)
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)


def test_direct_copies_pass_their_check_on_cuda_and_match_cpu(bundles: dict[str, Built]) -> None:
    """``CTR_GPU_COPY=direct``: cudaMemcpy through ctypes from ORT's own CUDA runtime
    passes its round-trip check against ORT's copies on the real device buffers (else
    the runner says why and uses ORT's), and the scores match the CPU's."""
    from service.runner import copy_info

    cpu = load_model(settings_for(bundles["dien"], provider="cpu", fused_ops="off"))
    gpu = load_model(settings_for(bundles["dien"], provider="cuda", cuda_graph=True,
                                  cuda_graph_buckets="64,512", gpu_copy="direct"))  # fmt: skip
    assert copy_info(gpu.runner) == {"copy": "direct", "note": None}
    for users, n, seed in ((1, 50, 0), (3, 65, 2), (1, 500, 3), (2, 700, 4)):
        feeds = probe_feeds(cpu.bundle, users, n, seed)
        want, got = cpu.run(feeds, True), gpu.run(feeds, True)
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("mt", "fused"), [("din", "auto"), ("dien", "off"), ("dien", "auto")])
def test_fp16_on_gpu(bundles: dict[str, Built], mt: str, fused: str) -> None:
    cpu = load_model(settings_for(bundles[mt], provider="cpu"))
    gpu = load_model(settings_for(bundles[mt], provider="cuda", cuda_graph=True, precision="fp16",
                                  fused_ops=fused))  # fmt: skip
    assert gpu.precision == "fp16", gpu.precision_note
    assert gpu.graph == ("fused" if (mt, fused) == ("dien", "auto") else "standard")
    feeds = probe_feeds(cpu.bundle, 3, 400, 7)
    diff = np.abs(gpu.run(feeds, False)[0] - cpu.run(feeds, False)[0])
    assert diff.max() <= 1e-3


@pytest.mark.parametrize(("streams", "fused"), [(1, "off"), (2, "off"), (1, "auto")])
def test_service_on_cuda_with_batching(bundles: dict[str, Built], streams: int, fused: str) -> None:
    built = bundles["dien"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    items = built.frame["item_id"].astype(str).unique().tolist()
    bodies = [
        {"user_id": f"u{k}", "candidates": [{"item_id": i} for i in items[k : k + 30 + 9 * k]],
         "explain": k % 2 == 0}
        for k in range(1, 9)
    ]  # fmt: skip
    with TestClient(create_app(settings_for(built, provider="cpu"))) as c:
        want = [c.post("/v1/score", json=b).json() for b in bodies]
    s = settings_for(
        built,
        provider="cuda",
        cuda_graph=True,
        batch_max_users=8,
        batch_wait_ms=50,
        inference_concurrency=2,  # two executor threads feed the runner's one graph thread
        cuda_graph_streams=streams,
        fused_ops=fused,
    )
    with TestClient(create_app(s)) as c:
        info = c.get("/v1/models").json()
        assert info["runner"] == "cuda_graph" and info["micro_batching"] is True
        assert info["graph"] == ("fused" if fused == "auto" else "standard"), info["graph_note"]
        model = c.app.state.ctr.model  # type: ignore[attr-defined]
        assert model.streams == streams and model.batcher.slots == streams
        runner = model.runner
        captured = len(runner.slots)
        before = c.get("/metrics").text  # the registry is per process: compare deltas
        got: list[dict | None] = [None] * len(bodies)

        def post(k: int) -> None:
            got[k] = c.post("/v1/score", json=bodies[k]).json()

        threads = [threading.Thread(target=post, args=(k,)) for k in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(runner.slots) == captured  # every call replayed a graph captured at load
        metrics = c.get("/metrics").text
    count = _count(metrics) - _count(before)
    assert count < len(bodies)  # requests were merged
    for a, b in zip(want, got, strict=True):
        assert b is not None
        pa = {i["item_id"]: i["probability"] for i in a["items"]}
        pb = {i["item_id"]: i["probability"] for i in b["items"]}
        assert pa.keys() == pb.keys()
        assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-5
        assert ("attention" in a["items"][0]) == ("attention" in b["items"][0])


def _count(metrics: str) -> float:
    return next(
        float(x.split()[1]) for x in metrics.splitlines() if x.startswith("ctr_batch_users_count ")
    )
