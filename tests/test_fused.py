"""The fused AUGRU: the custom-op library (native/), the fused graph in the bundle, and
the service serving it or falling back to model.onnx. CPU kernel here; tests/test_gpu.py
runs the CUDA kernel where a GPU is present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from ctr import native
from ctr.bundle import FUSED_FILE, BundleError, load_bundle
from service.app import create_app
from service.loader import load_into_redis
from service.model import load_model
from service.precision import probe_feeds
from tests.helpers import REDIS_URL, Built, build_bundle, fresh_redis, settings_for


@pytest.fixture(scope="module")
def lib() -> native.OpsLibrary:
    try:
        return native.library()
    except native.NativeError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, lib: native.OpsLibrary) -> dict[str, Built]:
    tmp = tmp_path_factory.mktemp("fused")
    return {mt: build_bundle(tmp / mt, mt) for mt in ("din", "dien")}


def session(data: bytes | str, lib: native.OpsLibrary) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib.path))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def test_library_builds_once_and_reports_its_kernels(lib: native.OpsLibrary) -> None:
    assert lib.path.is_file()
    assert native.describe(lib.path) == lib
    assert native.library() == lib  # same sources and flags: the cached build
    with pytest.raises(native.NativeError, match="does not exist"):
        native.library("/nonexistent/libctr_ops.so")


def test_build_failures_are_native_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeError, match="build step failed"):
        native.build(cuda=False)
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path / "empty")
    with pytest.raises(native.NativeError, match="sources missing"):
        native.build(cuda=False)


def test_dien_bundle_has_a_gated_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    entry = b.fused
    assert entry is not None and entry["file"] == FUSED_FILE
    assert entry["ops"] == ["ctr_ops.AttentionalGRU"]
    assert entry["parity"]["max_abs_diff"] <= 1e-5
    fused = onnx.load_from_string(b.fused_bytes())
    plain = onnx.load(str(b.model_path))
    custom = [n for n in fused.graph.node if n.domain == "ctr_ops"]
    assert [n.op_type for n in custom] == ["AttentionalGRU"]
    # the L=20 unrolled steps are gone: far fewer nodes than the standard graph
    assert len(fused.graph.node) * 3 < len(plain.graph.node)
    assert {o.domain: o.version for o in fused.opset_import}.get("ctr_ops") == 1


def test_din_bundle_has_no_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["din"].models_dir, "din")
    assert b.fused is None
    assert not (b.path / FUSED_FILE).exists()
    with pytest.raises(BundleError, match="no fused graph"):
        b.fused_bytes()


@pytest.mark.parametrize(
    ("users", "n", "hist"), [(1, 1, 20), (1, 300, 20), (1, 40, 0), (4, 77, None)]
)
def test_fused_graph_matches_standard_graph(
    bundles: dict[str, Built], lib: native.OpsLibrary, users: int, n: int, hist: int | None
) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    plain = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
    fused = session(b.fused_bytes(), lib)
    feeds = probe_feeds(b, users, n, seed=n)
    if hist is not None:
        feeds["hist_len"][:] = hist
        feeds["hist"][..., hist:] = 0
    want = plain.run(["probs", "attention"], feeds)
    got = fused.run(["probs", "attention"], feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
    assert got[0].shape == (n,) and np.all((got[0] > 0) & (got[0] < 1))


def test_the_op_rejects_bad_inputs(bundles: dict[str, Built], lib: native.OpsLibrary) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    fused = session(b.fused_bytes(), lib)
    feeds = probe_feeds(b, 2, 5, seed=1)
    feeds["user_idx"] = np.array([0, 1, 1, 0, 0], dtype=np.int64)
    fused.run(["probs"], feeds)
    # the graph's own Gather fails first on a user row past U, the op checks its own too
    feeds["user_idx"] = np.array([0, 1, 2, 0, 0], dtype=np.int64)
    with pytest.raises(Exception, match="out of range|out of bounds|indices"):
        fused.run(["probs"], feeds)


def test_service_serves_fused_graph_with_the_same_scores(bundles: dict[str, Built]) -> None:
    built = bundles["dien"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    user = str(built.frame["user_id"].iloc[0])
    items = [str(i) for i in built.frame["item_id"].drop_duplicates().iloc[:60]]
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items], "explain": True}
    scores = {}
    for mode in ("off", "on"):
        app = create_app(settings_for(built, fused_ops=mode))
        with TestClient(app) as client:
            info = client.get("/v1/models").json()
            assert info["graph"] == ("fused" if mode == "on" else "standard")
            assert info["graph_note"] is None
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
            scores[mode] = {x["item_id"]: x for x in r.json()["items"]}
    assert scores["on"].keys() == scores["off"].keys() == set(items)
    for item, want in scores["off"].items():
        got = scores["on"][item]
        assert abs(got["probability"] - want["probability"]) <= 1e-6
        got_w = {a["item_id"]: a["weight"] for a in got["attention"]}
        want_w = {a["item_id"]: a["weight"] for a in want["attention"]}
        assert got_w == pytest.approx(want_w, abs=1e-6) and want_w


def test_auto_keeps_the_standard_graph_on_cpu(bundles: dict[str, Built]) -> None:
    # fused_ops=auto: CUDA only
    model = load_model(settings_for(bundles["dien"], provider="cpu"))
    assert model.graph == "standard" and model.graph_note == ""


def test_fused_with_fp16_keeps_the_op_in_fp32(bundles: dict[str, Built]) -> None:
    built = bundles["dien"]
    ref = load_model(settings_for(built))
    model = load_model(settings_for(built, fused_ops="on", precision="fp16"))
    assert (model.graph, model.precision) == ("fused", "fp16"), (
        model.graph_note,
        model.precision_note,
    )
    feeds = probe_feeds(ref.bundle, 2, 200, 4)
    diff = np.abs(model.run(feeds, False)[0] - ref.run(feeds, False)[0])
    assert 0 < diff.max() <= 1e-3


def corrupt_copy(built: Built, tmp: Path, mutate: str) -> Built:
    dst = tmp / "models"
    shutil.copytree(built.models_dir, dst)
    path = load_bundle(dst, built.config.name).path
    if mutate == "bytes":
        with (path / FUSED_FILE).open("r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01\x02")
    elif mutate == "missing":
        (path / FUSED_FILE).unlink()
    return Built(built.config, built.frame, dst, built.run_dir, built.version)


@pytest.mark.parametrize("mutate", ["bytes", "missing"])
def test_broken_fused_graph_serves_the_standard_graph(
    bundles: dict[str, Built], tmp_path: Path, mutate: str
) -> None:
    built = corrupt_copy(bundles["dien"], tmp_path, mutate)
    ref = load_model(settings_for(bundles["dien"]))
    model = load_model(settings_for(built, fused_ops="on"))
    assert model.graph == "standard"
    assert ("corrupt" if mutate == "bytes" else "unreadable") in model.graph_note
    feeds = probe_feeds(ref.bundle, 1, 50, 3)
    np.testing.assert_array_equal(model.run(feeds, False)[0], ref.run(feeds, False)[0])
    with TestClient(create_app(settings_for(built, fused_ops="on"))) as client:
        info = client.get("/v1/models").json()
        assert info["graph"] == "standard" and info["graph_note"]
        assert client.get("/readyz").status_code == 200


def test_missing_library_or_nothing_to_fuse_is_said(bundles: dict[str, Built]) -> None:
    model = load_model(settings_for(bundles["dien"], fused_ops="on", ops_library="/nope.so"))
    assert model.graph == "standard" and "/nope.so does not exist" in model.graph_note
    model = load_model(settings_for(bundles["din"], fused_ops="on"))
    assert model.graph == "standard" and "no fused graph" in model.graph_note


def test_manifest_records_the_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    manifest = json.loads((b.path / "manifest.json").read_text())
    assert manifest["fused"]["sha256"] == b.fused["sha256"]  # type: ignore[index]
