"""The fused graphs: the custom-op library (native/), the fused graph in the bundle (DIEN's
AUGRU, DIN's activation unit), and the service serving it or falling back to model.onnx.
CPU kernels here; tests/test_gpu.py runs the CUDA kernel where a GPU is present.
tests/test_fused_din.py checks the DIN op itself against torch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from ctr import native
from ctr.bundle import FUSED_CUDA_FILE, FUSED_FILE, BundleError, load_bundle
from service.app import create_app
from service.loader import load_into_redis
from service.model import load_model
from service.precision import probe_feeds
from tests.helpers import (
    REDIS_URL,
    Built,
    assert_same_attention,
    build_bundle,
    fresh_redis,
    settings_for,
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, lib: native.OpsLibrary) -> dict[str, Built]:
    tmp = tmp_path_factory.mktemp("fused")
    return {mt: build_bundle(tmp / mt, mt) for mt in ("din", "dien", "deepfm")}


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
    with pytest.raises(native.NativeError, match="cannot run"):
        native.build(cuda=False)
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path / "empty")
    with pytest.raises(native.NativeError, match="sources missing"):
        native.build(cuda=False)


def test_a_failed_cuda_build_keeps_the_cpu_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lib: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Automatic mode on a machine with nvcc and a CUDA-capable ORT: when the CUDA step
    fails (here an nvcc that rejects everything), the library is built without the CUDA
    kernel instead of not at all, so the CPU kernels (and the fused graph) stay."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc fatal : unsupported host compiler' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(native, "find_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(native, "_ort_has_cuda", lambda: True)
    before = set(native.cache_dir().iterdir())
    with pytest.raises(native.NativeError, match="unsupported host compiler"):
        native.build(cuda=True)  # asked for explicitly: still an error
    # and it leaves no empty folder in the cache (one per failed digest, for good)
    assert [p for p in set(native.cache_dir().iterdir()) - before if not any(p.iterdir())] == []
    with caplog.at_level(logging.WARNING, logger="ctr.native"):
        built = native.build()
    assert built.cuda is False and built.path.is_file()
    assert "with the CUDA kernel failed" in caplog.text
    assert "unsupported host compiler" in caplog.text
    op_only(built)  # and it loads and runs


def test_dien_bundle_has_a_gated_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    entry = b.fused
    assert entry is not None and entry["file"] == FUSED_FILE
    assert entry["ops"] == ["ctr_ops.AttentionalGRU", "ctr_ops.DinAttention"]
    assert entry["parity"]["max_abs_diff"] <= 1e-5
    fused = onnx.load_from_string(b.fused_bytes())
    plain = onnx.load(str(b.model_path))
    custom = [n for n in fused.graph.node if n.domain == "ctr_ops"]
    assert sorted(n.op_type for n in custom) == ["AttentionalGRU", "DinAttention"]
    # the L=20 unrolled steps are gone: far fewer nodes than the standard graph
    assert len(fused.graph.node) * 3 < len(plain.graph.node)
    assert {o.domain: o.version for o in fused.opset_import}.get("ctr_ops") == 1
    # for CUDA: only the op with a CUDA kernel fused, gated the same way
    cuda = b.fused_cuda
    assert cuda is not None and cuda["file"] == FUSED_CUDA_FILE
    assert cuda["ops"] == ["ctr_ops.AttentionalGRU"] and cuda["parity"]["max_abs_diff"] <= 1e-5
    graph = onnx.load_from_string(b.fused_bytes(cuda=True)).graph
    assert [n.op_type for n in graph.node if n.domain == "ctr_ops"] == ["AttentionalGRU"]
    assert len(fused.graph.node) < len(graph.node) < len(plain.graph.node)


def test_din_bundle_has_a_gated_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["din"].models_dir, "din")
    entry = b.fused
    assert entry is not None and entry["ops"] == ["ctr_ops.DinAttention"]
    assert entry["parity"]["max_abs_diff"] <= 1e-5
    assert b.fused_cuda is None  # nothing in it has a CUDA kernel: no CUDA variant
    with pytest.raises(BundleError, match="no CUDA variant"):
        b.fused_bytes(cuda=True)
    fused = onnx.load_from_string(b.fused_bytes())
    custom = [n for n in fused.graph.node if n.domain == "ctr_ops"]
    assert [n.op_type for n in custom] == ["DinAttention"]  # one behaviour group
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    m = bundles["din"].config.model
    assert attrs == {
        "widths": m.attention_mlp,
        "act": native.DIN_ACTS[m.attention_act],
        "softmax": int(m.attention_softmax),
    }
    plain = onnx.load(str(b.model_path))
    assert len(fused.graph.node) < len(plain.graph.node)


def test_a_model_with_nothing_to_fuse_has_no_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["deepfm"].models_dir, "deepfm")
    assert b.fused is None
    assert not (b.path / FUSED_FILE).exists()
    with pytest.raises(BundleError, match="no fused graph"):
        b.fused_bytes()


@pytest.mark.parametrize("mt", ["dien", "din"])
@pytest.mark.parametrize(
    ("users", "n", "hist"), [(1, 1, 20), (1, 300, 20), (1, 40, 0), (4, 77, None)]
)
def test_fused_graph_matches_standard_graph(
    bundles: dict[str, Built], lib: native.OpsLibrary, mt: str, users: int, n: int,
    hist: int | None,
) -> None:  # fmt: skip
    b = load_bundle(bundles[mt].models_dir, mt)
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


def op_only(lib: native.OpsLibrary) -> ort.InferenceSession:
    """A graph of the one custom node, so its own input checks are what runs."""
    from onnx import TensorProto, helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    node = helper.make_node(
        "AttentionalGRU", ["x", "att", "idx", "w", "b"], ["h"], domain="ctr_ops"
    )
    graph = helper.make_graph(
        [node],
        "op",
        [
            helper.make_tensor_value_info("x", f, ["U", "L", "G"]),
            helper.make_tensor_value_info("att", f, ["N", "L"]),
            helper.make_tensor_value_info("idx", i64, ["N"]),
            helper.make_tensor_value_info("w", f, ["G", "H"]),
            helper.make_tensor_value_info("b", f, ["G"]),
        ],
        [helper.make_tensor_value_info("h", f, ["N", "H"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ctr_ops", 1)]
    )
    return session(model.SerializeToString(), lib)


def op_feeds(users: int, n: int, steps: int, hd: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "x": rng.normal(size=(users, steps, 3 * hd)).astype(np.float32),
        "att": rng.uniform(0, 1, size=(n, steps)).astype(np.float32),
        "idx": rng.integers(0, users, size=n).astype(np.int64),
        "w": rng.normal(size=(3 * hd, hd)).astype(np.float32) * 0.3,
        "b": rng.normal(size=3 * hd).astype(np.float32),
    }


def test_the_op_matches_the_torch_recurrence(lib: native.OpsLibrary) -> None:
    import torch

    from training.models import evolve

    sess = op_only(lib)
    for users, n, steps, hd in ((2, 37, 9, 16), (1, 5, 4, 7)):  # 7: not a multiple of 8
        feeds = op_feeds(users, n, steps, hd)
        feeds["att"][0, :] = 0.0  # a candidate that never updates: h stays 0
        got = sess.run(["h"], feeds)[0]
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        want = evolve(t["x"], t["att"], t["idx"], t["w"], t["b"], "augru").numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        assert np.all(got[0] == 0.0)


def test_the_op_rejects_bad_inputs(lib: native.OpsLibrary) -> None:
    sess = op_only(lib)
    feeds = op_feeds(2, 5, 4, 8)
    for bad in (2, -1):  # past U, negative
        f = dict(feeds, idx=np.array([0, 1, bad, 0, 1], dtype=np.int64))
        with pytest.raises(Exception, match="user_idx out of range"):
            sess.run(["h"], f)
    with pytest.raises(Exception, match=r"att must be \[N, L\]"):
        sess.run(["h"], dict(feeds, att=feeds["att"][:, :3]))
    with pytest.raises(Exception, match=r"w_hh must be \[3H, H\]"):
        sess.run(["h"], dict(feeds, w=feeds["w"][:, :4]))
    with pytest.raises(Exception, match="hidden size"):
        sess.run(["h"], op_feeds(1, 2, 3, 65))


def test_a_candidate_does_not_depend_on_its_block_neighbours(lib: native.OpsLibrary) -> None:
    sess = op_only(lib)
    feeds = op_feeds(3, 40, 6, 16)
    feeds["att"][::3, 2:4] = 0.0  # some candidates skip steps their neighbours take
    whole = sess.run(["h"], feeds)[0]
    for rows in (np.arange(0, 40, 3), np.arange(5, 6), np.arange(39, 4, -7)):
        part = dict(feeds, att=feeds["att"][rows], idx=feeds["idx"][rows])
        np.testing.assert_array_equal(sess.run(["h"], part)[0], whole[rows])


def test_a_library_that_would_crash_is_refused(tmp_path: Path, lib: Any) -> None:
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx is not None  # the lib fixture built the real one with it (else: skipped)
    src = tmp_path / "bad.cc"
    src.write_text(
        'extern "C" int CtrOpsHasCuda() { return 0; }\n'
        'extern "C" int CtrOpsSelfTest() { __builtin_trap(); }\n'  # like SIGILL on a CPU
    )
    bad = tmp_path / "libbad.so"
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(bad)], check=True)
    with pytest.raises(native.NativeError, match="killed by signal"):
        native.library(str(bad))
    # one whose self-test passes but whose registration with ORT would crash (a foreign
    # or stale library): refused too, found in the child, not in the serving process
    src.write_text(
        'extern "C" int CtrOpsHasCuda() { return 0; }\n'
        'extern "C" int CtrOpsSelfTest() { return 1; }\n'
        'extern "C" void* RegisterCustomOps(void*, const void*) { __builtin_trap(); }\n'
    )
    trap = tmp_path / "libtrap.so"
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(trap)], check=True)
    with pytest.raises(native.NativeError, match="killed by signal"):
        native.library(str(trap))


OLD_ORT = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
seen = []
CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
create = CREATE(lambda code, msg: seen.append((code, msg.decode())) or 0xC0FFEE)
api_v1 = (ctypes.c_void_p * 1)(ctypes.cast(create, ctypes.c_void_p))  # CreateStatus first
GET_API = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
get_api = GET_API(lambda v: ctypes.addressof(api_v1) if v == 1 else None)  # no API 21
VERSION = ctypes.CFUNCTYPE(ctypes.c_char_p)
version = VERSION(lambda: b"1.14.1")
base = (ctypes.c_void_p * 2)(ctypes.cast(get_api, ctypes.c_void_p),
                             ctypes.cast(version, ctypes.c_void_p))
lib.RegisterCustomOps.restype = ctypes.c_void_p
lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
status = lib.RegisterCustomOps(None, ctypes.addressof(base))
print(hex(status or 0), seen)
"""


def test_an_onnx_runtime_too_old_gets_an_error_not_a_silent_success(
    tmp_path: Path, lib: native.OpsLibrary
) -> None:
    """An ORT without the C API version the ops are built against (21) hands back no
    API: registration fails with a status that names both versions, instead of
    returning success with no op registered (a later "not a registered function")."""
    import subprocess
    import sys

    script = tmp_path / "old_ort.py"
    script.write_text(OLD_ORT)
    out = subprocess.run(
        [sys.executable, str(script), str(lib.path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    status, _, seen = out.stdout.strip().partition(" ")
    assert status == "0xc0ffee"
    assert "needs ONNX Runtime API 21 or newer; this is ONNX Runtime 1.14.1" in seen
    assert seen.startswith("[(1, ")  # ORT_FAIL


def test_a_corrupt_cached_build_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lib: Any
) -> None:
    monkeypatch.setenv("CTR_OPS_CACHE", str(tmp_path))
    first = native.build(cuda=False)
    good = first.path.read_bytes()
    first.path.write_bytes(good[: len(good) // 2])  # e.g. a build cut off by a crash
    again = native.build(cuda=False)
    assert again.path == first.path and again.path.read_bytes() == good
    op_only(again)  # and it loads


@pytest.mark.parametrize("mt", ["dien", "din"])
def test_service_serves_fused_graph_with_the_same_scores(
    bundles: dict[str, Built], mt: str
) -> None:
    built = bundles[mt]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    user = str(built.frame["user_id"].iloc[0])
    items = [str(i) for i in built.frame["item_id"].drop_duplicates().iloc[:60]]
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items], "explain": True}
    scores = {}
    for mode in ("off", "on"):
        # every history step explained: a tie cannot straddle the cut (assert_same_attention)
        app = create_app(settings_for(built, fused_ops=mode, explain_top=1000))
        with TestClient(app) as client:
            info = client.get("/v1/models").json()
            assert info["graph"] == ("fused" if mode == "on" else "standard")
            assert info["graph_note"] is None
            ops = load_bundle(built.models_dir, mt).fused["ops"]  # type: ignore[index]
            assert info["graph_ops"] == (ops if mode == "on" else [])
            graph = info["graph"]
            assert f'graph="{graph}"' in client.get("/metrics").text  # ctr_model_info
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
            scores[mode] = {x["item_id"]: x for x in r.json()["items"]}
    assert scores["on"].keys() == scores["off"].keys() == set(items)
    for item, want in scores["off"].items():
        got = scores["on"][item]
        assert abs(got["probability"] - want["probability"]) <= 1e-6
        assert_same_attention(got["attention"], want["attention"])


def test_auto_serves_the_fused_graph_where_the_bundle_has_one(bundles: dict[str, Built]) -> None:
    model = load_model(settings_for(bundles["dien"], provider="cpu"))  # fused_ops=auto
    assert model.graph == "fused" and model.graph_note == ""
    model = load_model(settings_for(bundles["din"], provider="cpu"))
    assert model.graph == "fused" and model.graph_note == ""
    model = load_model(settings_for(bundles["deepfm"], provider="cpu"))
    assert model.graph == "standard" and model.graph_note == ""  # nothing to fuse: no note


@pytest.mark.parametrize("mt", ["dien", "din"])
def test_fused_with_fp16_keeps_the_op_in_fp32(bundles: dict[str, Built], mt: str) -> None:
    built = bundles[mt]
    ref = load_model(settings_for(built, fused_ops="off"))
    model = load_model(settings_for(built, fused_ops="on", precision="fp16"))
    assert (model.graph, model.precision) == ("fused", "fp16"), (
        model.graph_note,
        model.precision_note,
    )
    feeds = probe_feeds(ref.bundle, 2, 200, 4)
    diff = np.abs(model.run(feeds, False)[0] - ref.run(feeds, False)[0])
    assert 0 < diff.max() <= 1e-3


def bundle_copy(built: Built, tmp: Path) -> tuple[Built, Path]:
    """A copy of the model store, and the copied bundle's folder."""
    dst = tmp / "models"
    shutil.copytree(built.models_dir, dst)
    copy = Built(built.config, built.frame, dst, built.run_dir, built.version)
    return copy, load_bundle(dst, built.config.name).path


def corrupt_copy(built: Built, tmp: Path, mutate: str) -> Built:
    copy, path = bundle_copy(built, tmp)
    if mutate == "bytes":
        with (path / FUSED_FILE).open("r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01\x02")
    elif mutate == "missing":
        (path / FUSED_FILE).unlink()
    return copy


@pytest.mark.parametrize("mutate", ["bytes", "missing"])
def test_broken_fused_graph_serves_the_standard_graph(
    bundles: dict[str, Built], tmp_path: Path, mutate: str
) -> None:
    built = corrupt_copy(bundles["dien"], tmp_path, mutate)
    ref = load_model(settings_for(bundles["dien"], fused_ops="off"))
    model = load_model(settings_for(built, fused_ops="on"))
    assert model.graph == "standard"
    assert ("corrupt" if mutate == "bytes" else "unreadable") in model.graph_note
    feeds = probe_feeds(ref.bundle, 1, 50, 3)
    np.testing.assert_array_equal(model.run(feeds, False)[0], ref.run(feeds, False)[0])
    with TestClient(create_app(settings_for(built, fused_ops="on"))) as client:
        info = client.get("/v1/models").json()
        assert info["graph"] == "standard" and info["graph_note"]
        assert client.get("/readyz").status_code == 200


def test_parity_miss_or_a_bad_library_serves_the_standard_graph(
    bundles: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.model as service_model

    with monkeypatch.context() as m:
        m.setattr(service_model, "FUSED_TOLERANCE", -1.0)
        model = load_model(settings_for(bundles["dien"], fused_ops="on"))
    assert model.graph == "standard" and "parity" in model.graph_note
    junk = tmp_path / "libjunk.so"
    junk.write_text("not a shared library")
    model = load_model(settings_for(bundles["dien"], fused_ops="on", ops_library=str(junk)))
    assert model.graph == "standard" and "libjunk.so" in model.graph_note


def test_a_fused_gate_failure_publishes_without_the_fused_graph(
    bundles: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.export as ex
    from training.train import load_run

    real = ex.parity_gate

    def gate(model: object, path: Path, *a: object, **kw: object) -> ex.ParityReport:
        report = real(model, path, *a, **kw)  # type: ignore[arg-type]
        if kw.get("ops_library") is not None:  # only the fused graph's gate fails
            return ex.ParityReport(1.0, report.cases)
        return report

    monkeypatch.setattr(ex, "parity_gate", gate)
    built = bundles["dien"]
    config, mapper, model, metrics = load_run(built.run_dir)
    version, path, report = ex.export_bundle(model, config, mapper, metrics, tmp_path)
    assert report.ok
    assert json.loads((path / "manifest.json").read_text())["fused"] is None
    assert not (path / FUSED_FILE).exists()


def test_missing_library_or_nothing_to_fuse_is_said(bundles: dict[str, Built]) -> None:
    model = load_model(settings_for(bundles["dien"], fused_ops="on", ops_library="/nope.so"))
    assert model.graph == "standard" and "/nope.so does not exist" in model.graph_note
    model = load_model(settings_for(bundles["deepfm"], fused_ops="on"))
    assert model.graph == "standard" and "no fused graph" in model.graph_note


def test_manifest_records_the_fused_graph(bundles: dict[str, Built]) -> None:
    b = load_bundle(bundles["dien"].models_dir, "dien")
    manifest = json.loads((b.path / "manifest.json").read_text())
    assert manifest["fused"]["sha256"] == b.fused["sha256"]  # type: ignore[index]


def test_service_serves_fused_graph_from_a_prebuilt_level_folder(
    bundles: dict[str, Built], ops_levels: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CTR_OPS_LIBRARY=DIR (``ctr build-ops --arch ... --out DIR``): the highest level
    this CPU runs is served; a folder with nothing usable falls back, naming the level."""
    built = bundles["dien"]
    best = native.supported_levels()[0]
    with caplog.at_level(logging.INFO):
        app = create_app(settings_for(built, fused_ops="on", ops_library=str(ops_levels)))
        with TestClient(app) as client:
            info = client.get("/v1/models").json()
            assert (info["graph"], info["graph_note"]) == ("fused", None)
    kept = [r.getMessage() for r in caplog.records if "fused graph kept" in r.getMessage()]
    assert kept and f"{ops_levels / best / native.LIB_NAME} (level {best})" in kept[0]
    broken = tmp_path / "ops"
    shutil.copytree(ops_levels / best, broken / best)
    lib = broken / best / native.LIB_NAME
    lib.write_bytes(lib.read_bytes()[:1000])
    model = load_model(settings_for(built, fused_ops="on", ops_library=str(broken)))
    assert model.graph == "standard"
    assert f"no usable custom-op library in {broken}: {best}: sha256" in model.graph_note


class OnCuda:
    """A real CPU session that says it runs on CUDA: the service's GPU branch of the
    fused-graph choice, run on a machine without a GPU."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self.sess = sess

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, *args: object, **kw: object) -> object:
        return self.sess.run(*args, **kw)  # type: ignore[arg-type]


def edited_copy(built: Built, tmp: Path, edit: object) -> Built:
    """A copy of the bundle with its manifest changed by ``edit(manifest)``."""
    copy, folder = bundle_copy(built, tmp)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest))
    return copy


def choose(built: Built, on_cuda: bool) -> tuple[list[str], bytes]:
    """The fused graph the service picks for ``built`` (its custom ops and bytes)."""
    from service.model import _session, fused_session, session_options

    settings = settings_for(built, fused_ops="on", provider="cpu")
    b = load_bundle(built.models_dir, built.config.name)
    so = session_options(settings)
    ref = _session(b, b.model_path.read_bytes(), so, ["CPUExecutionProvider"], False)
    so = session_options(settings)
    _, data, ops = fused_session(
        settings, b, OnCuda(ref) if on_cuda else ref, so, ["CPUExecutionProvider"], False
    )
    return ops, data


def test_cuda_gets_only_ops_with_a_cuda_kernel(
    bundles: dict[str, Built], lib: native.OpsLibrary, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """On CUDA (faked: a library that says it has the CUDA kernel, a session that says it
    runs there), DIEN gets model_fused_cuda.onnx (AUGRU only) and DIN, whose fused graph
    holds the CPU-only attention op, is refused; the CPU gets model_fused.onnx."""
    from service.model import FusedError

    monkeypatch.setattr(native, "library", lambda path=None: native.OpsLibrary(lib.path, True))
    dien = load_bundle(bundles["dien"].models_dir, "dien")
    ops, data = choose(bundles["dien"], on_cuda=True)
    assert ops == ["ctr_ops.AttentionalGRU"] and data == dien.fused_bytes(cuda=True)
    ops, data = choose(bundles["dien"], on_cuda=False)
    assert ops == ["ctr_ops.AttentionalGRU", "ctr_ops.DinAttention"]
    assert data == dien.fused_bytes()
    with pytest.raises(FusedError, match="ctr_ops.DinAttention has no CUDA kernel"):
        choose(bundles["din"], on_cuda=True)
    # a manifest that does not say which ops its fused graph holds: never on CUDA
    unlisted = edited_copy(bundles["din"], tmp_path / "a", lambda m: m["fused"].pop("ops"))
    with pytest.raises(FusedError, match="does not list the fused graph's custom ops"):
        choose(unlisted, on_cuda=True)
    assert choose(unlisted, on_cuda=False)[0] == []  # the CPU runs either op


def test_a_bundle_with_only_the_cuda_variant_serves_it(
    bundles: dict[str, Built], tmp_path: Path
) -> None:
    """model_fused.onnx failed its gate but model_fused_cuda.onnx passed: auto serves the
    variant (its op has a CPU kernel too)."""
    built = edited_copy(bundles["dien"], tmp_path, lambda m: m.update(fused=None))
    model = load_model(settings_for(built, provider="cpu"))  # fused_ops=auto
    assert model.graph == "fused", model.graph_note
    assert model.graph_ops == ["ctr_ops.AttentionalGRU"]


def test_the_cache_key_holds_the_gpu_that_native_compiles_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``-arch=native`` compiles the CUDA kernel for this machine's GPU: a cache moved to
    a machine with another GPU must not reuse it (it would hold no kernel image there),
    so the compute capability joins the key; an explicit architecture does not ask."""
    cpu = ["-march=native"]
    monkeypatch.setattr(native, "_gpu_arch", lambda: "gpu 9.0")
    h100 = native._host_key(cpu, ["-arch=native"])
    monkeypatch.setattr(native, "_gpu_arch", lambda: "gpu 8.0")
    a100 = native._host_key(cpu, ["-arch=native"])
    assert h100 != a100 and h100[0] == a100[0] == native._cpu_flags()
    assert native._host_key(cpu, ["-arch=sm_90"]) == native._host_key(cpu, []) == h100[:1]
    assert native._host_key(["-march=x86-64-v3"], []) == []


def test_a_hung_build_step_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = tmp_path / "slow-g++"
    # answers --version at once (the cache key), then hangs compiling
    slow.write_text('#!/bin/sh\n[ "$1" = --version ] && echo slow 1.0 && exit 0\nexec sleep 30\n')
    slow.chmod(0o755)
    monkeypatch.setenv("CTR_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(slow))
    monkeypatch.setattr(native, "BUILD_STEP_TIMEOUT_S", 1)
    with pytest.raises(native.NativeError, match="hung, stopped after 1 s"):
        native.build(cuda=False)


def test_a_full_store_fails_the_export_instead_of_dropping_the_fused_graph(
    bundles: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the fused graph was written published the bundle without it
    (exit 0, a warning): served on the slower graph though the machine builds the fused
    one. A store fault fails the export; nothing is published (fault review)."""
    import errno

    import training.export as ex
    from training.train import load_run

    real = ex.export_onnx

    def full(model: object, path: Path, *a: object, fused: bool = False, **kw: object) -> None:
        if fused:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, path, *a, fused=fused, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ex, "export_onnx", full)
    config, mapper, model, metrics = load_run(bundles["dien"].run_dir)
    with pytest.raises(OSError, match="No space left"):
        ex.export_bundle(model, config, mapper, metrics, tmp_path)
    assert not (tmp_path / config.name).exists() or not any(
        p.name.isdigit() for p in (tmp_path / config.name).iterdir()
    )  # nothing published
    assert not list(tmp_path.rglob(FUSED_FILE)) and not list(tmp_path.rglob(".staging-*"))
