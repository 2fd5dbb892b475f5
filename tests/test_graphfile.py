"""A graph of ``FILE_MIN_BYTES`` or more reaches ONNX Runtime as an in-memory file
(``service.graphfile``): the sessions are the same, the file holds exactly the checked
bytes and is closed once the session exists, and where no such file can be made, for
CUDA sessions and for graphs that may name external data the bytes are given as
before."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

import service.graphfile as graphfile
import service.model as sm
from ctr.bundle import BundleError, load_bundle
from service.app import create_app
from service.model import CPU, CUDA, LoadedModel, _session, load_model, session_options
from service.precision import probe_feeds
from tests.helpers import Built, build_bundle, loaded_redis, settings_for

pytestmark = pytest.mark.skipif(
    not graphfile.supported(), reason="no memfd_create, memmem or /proc here"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("graphfile"), "din")


@pytest.fixture
def files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every graph of this test goes to ONNX Runtime as a file (the test graphs are far
    below 4 MB)."""
    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)


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


def _open_fds() -> set[str]:
    return set(os.listdir(graphfile.FD_PATH))


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


def test_large_graphs_reach_onnx_runtime_as_in_memory_files(
    built: Built, monkeypatch: pytest.MonkeyPatch
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
            assert path.startswith(graphfile.FD_PATH)
            assert held in _graph_files(built)  # exactly a graph of the bundle
        assert as_files.session._enable_fallback is False  # no re-read of a closed file
        assert as_bytes.session._enable_fallback is True
        assert as_files.graph == as_bytes.graph == "fused"
        assert len(as_files.shared_weights) == len(as_bytes.shared_weights) > 0
        for got, want in zip(_probs(as_files), _probs(as_bytes), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    finally:
        _close(as_files)
        _close(as_bytes)


def test_the_file_is_closed_once_the_session_exists(
    built: Built, files: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(built.models_dir, built.config.name, "latest")
    so = session_options(settings_for(built))
    data = bundle.model_path.read_bytes()
    seen = _sources(monkeypatch)
    before = _open_fds()
    session = _session(bundle, data, so, [CPU], graphs=False)
    assert _open_fds() == before and len(seen) == 1 and isinstance(seen[0], tuple)
    with graphfile.graph_source(data) as source:
        assert isinstance(source, str) and Path(source).read_bytes() == data
        assert len(_open_fds() - before) == 1
    assert _open_fds() == before
    assert session.get_inputs()  # it serves without its file


def test_where_no_file_can_be_made_the_bytes_are_given(
    built: Built,
    files: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_memory(name: str, flags: int = 0) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(graphfile.os, "memfd_create", no_memory)
    seen = _sources(monkeypatch)
    with caplog.at_level("WARNING"):
        model = load_model(settings_for(built))
    try:
        assert seen and all(isinstance(s, bytes) for s in seen)
        assert "graph given to ONNX Runtime as bytes" in caplog.text
        assert "Cannot allocate memory" in caplog.text
        assert all(np.isfinite(p).all() for p in _probs(model))
    finally:
        _close(model)


def test_a_short_write_is_retried_and_a_failed_one_closes_the_file(
    files: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    writes: list[int] = []
    real_write = os.write

    def full(fd: int, data: memoryview) -> int:
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])  # a short write first: retried

    monkeypatch.setattr(graphfile.os, "write", full)
    data = bytes(range(256)) * 40
    before = _open_fds()
    with caplog.at_level("WARNING"), graphfile.graph_source(data) as source:
        assert source is data
    assert writes == [len(data), len(data) - len(data) // 2]
    assert _open_fds() == before and "No space left" in caplog.text


def test_small_graphs_cuda_sessions_and_external_data_keep_the_bytes(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = b"x" * (graphfile.FILE_MIN_BYTES - 1)
    with graphfile.graph_source(small) as source:
        assert source is small
    big = small + b"xx"
    with graphfile.graph_source(big, as_file=False) as source:
        assert source is big
    with graphfile.graph_source(big) as source:
        assert isinstance(source, str) and Path(source).read_bytes() == big
    # an external-data tensor's "location" entry, anywhere in the graph
    named = big[:1000] + graphfile.EXTERNAL_MARK + b"\x12\x05w.bin" + big[1000:]
    assert graphfile.may_name_external_data(named)
    assert not graphfile.may_name_external_data(big)
    with graphfile.graph_source(named) as source:
        assert source is named
    # a CUDA provider list: ONNX Runtime's provider fallback re-reads what it was given
    given: list[object] = []

    class Recorded:
        def __init__(self, source: object, *args: object, **kwargs: object) -> None:
            given.append(source)

        def disable_fallback(self) -> None:
            given.append("fallback disabled")

    monkeypatch.setattr(graphfile, "FILE_MIN_BYTES", 0)
    monkeypatch.setattr(sm.ort, "InferenceSession", Recorded)
    bundle = load_bundle(built.models_dir, built.config.name, "latest")
    so = session_options(settings_for(built))
    _session(bundle, big, so, [CUDA, CPU], graphs=False)
    _session(bundle, big, so, [CPU], graphs=False)
    assert given[0] is big and isinstance(given[1], str)
    assert given[1].startswith(graphfile.FD_PATH) and given[2:] == ["fallback disabled"]


def test_a_graph_saved_with_external_data_keeps_the_bytes(tmp_path: Path) -> None:
    """ONNX Runtime would look for the data beside the graph's path, /proc/self/fd: such
    a graph is given as bytes, as before (ONNX Runtime then refuses it)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [table],
    )
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)  # fmt: skip
    data = path.read_bytes()
    assert (tmp_path / "w.bin").exists() and graphfile.may_name_external_data(data)
    with graphfile.graph_source(data + b"\0" * graphfile.FILE_MIN_BYTES) as source:
        assert isinstance(source, bytes)
    plain = onnx.load(path)  # the data read back into the graph: nothing external
    onnx.external_data_helper.convert_model_from_external_data(plain)
    assert not graphfile.may_name_external_data(plain.SerializeToString())


def test_a_graph_onnx_runtime_refuses_names_the_bundle_file(built: Built, files: None) -> None:
    """ONNX Runtime's message names the file it read: the bundle's, not an in-memory one
    that is gone."""
    bundle = load_bundle(built.models_dir, built.config.name, "latest")
    so = session_options(settings_for(built))
    before = _open_fds()
    with pytest.raises(BundleError) as caught:
        _session(bundle, b"\x08\x07" + b"not a graph" * 100, so, [CPU], graphs=False)
    said = str(caught.value)
    assert said.count(str(bundle.model_path)) >= 2 and graphfile.FD_PATH not in said
    assert _open_fds() == before


def test_a_reload_through_the_service_serves_from_files(
    built: Built, monkeypatch: pytest.MonkeyPatch
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
    after = {it["item_id"]: it["probability"] for it in got.json()["items"]}
    before = {it["item_id"]: it["probability"] for it in want.json()["items"]}
    assert after.keys() == before.keys() and len(after) == 39
    assert max(abs(after[k] - before[k]) for k in after) < 1e-6
