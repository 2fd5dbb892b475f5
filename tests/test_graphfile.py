"""A graph of ``FILE_MIN_BYTES`` or more reaches ONNX Runtime as a private temporary file
(``service.graphfile``): the sessions are the same, the file holds exactly the checked
bytes and is gone once the session exists, and where no file can be written the bytes
are given as before."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

import service.graphfile as graphfile
from ctr.bundle import BundleError, load_bundle
from service.app import create_app
from service.model import CPU, LoadedModel, _session, load_model, session_options
from service.precision import probe_feeds
from tests.helpers import Built, build_bundle, loaded_redis, settings_for


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("graphfile"), "din")


@pytest.fixture
def tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``TMPDIR`` for this test: an empty folder."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def _sources(monkeypatch: pytest.MonkeyPatch) -> list[bytes | tuple[str, bytes]]:
    """What every ``ort.InferenceSession`` made from now on is given: the bytes, or
    ``(path, the file's bytes at that moment)``."""
    seen: list[bytes | tuple[str, bytes]] = []
    real = ort.InferenceSession.__init__

    def init(self: ort.InferenceSession, source: bytes | str, *args: object, **kw: object) -> None:
        seen.append((source, Path(source).read_bytes()) if isinstance(source, str) else source)
        real(self, source, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ort.InferenceSession, "__init__", init)
    return seen


def _graph_files(built: Built) -> set[bytes]:
    folder = built.models_dir / built.config.name / str(built.version)
    return {p.read_bytes() for p in folder.glob("*.onnx")}


def _probs(model: LoadedModel) -> list[np.ndarray]:
    """The probe's probabilities from the Python runner's two sessions (n = 20 takes the
    one-thread one) and the native runner."""
    out = []
    for n in (20, 300):
        feeds = probe_feeds(model.bundle, 7, n, n)
        out.append(model.run(feeds, explain=False)[0])
        if model.native is not None:
            out.append(model.native.run_now(feeds, session=0))
    return out


def _close(model: LoadedModel) -> None:
    if model.native is not None:
        model.native.close()


def test_large_graphs_reach_onnx_runtime_as_files_then_gone(
    built: Built, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(built, share_weights_min_bytes=1024)
    seen = _sources(monkeypatch)
    as_bytes = load_model(settings)  # the test graphs are far below 4 MB
    assert seen and all(isinstance(s, bytes) for s in seen)
    seen.clear()
    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)
    as_files = load_model(settings)
    try:
        # the standard, fused, shared-weights and one-thread sessions
        assert len(seen) >= 4 and all(isinstance(s, tuple) for s in seen)
        for path, held in seen:  # type: ignore[misc]
            assert Path(path).parent == tmp_dir and Path(path).name.startswith(graphfile.PREFIX)
            assert held in _graph_files(built)  # exactly a graph of the bundle
        assert list(tmp_dir.iterdir()) == []
        assert as_files.graph == as_bytes.graph == "fused"
        assert len(as_files.shared_weights) == len(as_bytes.shared_weights) > 0
        for got, want in zip(_probs(as_files), _probs(as_bytes), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    finally:
        _close(as_files)
        _close(as_bytes)


def test_where_no_file_can_be_written_the_bytes_are_given(
    built: Built,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)
    seen = _sources(monkeypatch)
    with caplog.at_level("WARNING"):
        model = load_model(settings_for(built))
    try:
        assert seen and all(isinstance(s, bytes) for s in seen)
        assert "graph given to ONNX Runtime as bytes" in caplog.text
        assert all(np.isfinite(p).all() for p in _probs(model))
    finally:
        _close(model)


def test_a_short_disk_removes_the_half_written_file(
    tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    writes: list[int] = []

    def full(fd: int, data: memoryview) -> int:
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data) // 2  # a short write first: the rest is retried

    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 10)
    monkeypatch.setattr(graphfile.os, "write", full)
    data = bytes(range(256)) * 40
    with caplog.at_level("WARNING"), graphfile.graph_source(data) as source:
        assert source is data
    assert writes == [len(data), len(data) - len(data) // 2]
    assert list(tmp_dir.iterdir()) == [] and "No space left" in caplog.text


def test_small_graphs_and_cuda_sessions_keep_the_bytes(tmp_dir: Path) -> None:
    small = b"x" * (graphfile.FILE_MIN_BYTES - 1)
    with graphfile.graph_source(small) as source:
        assert source is small
    big = small + b"xx"
    with graphfile.graph_source(big, as_file=False) as source:
        assert source is big
    with graphfile.graph_source(big) as source:
        assert isinstance(source, str) and Path(source).read_bytes() == big
    assert not Path(source).exists() and list(tmp_dir.iterdir()) == []


def test_a_graph_onnx_runtime_refuses_names_the_bundle_file(
    built: Built, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's message names the file it read: the bundle's, not a temporary one
    that is gone."""
    bundle = load_bundle(built.models_dir, built.config.name, "latest")
    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)
    so = session_options(settings_for(built))
    with pytest.raises(BundleError) as caught:
        _session(bundle, b"\x08\x07" + b"not a graph" * 100, so, [CPU], graphs=False)
    said = str(caught.value)
    assert said.count(str(bundle.model_path)) >= 1 and graphfile.PREFIX not in said
    assert list(tmp_dir.iterdir()) == []


def test_a_reload_through_the_service_serves_from_files(
    built: Built, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_redis(built)
    body = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(1, 40)]}
    with TestClient(create_app(settings_for(built, api_key="k"))) as c:
        want = c.post("/v1/score", json=body)
        assert want.status_code == 200, want.text
        seen = _sources(monkeypatch)
        monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)
        r = c.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        assert seen and all(isinstance(s, tuple) for s in seen)
        got = c.post("/v1/score", json=body)
        assert got.status_code == 200, got.text
    assert list(tmp_dir.iterdir()) == []
    after = {it["item_id"]: it["probability"] for it in got.json()["items"]}
    before = {it["item_id"]: it["probability"] for it in want.json()["items"]}
    assert after.keys() == before.keys() and len(after) == 39
    assert max(abs(after[k] - before[k]) for k in after) < 1e-6


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_files_a_killed_worker_left_are_swept_at_the_next_load(
    built: Built, tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only old files of processes that are gone, named as the service names them."""
    dead, hour_ago = _dead_pid(), time.time() - 3600
    names = {
        "orphan": f"{graphfile.PREFIX}{dead}-abc.onnx",
        "young orphan": f"{graphfile.PREFIX}{dead}-young.onnx",
        "alive": f"{graphfile.PREFIX}{os.getppid()}-abc.onnx",
        "own": f"{graphfile.PREFIX}{os.getpid()}-abc.onnx",
        "no pid": f"{graphfile.PREFIX}x-abc.onnx",
        "other suffix": f"{graphfile.PREFIX}{dead}-abc.txt",
        "someone else's": "model.onnx",
    }
    for key, name in names.items():
        (tmp_dir / name).write_bytes(b"g")
        if key != "young orphan":
            os.utime(tmp_dir / name, (hour_ago, hour_ago))
    (tmp_dir / f"{graphfile.PREFIX}{dead}-dir.onnx").mkdir()
    os.utime(tmp_dir / f"{graphfile.PREFIX}{dead}-dir.onnx", (hour_ago, hour_ago))
    with caplog.at_level("WARNING"):
        model = load_model(settings_for(built))
    _close(model)
    left = {p.name for p in tmp_dir.iterdir()}
    assert names["orphan"] not in left
    assert left == {n for k, n in names.items() if k != "orphan"} | {
        f"{graphfile.PREFIX}{dead}-dir.onnx"
    }
    assert "removed 1 temporary graph file(s)" in caplog.text
    assert graphfile.sweep(now=time.time() + 2 * graphfile.ORPHAN_AGE_S) == 1  # now old


def test_a_graph_file_is_named_for_its_process(tmp_dir: Path) -> None:
    big = b"x" * graphfile.FILE_MIN_BYTES
    with graphfile.graph_source(big) as source:
        assert isinstance(source, str)
        assert Path(source).name.startswith(f"{graphfile.PREFIX}{os.getpid()}-")
        assert graphfile.sweep(now=time.time() + 10 * graphfile.ORPHAN_AGE_S) == 0  # own
    assert list(tmp_dir.iterdir()) == []
