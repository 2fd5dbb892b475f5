"""The native JSON codec (``native/codec.cc`` through ``service.codec``) writes what orjson
writes, reads plain candidate lists as the whole-body parse reads them, declines what it
was not written for, and the service answers the same with it and without it
(``CTR_NATIVE_JSON=off``)."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import codec
from service.app import create_app
from service.errors import BadRequest
from service.settings import Settings
from service.validate import score_input
from tests.helpers import Built, build_and_load, settings_for


@pytest.fixture(scope="module")
def enc(lib: Any) -> codec.NativeCodec:
    return codec.NativeCodec(str(lib.path))


def _orjson(ids: list[str], probs: np.ndarray, order: np.ndarray) -> bytes:
    return orjson.dumps(codec.items_python(ids, probs, order))


def _random_probabilities(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values in [0, 1] from random bit patterns: every exponent down to the
    subnormals, not just the uniform draws' [0.01, 1)."""
    bits = rng.integers(0, 0x3F800001, n, dtype=np.uint32)  # 0x3F800000 is 1.0f
    return bits.view(np.float32)


def test_items_are_orjson_bytes_for_every_float32_range(enc: codec.NativeCodec) -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 50, 500, 2000):
        probs = _random_probabilities(rng, n)
        ids = [f"item-{k}" for k in rng.permutation(10 * n)[:n]]
        order = np.argsort(-probs, kind="stable")
        assert enc.encode(ids, probs, order) == _orjson(ids, probs, order)
        top = order[: max(1, n // 3)]  # top_k: fewer items than IDs
        assert enc.encode(ids, probs, top) == _orjson(ids, probs, top)
        raw = "\0".join(ids).encode()  # the IDs as the scan hands them over
        assert enc.encode(ids, probs, top, raw) == _orjson(ids, probs, top)


def test_items_at_the_notation_boundaries(enc: codec.NativeCodec) -> None:
    # around 1e-5 (fixed above it, exponent below), the ends and the subnormals
    values = [0.0, 1.0, 1e-5, 1.0000001e-5, 9.999999e-6, 1e-6, 1e-7, 1e-38, 1e-45, 0.1,
              0.5, 0.99999994, 2.0**-17, 2.0**-16, 2.0**-126, 3.0517578125e-05]  # fmt: skip
    probs = np.array(values, np.float32)
    near = np.nextafter(probs, np.float32(1)).clip(0, 1)
    probs = np.concatenate([probs, near, np.nextafter(probs, np.float32(0))])
    ids = [f"i{k}" for k in range(len(probs))]
    order = np.arange(len(probs))
    assert enc.encode(ids, probs, order) == _orjson(ids, probs, order)


def test_ids_are_escaped_as_orjson_escapes_them(enc: codec.NativeCodec) -> None:
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
    enc: codec.NativeCodec, ids: list[str], probs: list[float]
) -> None:
    p = np.array(probs, np.float32)
    assert enc.encode(ids, p, np.array([1, 0])) is None


def test_the_encoder_declines_other_dtypes_and_shapes(enc: codec.NativeCodec) -> None:
    ids, order = ["a", "b"], np.array([0, 1])
    assert enc.encode(ids, np.array([0.5, 0.25], np.float64), order) is None
    assert enc.encode(ids, np.array([0.5, 0.25, 0.1], np.float32), order) is None
    assert enc.encode(ids, np.array([[0.5, 0.25]], np.float32), order) is None
    assert enc.encode(ids, np.array([0.5, 0.25], np.float32), np.array([0, 2])) is None


def test_the_encoder_declines_a_position_ranked_twice(enc: codec.NativeCodec) -> None:
    """Its room is counted for each ID once: a long ID ranked twice wrote past the end of
    the buffer (AddressSanitizer: heap-buffer-overflow)."""
    ids, probs = ["\x01" * 20_000, "b"], np.array([0.5, 0.25], np.float32)
    assert enc.encode(ids, probs, np.array([0, 0])) is None
    assert enc.encode(ids, probs, np.array([0, 1])) is not None


def test_the_encoder_refuses_more_ids_than_the_buffer_splits_into(
    enc: codec.NativeCodec,
) -> None:
    """An ``n`` the buffer cannot hold was allocated for first (2**60 IDs: a C++
    exception through ctypes ended the process)."""
    out = ctypes.create_string_buffer(1 << 16)
    order = np.zeros(1, np.int64).tobytes()
    assert enc._encode(b"a", 1, 1 << 60, b"\0" * 4, order, 1, out, 1 << 16) < 0


def test_sizes_that_would_overflow_the_bound_are_refused(enc: codec.NativeCodec) -> None:
    """The room an encoding needs (116 bytes per item, 6 per ID byte) is computed in
    int64: lengths past what it can hold are refused, never wrapped to a small bound
    that a small buffer would pass (found with UBSan; the service passes real lengths)."""
    huge = 1 << 61
    assert enc._bound(huge, 1) < 0 and enc._bound(1, huge) < 0
    assert enc._bound(-1, 1) < 0 and enc._bound(1, -1) < 0
    assert enc._bound(2, 3) == 2 + 2 * 116 + 6 * 3
    out = ctypes.create_string_buffer(64)
    order = np.zeros(1, np.int64).tobytes()
    # ids_len 2**61: 6 * 2**61 wraps int64 to a negative bound, which 64 bytes "passed"
    assert enc._encode(b"a", huge, 1, b"\0" * 4, order, 1, out, 64) == -2


def test_rank_is_numpys_stable_argsort(enc: codec.NativeCodec) -> None:
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 50, 500, 2000):
        raw = _random_probabilities(rng, n)
        tied = np.round(rng.random(n) * 4).astype(np.float32) / 4  # many equal scores
        zeros = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0))
        # any finite float32 ranks alike: negatives, subnormals, both ends of the range
        wide = rng.choice(np.array([-3.4e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 0.5, 3.4e38],
                                   np.float32), n)  # fmt: skip
        for probs in (raw, tied, zeros, wide, -raw):
            for top_k in (None, 1, max(1, n // 3), n, n + 5):
                want = np.argsort(-probs, kind="stable")[:top_k]
                got = enc.rank(probs, top_k)
                assert got is not None and got.dtype == np.int64
                assert np.array_equal(got, want), (n, top_k)


def test_rank_declines_what_it_was_not_written_for(enc: codec.NativeCodec) -> None:
    assert enc.rank(np.array([0.5, np.nan], np.float32), None) is None
    assert enc.rank(np.array([0.5, np.inf], np.float32), 1) is None
    assert enc.rank(np.array([0.5, 0.25], np.float64), None) is None
    assert enc.rank(np.array([[0.5, 0.25]], np.float32), None) is None
    assert enc.rank(np.array([], np.float32), None) is None


def test_load_follows_the_setting(lib: Any) -> None:
    assert codec.load(Settings(native_json="off")) is None
    on = codec.load(Settings(ops_library=str(lib.path)))
    assert on is not None and on.path == str(lib.path)


def _rank_two(out: bytes | None) -> bytes | None:  # the first item ranked 2
    return None if out is None else out.replace(b'"rank":1}', b'"rank":2}')


def _ids_cut(out: Any) -> Any:  # IDs without their last character
    return None if out is None else out._replace(ids=[i[:-1] or i for i in out.ids])


def _raw_cut(out: Any) -> Any:  # the IDs' buffer one byte short (the list as found)
    return None if out is None else out._replace(raw=out.raw[:-1])


def _order_reversed(out: np.ndarray | None) -> np.ndarray | None:  # ties the other way
    return None if out is None else out[::-1].copy()


def _nan_ranked(out: np.ndarray | None) -> np.ndarray | None:  # a NaN score ranked anyway
    return np.zeros(1, np.int64) if out is None else out


def _no_repeat(out: str | None) -> str | None:  # a repeated key missed
    return "" if out is not None else None


@pytest.mark.parametrize(
    "method, tamper, says",
    [
        ("encode", _rank_two, '"rank":2}'),
        ("scan", _ids_cut, "scanning"),
        ("scan", _raw_cut, "scanning"),
        ("rank", _order_reversed, "ranking"),
        ("rank", _nan_ranked, "ranking accepted"),
        ("duplicate_key", _no_repeat, "scanning"),
    ],  # fmt: skip
)
def test_a_library_that_disagrees_is_not_used(
    lib: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    tamper: Callable[[Any], Any],
    says: str,
) -> None:
    """A library whose output differs from the Python path's in any of its four
    functions is not used, and the log says why."""
    real = getattr(codec.NativeCodec, method)

    def tampered(self: codec.NativeCodec, *args: Any) -> Any:
        return tamper(real(self, *args))

    monkeypatch.setattr(codec.NativeCodec, method, tampered)
    with caplog.at_level("WARNING", "ctr.service"):
        assert codec.load(Settings(ops_library=str(lib.path))) is None
    assert "native JSON codec not used" in caplog.text and says in caplog.text


def test_a_library_without_the_function_is_not_used(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # a prebuilt library older than the encoder has no ctr_encode_items: orjson then
    import ctypes.util

    with pytest.raises(AttributeError):
        codec.NativeCodec(ctypes.util.find_library("c") or "libc.so.6")
    missing = tmp_path / "libctr_ops.so"
    with caplog.at_level("WARNING", "ctr.service"):
        assert codec.load(Settings(ops_library=str(missing))) is None
    assert "native JSON codec not used" in caplog.text and "does not exist" in caplog.text


def outcome(body: bytes, scanner: codec.NativeCodec | None) -> object:
    """What the service makes of a scoring body: the request, or the error it answers."""
    try:
        return score_input(body, 30, 12, scanner)
    except BadRequest as exc:
        return type(exc).__name__, exc.message, exc.field


@pytest.mark.parametrize(
    "separators, indent", [((",", ":"), None), ((", ", ": "), None), ((" ,", " : "), 2)]
)
def test_scan_reads_plain_lists_in_any_layout(
    enc: codec.NativeCodec, separators: tuple[str, str], indent: int | None
) -> None:
    ids = ["a", "b c", "~!@#$%^&*()_", "x" * 12, "7", "[]{},:"]
    for extra in ({}, {"top_k": 2, "context": {"k": [1, {"c": "]}"}]}}, {"explain": True}):
        obj = {**extra, "candidates": [{"item_id": i} for i in ids], "user_id": "u1"}
        body = json.dumps(obj, separators=separators, indent=indent).encode()
        scanned = enc.scan(body, 12, 30)
        assert scanned is not None and scanned.ids == ids
        assert scanned.raw == "\0".join(ids).encode()
        assert json.loads(scanned.rest) == {**obj, "candidates": []}
        assert outcome(body, enc) == outcome(body, None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id":"u","candidates":[]}',  # empty: the whole-body check says so
        b'{"user_id":"u","candidates":[{"item_id":"a\\u0041"}]}',  # an escape
        b'{"user_id":"u","candidates":[{"item_id":"\xc3\xa9"}]}',  # not ASCII
        b'{"user_id":"u","candidates":[{"item_id":""}]}',
        b'{"user_id":"u","candidates":[{"item_id":"0123456789abc"}]}',  # 13 > 12
        b'{"user_id":"u","candidates":[{"item_id":7}]}',
        b'{"user_id":"u","candidates":[{"item_id":"a","features":{}}]}',
        b'{"user_id":"u","candidates":[{"features":{},"item_id":"a"}]}',
        b'{"user_id":"u","candidates":[{"item_id":"a"},{"item_id":"a"}]}',  # duplicate
        b'{"user_id":"u","candidates":[{"item_id":"a"}],"candidates":[{"item_id":"b"}]}',
        b'{"user_id":"u","candid\\u0061tes":[{"item_id":"a"}]}',  # an escaped key
        b'{"user_id":"u","candidates":[{"item_id":"a"}]} x',  # trailing bytes
        b'{"user_id":"u","candidates":[{"item_id":"a"},]}',
        b'{"user_id":"u","candidates":[{"item_id":"a"}}',
        b'{"user_id":"u","candidates":{"item_id":"a"}}',
        b'[{"candidates":[{"item_id":"a"}]}]',
        b'{"user_id":"u"}',
    ],
)
def test_scan_declines_all_but_the_plain_kind(enc: codec.NativeCodec, body: bytes) -> None:
    assert enc.scan(body, 12, 30) is None
    assert outcome(body, enc) == outcome(body, None)


def test_scan_declines_more_candidates_than_allowed(enc: codec.NativeCodec) -> None:
    body = orjson.dumps({"user_id": "u", "candidates": [{"item_id": f"i{k}"} for k in range(31)]})
    assert enc.scan(body, 12, 30) is None
    assert outcome(body, enc) == outcome(body, None)
    assert "31 items" in str(outcome(body, None))


# mostly the plain kind (the scanner's case), the rest anything a client may send
_plain_id = st.text(st.sampled_from("ab ,]}:{[~"), min_size=1, max_size=4)
_odd_id = st.text(st.sampled_from('ab "\\\x01é\u2028'), max_size=14) | st.integers(0, 3)
_plain = st.builds(lambda i: {"item_id": i}, _plain_id)
_candidate = st.one_of(
    _plain,
    st.builds(lambda i: {"item_id": i}, _odd_id),
    st.fixed_dictionaries({"item_id": _plain_id}, optional={"features": st.just({"f": 1})}),
    st.just({}),
    st.just("x"),
)
_body = st.fixed_dictionaries(
    {
        "candidates": st.lists(_plain, min_size=1, max_size=8, unique_by=lambda c: c["item_id"])
        | st.lists(_candidate, max_size=6)
    },
    optional={
        "user_id": st.sampled_from(["u", "u", "", 5, "u\x01"]),
        "top_k": st.sampled_from([1, 0, "2", None]),
        "context": st.sampled_from([{"k": "]"}, {"k": [1, 2]}, [], None]),
        "other": st.just(1),
    },
)


@given(
    obj=_body,
    layout=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
    ascii_only=st.booleans(),
    cut=st.integers(0, 400),
    insert=st.sampled_from([b"", b'"', b"\\", b",", b"]", b"}", b" ", b"x", b"[", b":"]),
)
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
def test_scan_and_whole_body_parse_agree(
    enc: codec.NativeCodec,
    obj: dict,
    layout: tuple[str, str],
    ascii_only: bool,
    cut: int,
    insert: bytes,
) -> None:
    """Generated bodies, then one byte cut or inserted at a random place (most no longer
    the plain kind, or not JSON): the service's answer with the scanner is the answer
    without it, request or error alike."""
    body = json.dumps(obj, separators=layout, ensure_ascii=ascii_only).encode()
    for b in (body, body[:cut] + insert + body[cut + 1 :], body[:cut] + insert + body[cut:]):
        got = outcome(b, enc)
        assert got == outcome(b, None), b
        raw = getattr(got, "raw_ids", None)  # the scan's ID buffer, which the encoder takes
        assert raw is None or raw == "\0".join(got.item_ids).encode(), b  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("codec"), "din")


@pytest.fixture(scope="module")
def clients(built: Built, lib: Any) -> Iterator[tuple[TestClient, TestClient]]:
    native = create_app(settings_for(built, ops_library=str(lib.path)))
    plain = create_app(settings_for(built, native_json="off"))
    with TestClient(native) as a, TestClient(plain) as b:
        assert a.app.state.ctr.codec is not None  # type: ignore[attr-defined]
        assert b.app.state.ctr.codec is None  # type: ignore[attr-defined]
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


def test_many_equal_scores_keep_the_request_order_with_either_encoder(
    built: Built, clients: tuple[TestClient, TestClient]
) -> None:
    """Unknown items tie (one OOV row): interleaved among known ones, past numpy's
    insertion-sort size, they still come back in request order on both paths."""
    known = built.frame["item_id"].astype(str).unique().tolist()[:40]
    unknown = [f"zz-tie-{k}" for k in range(40)]
    assert len(known) == 40
    cands = [x for pair in zip(known, unknown, strict=True) for x in pair]
    for c in clients:
        body = {"user_id": "u1", "candidates": [{"item_id": i} for i in cands]}
        r = c.post("/v1/score", json=body)
        assert r.status_code == 200, r.text
        got = [it["item_id"] for it in r.json()["items"] if it["item_id"].startswith("zz-tie-")]
        assert got == unknown
