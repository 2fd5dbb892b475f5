"""The native JSON codec (``native/codec.cc`` through ``service.codec``) writes what orjson
writes, declines what it was not written for, and the service answers the same with it
and without it (``CTR_NATIVE_JSON=off``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service import codec
from service.app import create_app
from service.settings import Settings
from tests.helpers import Built, build_and_load, settings_for


@pytest.fixture(scope="module")
def enc(lib: Any) -> codec.ItemsEncoder:
    return codec.ItemsEncoder(str(lib.path))


def _orjson(ids: list[str], probs: np.ndarray, order: np.ndarray) -> bytes:
    return orjson.dumps(codec.items_python(ids, probs, order))


def _random_probabilities(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values in [0, 1] from random bit patterns: every exponent down to the
    subnormals, not just the uniform draws' [0.01, 1)."""
    bits = rng.integers(0, 0x3F800001, n, dtype=np.uint32)  # 0x3F800000 is 1.0f
    return bits.view(np.float32)


def test_items_are_orjson_bytes_for_every_float32_range(enc: codec.ItemsEncoder) -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 50, 500, 2000):
        probs = _random_probabilities(rng, n)
        ids = [f"item-{k}" for k in rng.permutation(10 * n)[:n]]
        order = np.argsort(-probs, kind="stable")
        assert enc.encode(ids, probs, order) == _orjson(ids, probs, order)
        top = order[: max(1, n // 3)]  # top_k: fewer items than IDs
        assert enc.encode(ids, probs, top) == _orjson(ids, probs, top)


def test_items_at_the_notation_boundaries(enc: codec.ItemsEncoder) -> None:
    # around 1e-5 (fixed above it, exponent below), the ends and the subnormals
    values = [0.0, 1.0, 1e-5, 1.0000001e-5, 9.999999e-6, 1e-6, 1e-7, 1e-38, 1e-45, 0.1,
              0.5, 0.99999994, 2.0**-17, 2.0**-16, 2.0**-126, 3.0517578125e-05]  # fmt: skip
    probs = np.array(values, np.float32)
    near = np.nextafter(probs, np.float32(1)).clip(0, 1)
    probs = np.concatenate([probs, near, np.nextafter(probs, np.float32(0))])
    ids = [f"i{k}" for k in range(len(probs))]
    order = np.arange(len(probs))
    assert enc.encode(ids, probs, order) == _orjson(ids, probs, order)


def test_ids_are_escaped_as_orjson_escapes_them(enc: codec.ItemsEncoder) -> None:
    rng = np.random.default_rng(3)
    alphabet = [chr(c) for c in range(1, 128)] + ["é", "€", "😀", "\u2028", "\ufeff"]
    ids = ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(400)]
    ids = list(dict.fromkeys(ids))  # distinct, as requests are
    probs = rng.random(len(ids)).astype(np.float32)
    order = np.argsort(-probs, kind="stable")
    assert enc.encode(ids, probs, order) == _orjson(ids, probs, order)


@pytest.mark.parametrize(
    "ids, probs",
    [
        (["a\x00b", "c"], [0.5, 0.25]),  # the separator inside an ID
        (["a", "\ud800"], [0.5, 0.25]),  # a lone surrogate: not UTF-8
        (["a", "b"], [0.5, 1.5]),  # outside [0, 1]
        (["a", "b"], [0.5, -0.25]),
        (["a", "b"], [0.5, -0.0]),
        (["a", "b"], [0.5, float("nan")]),
        (["a", "b"], [0.5, float("inf")]),
    ],
)
def test_the_encoder_declines_what_it_was_not_written_for(
    enc: codec.ItemsEncoder, ids: list[str], probs: list[float]
) -> None:
    p = np.array(probs, np.float32)
    assert enc.encode(ids, p, np.array([1, 0])) is None


def test_the_encoder_declines_other_dtypes_and_shapes(enc: codec.ItemsEncoder) -> None:
    ids, order = ["a", "b"], np.array([0, 1])
    assert enc.encode(ids, np.array([0.5, 0.25], np.float64), order) is None
    assert enc.encode(ids, np.array([0.5, 0.25, 0.1], np.float32), order) is None
    assert enc.encode(ids, np.array([[0.5, 0.25]], np.float32), order) is None
    assert enc.encode(ids, np.array([0.5, 0.25], np.float32), np.array([0, 2])) is None


def test_load_follows_the_setting_and_checks_the_library(
    lib: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert codec.load(Settings(native_json="off")) is None
    on = codec.load(Settings(ops_library=str(lib.path)))
    assert on is not None and on.path == str(lib.path)
    # a library whose output differs from orjson's is not used, and the log says why
    real = codec.ItemsEncoder.encode

    def off_by_one(self: codec.ItemsEncoder, *args: Any) -> bytes | None:
        out = real(self, *args)
        return None if out is None else out.replace(b'"rank":1}', b'"rank":2}')

    monkeypatch.setattr(codec.ItemsEncoder, "encode", off_by_one)
    with caplog.at_level("WARNING", "ctr.service"):
        assert codec.load(Settings(ops_library=str(lib.path))) is None
    assert "native JSON encoder not used" in caplog.text and '"rank":2}' in caplog.text


def test_a_library_without_the_function_is_not_used(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # a prebuilt library older than the encoder has no ctr_encode_items: orjson then
    import ctypes.util

    with pytest.raises(AttributeError):
        codec.ItemsEncoder(ctypes.util.find_library("c") or "libc.so.6")
    missing = tmp_path / "libctr_ops.so"
    with caplog.at_level("WARNING", "ctr.service"):
        assert codec.load(Settings(ops_library=str(missing))) is None
    assert "native JSON encoder not used" in caplog.text and "does not exist" in caplog.text


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("codec"), "din")


@pytest.fixture(scope="module")
def clients(built: Built, lib: Any) -> Iterator[tuple[TestClient, TestClient]]:
    native = create_app(settings_for(built, ops_library=str(lib.path)))
    plain = create_app(settings_for(built, native_json="off"))
    with TestClient(native) as a, TestClient(plain) as b:
        assert a.app.state.ctr.encoder is not None  # type: ignore[attr-defined]
        assert b.app.state.ctr.encoder is None  # type: ignore[attr-defined]
        assert a.get("/v1/models").json()["json_encoder"] == "native"
        assert b.get("/v1/models").json()["json_encoder"] == "orjson"
        yield a, b


def test_the_service_answers_the_same_with_either_encoder(
    built: Built, clients: tuple[TestClient, TestClient]
) -> None:
    native, plain = clients
    users = built.frame["user_id"].astype(str).unique()[:5].tolist()
    items = built.frame["item_id"].astype(str).unique().tolist()
    odd = ['quo"te', "back\\slash", "ünï€ode", "sp ace"]  # unknown items: default rows
    for k, user in enumerate([*users, "nobody"]):
        cands = [{"item_id": i} for i in items[k : k + 60] + odd]
        for extra in ({}, {"top_k": 7}, {"explain": True}, {"top_k": 3, "explain": True}):
            body = {"user_id": user, "candidates": cands, **extra}
            a = native.post("/v1/score", json=body)
            b = plain.post("/v1/score", json=body)
            assert a.status_code == b.status_code == 200
            ja, jb = a.json(), b.json()
            assert ja.pop("request_id") != jb.pop("request_id")
            assert ja == jb
            assert len(ja["items"]) == extra.get("top_k", len(cands))
            # the exact bytes of the items array, not only equal values
            raw_a = a.content[a.content.index(b'"items":') :]
            raw_b = b.content[b.content.index(b'"items":') :]
            assert raw_a == raw_b
