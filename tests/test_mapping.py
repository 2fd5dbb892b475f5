"""Raw ID -> index: padding 0, OOV 1, normalisation, shared vocabularies, hashing, and
property tests over arbitrary (odd) text. Torch-free, like the module under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.encode import encode_frame, raw_columns_for_fit
from ctr.mapping import OOV, PAD, RESERVED, FeatureMapper, IdMapper, build_vocab, normalize
from ctr.spec import FeatureConfig, MappingSpec

REPO = Path(__file__).resolve().parents[1]
VOCAB = MappingSpec(type="vocab")
HASH = MappingSpec(type="hash", buckets=13)
MISSING = [None, float("nan"), np.nan, np.float32("nan"), "", float("inf"), -float("inf")]


def vocab_mapper(tokens: list[object], spec: MappingSpec = VOCAB) -> IdMapper:
    return IdMapper(spec, build_vocab(tokens, spec))


def seq_config() -> FeatureConfig:
    return FeatureConfig.model_validate(
        {
            "name": "m",
            "max_seq_len": 4,
            "features": [
                {"name": "user_id", "kind": "sparse", "side": "user"},
                {"name": "item_id", "kind": "sparse", "side": "item"},
                {
                    "name": "shop",
                    "kind": "sparse",
                    "side": "item",
                    "mapping": {"type": "hash", "buckets": 5},
                },
                {"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id"},
            ],
        }
    )


# ---- padding and OOV ------------------------------------------------------------------


@pytest.mark.parametrize("spec", [VOCAB, HASH], ids=["vocab", "hash"])
@pytest.mark.parametrize("raw", MISSING, ids=repr)
def test_missing_values_map_to_oov(spec: MappingSpec, raw: object) -> None:
    m = vocab_mapper(["a", "b", "13"], spec) if spec.type == "vocab" else IdMapper(spec)
    assert normalize(raw) is None
    assert m.map_one(raw) == OOV
    assert m.map_many([raw, raw]).tolist() == [OOV, OOV]


def test_unknown_ids_are_oov_and_known_ids_are_never_reserved() -> None:
    m = vocab_mapper(["a", "b", "b", "c"])
    assert (PAD, OOV, RESERVED) == (0, 1, 2)
    assert m.size == RESERVED + 3
    assert m.map_one("zzz") == OOV
    assert m.map_one(12345) == OOV
    known = [m.map_one(t) for t in "abc"]
    assert sorted(known) == [2, 3, 4]
    assert m.map_one("b") == RESERVED  # most frequent first
    assert PAD not in m.map_many(["a", None, "zzz", "", float("nan"), "c"]).tolist()


def test_hist_is_zero_padded_and_unknown_history_items_are_oov() -> None:
    config = seq_config()
    train = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "shop": ["s1", "s2"],
            "hist_item_id": [["i1", "i2"], ["i3"]],
        }
    )
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, train))
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "new", None],
            "item_id": ["i3", "unseen", None],
            "shop": ["s1", None, "s9"],
            "hist_item_id": [["i1", "i2", "i3", None, "unseen", "i1"], [], None],
        }
    )
    enc = encode_frame(config, mapper, frame)
    item = mapper.mapper_for("item_id")
    # the most recent max_seq_len=4 behaviours, oldest first; unknown/None -> OOV, not PAD
    assert enc.hist_len.tolist() == [4, 0, 0]
    want = [item.map_one("i3"), OOV, OOV, item.map_one("i1")]
    assert enc.hist[0, 0].tolist() == want and OOV not in (want[0], want[3])
    assert enc.hist[1:].tolist() == [[[PAD] * 4], [[PAD] * 4]]
    # scalars are never padding: unknown and missing are OOV
    assert (enc.user_sparse >= OOV).all() and (enc.item_sparse >= OOV).all()
    assert enc.user_sparse[1:, 0].tolist() == [OOV, OOV]
    assert enc.item_sparse[1:, 0].tolist() == [OOV, OOV]
    assert enc.item_sparse[2, 1] >= RESERVED  # hashed: an unseen value still gets a bucket


# ---- normalisation ----------------------------------------------------------------------


def test_pandas_missing_values_are_missing_in_training_as_in_serving(tmp_path: Path) -> None:
    """A nullable column (Parquet's string/Int64 read back by pandas) holds pd.NA for a
    missing value: it must be missing (OOV), as a request's null is, never a "<NA>" token
    with a trained row of its own."""
    assert normalize(pd.NA) is None and normalize(pd.NaT) is None
    config = seq_config()
    frame = pd.DataFrame(
        {
            "user_id": pd.array(["u1", None, "u3"], dtype="string"),
            "item_id": pd.array([7, None, 9], dtype="Int64"),
            "shop": ["s1", "s2", "s3"],
            "hist_item_id": [["7"], [], ["9"]],
        }
    )
    path = tmp_path / "nullable.parquet"
    frame.to_parquet(path)
    train = pd.read_parquet(path)
    assert train["user_id"].isna().iloc[1]
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, train))
    assert "<NA>" not in mapper.mapper_for("user_id").vocab
    assert "<NA>" not in mapper.mapper_for("item_id").vocab
    enc = encode_frame(config, mapper, train)
    assert enc.user_sparse[1, 0] == OOV == mapper.mapper_for("user_id").map_one(None)
    assert enc.item_sparse[1, 0] == OOV
    assert enc.item_sparse[0, 0] == mapper.mapper_for("item_id").map_one("7")


@pytest.mark.parametrize("spec", [VOCAB, HASH], ids=["vocab", "hash"])
def test_int_float_and_string_forms_agree(spec: MappingSpec) -> None:
    m = vocab_mapper([13, "x", 7.5], spec) if spec.type == "vocab" else IdMapper(spec)
    forms = [13, 13.0, "13", np.int64(13), np.int32(13), np.float64(13.0), np.float32(13.0)]
    got = {m.map_one(f) for f in forms}
    assert len(got) == 1 and got != {OOV}
    assert m.map_many(forms).tolist() == [got.pop()] * len(forms)
    assert normalize(7.5) == normalize(np.float64(7.5)) == "7.5"
    assert m.map_one(7.5) != m.map_one(13) or spec.type == "hash"
    assert m.map_one("13 ") != m.map_one(13) or spec.type == "hash"


def test_vocab_order_min_count_and_max_size() -> None:
    tokens = ["b", "a", "a", "c", "c", "c", "d", None, ""]
    assert build_vocab(tokens, VOCAB) == {"c": 2, "a": 3, "b": 4, "d": 5}  # ties by token
    assert build_vocab(tokens, MappingSpec(min_count=2)) == {"c": 2, "a": 3}
    assert build_vocab(tokens, MappingSpec(max_size=1)) == {"c": 2}
    assert build_vocab(list(reversed(tokens)), VOCAB) == build_vocab(tokens, VOCAB)


def test_min_count_counts_a_users_history_once_not_once_per_row() -> None:
    """Rows repeat a user's history (each prefix, and a negative beside its positive):
    a behaviour counts as often as the user's fullest row holds it, so min_count
    compares against how many behaviours there were, not how many rows saw them."""
    config = seq_config()
    config.features[1].mapping = MappingSpec(min_count=2)
    train = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u3"],
            "item_id": ["t1", "n1", "t2", "n2", "t3", "n3", "t4"],
            "shop": ["s"] * 7,
            # u1: "h" once, seen by four rows; u2: "r" twice in one row (a re-visit);
            # "h" once more in u3's only row
            "hist_item_id": ["a", "a", "a|h", "a|h", "r|x|r", "r|x|r", "h"],
        }
    )
    cols = raw_columns_for_fit(config, train)
    assert sorted(cols["hist_item_id"], key=str) == ["a", "h", "h", "r", "r", "x"]
    assert cols["item_id"] == train["item_id"].tolist()  # targets: once per row
    vocab = FeatureMapper.fit(config, cols).mapper_for("hist_item_id").vocab
    assert set(vocab) == {"h", "r"}  # "a": one user's one behaviour, in four rows
    # a frame without the user column counts each row as its own user
    rows = raw_columns_for_fit(config, train.drop(columns=["user_id"]))
    assert sorted(rows["hist_item_id"]).count("a") == 4
    # histories given as lists count the same as delimited strings
    listed = train.assign(hist_item_id=[v.split("|") for v in train["hist_item_id"]])
    assert sorted(raw_columns_for_fit(config, listed)["hist_item_id"], key=str) == sorted(
        cols["hist_item_id"], key=str
    )


# ---- shared vocabulary -------------------------------------------------------------------


def test_item_id_and_hist_item_id_share_one_vocabulary() -> None:
    config = seq_config()
    mapper = FeatureMapper.fit(
        config,
        {
            "user_id": ["u1"],
            "item_id": ["i1", "i2"],
            "hist_item_id": ["i3", "i3", "i3", "i1"],  # i3 only ever seen in histories
        },
    )
    assert set(mapper.tables) == {"user_id", "item_id", "shop"}  # no table of its own
    item, hist = mapper.mapper_for("item_id"), mapper.mapper_for("hist_item_id")
    assert hist is item
    assert item.vocab == {"i3": 2, "i1": 3, "i2": 4}  # counts pooled over both
    for raw in ("i1", "i2", "i3", "nope", None):
        assert hist.map_one(raw) == item.map_one(raw)
    assert mapper.table_sizes()["item_id"] == 5


# ---- hashing -----------------------------------------------------------------------------


def test_hash_mapping_is_in_range_and_spreads() -> None:
    m = IdMapper(HASH)
    assert m.size == RESERVED + 13
    idx = m.map_many([f"id{i}" for i in range(2000)])
    assert idx.min() >= RESERVED and idx.max() < m.size
    assert len(set(idx.tolist())) == 13
    assert m.map_many(["id5", "id5"]).tolist() == [m.map_one("id5")] * 2


def test_hash_mapping_is_stable_across_processes() -> None:
    """Not Python's salted ``hash()``: another interpreter with another hash seed agrees."""
    raws = ["a", "item_42", "13", "é☃", "\ud800x", "x" * 300]
    code = (
        "import json, sys; from ctr.mapping import IdMapper; from ctr.spec import MappingSpec; "
        "m = IdMapper(MappingSpec(type='hash', buckets=1000)); "
        "print(json.dumps([m.map_one(r) for r in json.loads(sys.argv[1])]))"
    )
    here = IdMapper(MappingSpec(type="hash", buckets=1000))
    want = [here.map_one(r) for r in raws]
    for seed in ("1", "98765"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(raws)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout) == want


def test_a_mapper_copies_the_vocabulary_it_is_given_unless_it_owns_it() -> None:
    """``IdMapper(spec, vocab)`` and ``from_json(data)`` copy the vocabulary: the caller's
    dict (a manifest it still holds) may change afterwards without changing the mapping;
    only ``own=True`` (the bundle loader, which hands the dict over) keeps it itself."""
    vocab = {"a": RESERVED}
    mapper = IdMapper(VOCAB, vocab)
    data = {"spec": VOCAB.model_dump(), "vocab": {"a": RESERVED}}
    loaded = IdMapper.from_json(data)
    vocab["b"] = RESERVED + 1
    data["vocab"]["b"] = RESERVED + 1
    for m in (mapper, loaded):
        assert m.map_one("b") == OOV and m.size == RESERVED + 1
    assert IdMapper(VOCAB, vocab, own=True).vocab is vocab
    assert IdMapper.from_json(data, own=True).vocab is data["vocab"]


def test_hash_keeps_lone_surrogates_apart() -> None:
    """An ID holding a lone surrogate (odd text the mapping takes, like any other)
    hashes by its own code point (UTF-8 with ``surrogatepass``): two such IDs, and an ID
    holding ``?`` or U+FFFD, are different tokens with their own CRC32, not all the one
    of a replacement character."""
    import zlib

    from ctr.mapping import stable_hash

    assert stable_hash("i\ud800") == zlib.crc32(b"i\xed\xa0\x80")
    hashes = {stable_hash(t) for t in ("i\ud800", "i\ud801", "i\udfff", "i?", "i\ufffd")}
    assert len(hashes) == 5


# ---- properties ------------------------------------------------------------------------------

odd_text = st.text(
    st.one_of(st.characters(categories=["Cs"]), st.characters(exclude_categories=())),
    max_size=12,
)
raw_values = st.one_of(
    odd_text,
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=8),
)


@settings(max_examples=150, deadline=None)
@given(vocab=st.lists(odd_text, max_size=20), raws=st.lists(raw_values, max_size=20))
def test_map_one_never_raises_and_stays_in_range(vocab: list[str], raws: list[object]) -> None:
    for m in (vocab_mapper(vocab), IdMapper(HASH)):
        got = [m.map_one(r) for r in raws]
        assert all(isinstance(i, int) and 1 <= i < m.size for i in got)
        assert m.map_many(raws).tolist() == got
    fitted = vocab_mapper(vocab)
    for token in vocab:  # every fitted token maps to its own index, surrogates included
        if token != "":
            assert fitted.map_one(token) == fitted.vocab[token] >= RESERVED


@settings(max_examples=150, deadline=None)
@given(vocab=st.lists(odd_text, max_size=20), raws=st.lists(odd_text, max_size=20))
def test_a_list_of_strings_maps_as_one_by_one(vocab: list[str], raws: list[str]) -> None:
    """map_many's all-text pass (what a scoring request's IDs and Redis values are)
    answers map_one's indices, for "" (missing) and fitted tokens too, and also for a
    vocabulary that holds "" (a hand-edited manifest: "" is still missing, OOV)."""
    fitted = vocab_mapper(vocab)
    with_empty = IdMapper(VOCAB, {**fitted.vocab, "": RESERVED + len(fitted.vocab)})
    for m in (fitted, with_empty, IdMapper(HASH)):
        for batch in (raws, [*raws, *vocab, ""]):
            assert m.map_many(batch).tolist() == [m.map_one(r) for r in batch]


@settings(max_examples=100, deadline=None)
@given(vocab=st.lists(odd_text, max_size=20), raws=st.lists(raw_values, max_size=10))
def test_mapping_survives_a_json_round_trip(vocab: list[str], raws: list[object]) -> None:
    """The manifest stores the mapping as JSON text; odd unicode must come back intact."""
    for m in (vocab_mapper(vocab), IdMapper(HASH)):
        back = IdMapper.from_json(json.loads(json.dumps(m.to_json())))
        assert back.size == m.size
        assert [back.map_one(r) for r in [*raws, *vocab]] == [m.map_one(r) for r in [*raws, *vocab]]


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False)))
def test_numeric_forms_agree(x: int | float) -> None:
    m = IdMapper(HASH)
    if isinstance(x, float) and x.is_integer():
        assert normalize(x) == normalize(int(x)) == str(int(x))
        assert m.map_one(x) == m.map_one(str(int(x)))
    if isinstance(x, int):
        assert normalize(x) == normalize(str(x)) == normalize(np.int64(x))
        assert normalize(float(x)) == str(x)  # exact below 2**53


def test_dense_values_beyond_float32_get_the_default() -> None:
    """1e39 is a finite float64 but inf in the float32 feed (and NaN scores after it):
    it takes the default, as inf does, in training and serving alike (one function)."""
    from ctr.encode import F32_MAX, to_float
    from ctr.spec import FeatureSpec

    plain = FeatureSpec(name="price", kind="dense", side="item", default=0.5)
    logged = FeatureSpec(name="price", kind="dense", side="item", log1p=True)
    for raw in (1e39, -1e39, "1e39", 3.5e38, float("inf"), "nan"):
        assert to_float(raw, plain) == 0.5, raw
    assert to_float(F32_MAX, plain) == F32_MAX and to_float(1e30, plain) == 1e30
    # with log1p the value fits again: log1p(1e39) is about 89.8
    assert 89 < to_float(1e39, logged) < 90 and np.isfinite(np.float32(to_float(1e39, logged)))


def test_log1p_takes_a_negative_dense_value_as_zero() -> None:
    """A ``log1p`` feature clamps a negative value to 0 before the log (log1p(0) = 0),
    in every form it arrives in (a float, Redis' text, a column of them): not
    log1p(|x|), which would score a refund like a purchase, nor NaN."""
    from ctr.encode import dense_column, to_float
    from ctr.spec import FeatureSpec

    logged = FeatureSpec(name="price", kind="dense", side="item", log1p=True, default=0.5)
    for raw in (-5.0, "-5", -0.5, "-1e30", -3):
        assert to_float(raw, logged) == 0.0, raw
    assert dense_column([-5.0, "-5", 3.0], logged) == [0.0, 0.0, pytest.approx(np.log1p(3.0))]
    assert dense_column([-5.0, "-5", None], logged) == [0.0, 0.0, pytest.approx(np.log1p(0.5))]


def test_a_vocabulary_counts_only_the_history_the_model_sees() -> None:
    """A token seen only before a row's last ``max_seq_len`` behaviours (which encoding
    cuts off) gets no vocabulary row: training would never update one, and serving
    would score that item with a random vector instead of the OOV row."""
    config = seq_config()  # max_seq_len 4
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["a", "b"],
            "shop": ["s1", "s2"],
            "hist_item_id": ["OLD|w|x|y|z", "x|y"],
        }
    )
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, frame))
    items = mapper.mapper_for("item_id")
    assert "OLD" not in items.vocab and items.map_one("OLD") == OOV
    assert {"w", "x", "y", "z", "a", "b"} <= set(items.vocab)
    enc = encode_frame(config, mapper, frame)
    # every index training sees is in the vocabulary, and every vocabulary row is seen
    seen = set(enc.hist[enc.hist > OOV].tolist()) | set(enc.item_sparse[:, 0].tolist())
    assert seen == set(items.vocab.values())


def test_parquet_integer_ids_with_a_null_stay_exact(tmp_path: Path) -> None:
    """An int64 column with a null (written by any Parquet writer, no pandas metadata)
    is read as integers and None, not as float64, which rounds IDs above 2**53: the
    training token is the one serving makes of the same ID."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.generic import read_table

    big = 12345678901234567  # not a float64
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"item_id": pa.array([big, None], pa.int64())}), path)
    col = read_table(path, "parquet")["item_id"].tolist()
    assert normalize(col[0]) == normalize(big) == normalize(str(big)) == str(big)
    assert normalize(col[1]) is None


def test_parquet_binary_ids_are_their_text(tmp_path: Path) -> None:
    """A Parquet BINARY column (and a list of them, a history) reads as ``bytes``: each
    value was mapped as ``"b'218'"``, so an item's history tokens and its candidate ID
    (read as text elsewhere, and as JSON text by the service) were two IDs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.generic import read_table

    path = tmp_path / "ids.parquet"
    table = pa.table({
        "item_id": pa.array([b"218", b"7"], pa.binary()),
        "hist_item_id": pa.array([[b"7", b"218"], []], pa.list_(pa.binary())),
    })  # fmt: skip
    pq.write_table(table, path)
    frame = read_table(path, "parquet")
    assert [normalize(x) for x in frame["item_id"]] == ["218", "7"]
    assert [normalize(x) for x in frame["hist_item_id"][0]] == ["7", "218"]
    m = vocab_mapper(["218", "7"])
    assert m.map_one(b"218") == m.map_one("218") != OOV
    # not UTF-8: kept as text that is (ctr load writes it as JSON), never an error
    assert normalize(b"\xff") == "\\xff"


def test_parquet_decimal_ids_agree_with_their_numbers(tmp_path: Path) -> None:
    """A Parquet DECIMAL column (a warehouse's NUMBER(10,2)) reads as ``Decimal``: its
    values trained as ``"3.00"`` and ``"7.50"``, which a request's ``3``, ``3.0``, ``"3"``
    or ``7.5`` never matched (scored as unknown IDs, silently: review, session 40)."""
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.generic import read_table

    path = tmp_path / "ids.parquet"
    dec = pa.decimal128(10, 2)
    table = pa.table({
        "item_id": pa.array([Decimal("3.00"), Decimal("7.50"), None], dec),
        "hist_item_id": pa.array([[Decimal("7.50"), Decimal("-0.00")], [], None],
                                 pa.list_(dec)),
    })  # fmt: skip
    pq.write_table(table, path)
    frame = read_table(path, "parquet")
    items = [normalize(x) for x in frame["item_id"]]
    assert items == ["3", "7.5", None]
    assert [normalize(x) for x in frame["hist_item_id"][0]] == ["7.5", "0"]
    m = vocab_mapper(list(frame["item_id"][:2]) + list(frame["hist_item_id"][0]))
    assert m.map_one(3) == m.map_one(3.0) == m.map_one("3") == m.map_one(Decimal("3.00")) != OOV
    assert m.map_one(7.5) == m.map_one("7.5") == m.map_one(Decimal("7.5")) != OOV
    assert m.map_one(0) != OOV
    assert normalize(Decimal("NaN")) is None and normalize(Decimal("-Infinity")) is None
    big = Decimal("12345678901234567890123456789")  # DECIMAL(38, 0): exact, as an int
    assert normalize(big) == normalize(int(big)) == str(int(big))
    # a fraction a float cannot hold maps as the same number in a request does (it
    # became "1.2345678901234568e+16" against a request's "12345678901234568")
    for text in ("12345678901234567.5", "1E+2", "1.0E-7", "-0.00", "0.1"):
        assert normalize(Decimal(text)) == normalize(float(text)), text


def test_the_vocabulary_follows_encoding_where_parallel_histories_differ() -> None:
    """Encoding keeps, of a row's parallel sequence fields, as many last entries as the
    shortest holds: the vocabulary counts exactly those, not each field's own last
    ``max_seq_len``."""
    config = FeatureConfig.model_validate(
        {
            "name": "m",
            "max_seq_len": 4,
            "features": [
                {"name": "item_id", "kind": "sparse", "side": "item"},
                {"name": "cate_id", "kind": "sparse", "side": "item"},
                {"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id"},
                {"name": "hist_cate_id", "kind": "sequence", "shared_with": "cate_id"},
            ],
        }
    )
    frame = pd.DataFrame(
        {
            "user_id": ["u1"],
            "item_id": ["a"],
            "cate_id": ["c"],
            "hist_item_id": ["OLD|w|x|y"],
            "hist_cate_id": ["k|k"],
        }
    )
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, frame))
    enc = encode_frame(config, mapper, frame)
    assert int(enc.hist_len[0]) == 2  # x and y, with k and k
    items = mapper.mapper_for("item_id").vocab
    assert set(items) == {"a", "x", "y"}  # OLD and w: cut off by encoding
    seen = set(enc.hist[0, 0][enc.hist[0, 0] > OOV].tolist()) | {int(enc.item_sparse[0, 0])}
    assert seen == set(items.values())


def test_numpy_booleans_map_as_python_booleans() -> None:
    """A Parquet bool cell read through pandas is numpy's bool: ``ctr load`` stored
    "True" where training's vocabulary held "1" (every user out of vocabulary online)."""
    import numpy as np

    from ctr.mapping import normalize

    assert normalize(np.bool_(True)) == normalize(True) == "1"
    assert normalize(np.bool_(False)) == normalize(False) == "0"
