"""One copy of a model's large weights for all of its sessions (``CTR_SHARE_WEIGHTS_MIN_BYTES``,
``service.weights``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper

from service.app import create_app
from service.model import LoadedModel, load_model
from service.precision import probe_feeds
from service.weights import ProtoError, large_weights
from tests.helpers import Built, build_bundle, loaded_redis, settings_for

TABLE = "model.emb.tables.item_id.weight"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("weights"), "din")


def _graphs(built: Built) -> list[Path]:
    return sorted((built.models_dir / built.config.name / str(built.version)).glob("*.onnx"))


def test_the_reader_finds_what_onnx_finds(built: Built) -> None:
    graphs = _graphs(built)
    assert len(graphs) >= 2  # model.onnx and the fused graph
    for path in graphs:
        data = path.read_bytes()
        want = {
            t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(data).graph.initializer
        }
        got = large_weights(data, 0)
        assert [w.name for w in got] == list(want)  # every one, in graph order
        for w in got:
            assert w.array.dtype == want[w.name].dtype and w.array.shape == want[w.name].shape
            assert np.array_equal(w.array, want[w.name]), w.name
            assert w.array.flags.c_contiguous and not w.array.flags.writeable
            assert w.array.ctypes.data % w.array.dtype.itemsize == 0  # aligned
        big = [w.name for w in large_weights(data, 4096)]
        assert big == [k for k, v in want.items() if v.nbytes >= 4096] and TABLE in big


def test_the_reader_leaves_tensors_it_does_not_hold_to_onnx_runtime() -> None:
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [3, 4], table.ravel().tolist())
    external = numpy_helper.from_array(table, "external")
    external.ClearField("raw_data")
    external.data_location = onnx.TensorProto.EXTERNAL
    external.external_data.add(key="location", value="weights.bin")
    graph = helper.make_graph(
        [helper.make_node("Add", ["raw", "typed"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(table, "raw"), typed, external,
         numpy_helper.from_array(table.astype(np.float64), "f64")],
    )  # fmt: skip
    data = helper.make_model(graph).SerializeToString()
    got = large_weights(data, 0)
    assert [w.name for w in got] == ["raw", "f64"]
    assert np.array_equal(got[1].array, table.astype(np.float64))
    with pytest.raises(ProtoError):
        large_weights(data[:-3], 0)  # cut short


def _model_bytes(*tensors: onnx.TensorProto) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4])],
        list(tensors),
    )
    return helper.make_model(graph).SerializeToString()


def test_an_initializer_named_twice_is_not_shared() -> None:
    """ONNX Runtime picks one of two same-named initializers (which one is its own
    business): the reader must not guess, whichever way each is held."""
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    typed = helper.make_tensor("t", onnx.TensorProto.FLOAT, [3, 4], table.ravel().tolist())
    for pair in (
        (typed, numpy_helper.from_array(table + 1, "t")),
        (numpy_helper.from_array(table, "t"), numpy_helper.from_array(table + 1, "t")),
    ):
        with pytest.raises(ProtoError, match="two initializers are named 't'"):
            large_weights(_model_bytes(*pair), 0)
    # distinct names: both read (the typed one left to ONNX Runtime)
    other = numpy_helper.from_array(table, "u")
    assert [w.name for w in large_weights(_model_bytes(typed, other), 0)] == ["u"]


def test_bytes_the_reader_did_not_foresee_are_a_proto_error_or_left_alone() -> None:
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    bad_name = numpy_helper.from_array(table, "t")
    data = _model_bytes(bad_name)
    name_field = b"\x42\x01t"  # TensorProto.name (field 8, LEN), 1 byte: "t"
    assert data.count(name_field) == 1
    with pytest.raises(ProtoError, match="not UTF-8"):
        large_weights(data.replace(name_field, b"\x42\x01\xff"), 0)
    # dims whose product is 12 (mod 2**64), the raw_data's 12 floats: an int64 product
    # would wrap to a match (and the reshape fail); the exact one does not match, and the
    # tensor is left to ONNX Runtime (which refuses such a graph itself)
    huge = numpy_helper.from_array(table, "h")
    huge.ClearField("dims")
    huge.dims.extend([5 * 5581 * 8681, 49477 * 384773, 12])  # 12 * (2**62 + 1)
    assert large_weights(_model_bytes(huge), 0) == []


def _outputs(model: LoadedModel, n: int) -> list[np.ndarray]:
    """The probe's probabilities from every session: the Python runner (the main session,
    or the one-thread one for n <= 64) and the native runner's sessions."""
    feeds = probe_feeds(model.bundle, 1, n, n)
    assert model.native is not None and model.native.sessions == 2
    return [
        model.run(feeds, explain=False)[0],
        model.native.run_now(feeds, session=0),
        model.native.run_now(feeds, session=1),
    ]


def test_every_session_reads_the_one_copy(built: Built) -> None:
    """Writing into the shared table changes what every session scores, the Python and
    the native ones alike: none of them holds a copy of its own."""
    model = load_model(settings_for(built, share_weights_min_bytes=1024))
    try:
        assert TABLE in [w.name for w in model.shared_weights]
        assert model.native is not None and model.native.shared_weights == len(model.shared_weights)
        before = {n: _outputs(model, n) for n in (32, 200)}
        table = next(w.array for w in model.shared_weights if w.name == TABLE)
        table.flags.writeable = True  # the array owns its memory: the test may write it
        table *= -3.0
        for n, old in before.items():
            new = _outputs(model, n)
            for got in new:
                np.testing.assert_allclose(got, new[0], rtol=0, atol=1e-5)
                assert np.abs(got - old[0]).max() > 1e-3, n
    finally:
        if model.native is not None:
            model.native.close()


def test_off_each_session_keeps_its_own(built: Built) -> None:
    model = load_model(settings_for(built, share_weights_min_bytes=0))
    try:
        assert model.shared_weights == [] and model.native is not None
        assert model.native.shared_weights == 0
    finally:
        if model.native is not None:
            model.native.close()


def test_the_service_says_what_it_shares(built: Built) -> None:
    loaded_redis(built)
    with TestClient(create_app(settings_for(built, share_weights_min_bytes=1024))) as c:
        shared = c.get("/v1/models").json()["shared_weights"]
        assert shared["count"] >= 2 and shared["bytes"] >= 2 * 1024
        assert shared["native"] == shared["count"] and shared["note"] is None
        r = c.post("/v1/score", json={"user_id": "u1", "candidates": [{"item_id": "i1"}]})
        assert r.status_code == 200, r.text
    with TestClient(create_app(settings_for(built, share_weights_min_bytes=0))) as c:
        assert c.get("/v1/models").json()["shared_weights"]["count"] == 0


def test_weights_read_wrongly_are_not_shared(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A table read wrongly (here: shifted) would move every session alike; the probe
    against the graph's own session catches it, and each session keeps its own copy."""
    import service.model as sm

    real = sm.large_weights

    def misread(data: bytes, min_bytes: int) -> list:
        out = real(data, min_bytes)
        return [type(w)(w.name, w.onnx_type, w.array + np.float32(0.5)) for w in out]

    monkeypatch.setattr(sm, "large_weights", misread)
    with caplog.at_level("WARNING", "ctr.service"):
        model = load_model(settings_for(built, share_weights_min_bytes=1024))
    try:
        assert model.shared_weights == [] and "differs by" in model.shared_note
        assert "weights not shared" in caplog.text
        assert model.native is not None and model.native.shared_weights == 0
    finally:
        if model.native is not None:
            model.native.close()


def test_a_library_without_shared_weights_keeps_native_copies(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prebuilt custom-op library from before ``ctr_runner_add_weight``: the native
    sessions hold their own copies (said in the log and in ``native``), the Python ones
    still share, and both score alike."""
    import ctypes

    import service.nativerun as nr

    class Older:
        """The library as an older build has it: without the one function."""

        def __init__(self, lib: ctypes.CDLL) -> None:
            self._lib = lib

        def __getattr__(self, name: str) -> object:
            if name == "ctr_runner_add_weight":
                raise AttributeError(name)
            return getattr(self._lib, name)

    # the process's library objects (loaded once for every runner: nr._libraries), as
    # this runner sees them
    real = nr._libraries
    monkeypatch.setattr(nr, "_libraries", lambda path: tuple(Older(lib) for lib in real(path)))
    with caplog.at_level("WARNING", "ctr.service"):
        model = load_model(settings_for(built, share_weights_min_bytes=1024))
    try:
        assert model.shared_weights and model.native is not None
        assert model.native.shared_weights == 0 and "cannot share weights" in caplog.text
        python, native_main, native_single = _outputs(model, 200)
        np.testing.assert_allclose(native_main, python, rtol=0, atol=1e-5)
        np.testing.assert_allclose(native_single, python, rtol=0, atol=1e-5)
    finally:
        if model.native is not None:
            model.native.close()
