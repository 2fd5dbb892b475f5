"""Dataset adapters (Amazon, MovieLens, Alimama) and the generic CSV path.

Tests that need ``../shared/data`` (or ``$CTR_DATA_ROOT``) skip when the folder is
absent; the rule/builder and CSV tests run anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ctr.encode import Encoded, encode_frame, raw_columns_for_fit
from ctr.mapping import OOV, PAD, FeatureMapper
from ctr.spec import FeatureConfig, load_config
from training.data.amazon import build_examples, category_map
from training.data.generic import DataError, data_root, load_frame, split_frame

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _folder(name: str) -> Path:
    folder = data_root() / name
    if not folder.is_dir():
        pytest.skip(f"dataset folder {folder} is absent")
    return folder


def _fit_and_encode(
    config: FeatureConfig, train: pd.DataFrame, frame: pd.DataFrame
) -> tuple[FeatureMapper, Encoded]:
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, train))
    return mapper, encode_frame(config, mapper, frame, config.data.seq_delimiter)


def _check_encoded(config: FeatureConfig, frame: pd.DataFrame, enc: Encoded) -> None:
    n, seq_len = len(frame), config.max_seq_len
    assert enc.user_sparse.shape == (n, len(config.user_sparse))
    assert enc.user_dense.shape == (n, len(config.user_dense))
    assert enc.item_sparse.shape == (n, len(config.item_sparse))
    assert enc.item_dense.shape == (n, len(config.item_dense))
    assert enc.hist.shape == (n, len(config.sequences), seq_len)
    assert enc.hist_len.shape == (n,)
    first_seq = config.sequences[0].source
    expected_len = np.array([min(len(h), seq_len) for h in frame[first_seq]])
    np.testing.assert_array_equal(enc.hist_len, expected_len)
    # real slots are never padding, slots past the length are
    slots = np.arange(seq_len)[None, :] < enc.hist_len[:, None]
    assert (enc.hist[:, 0, :][slots] != PAD).all()
    assert (enc.hist[:, 0, :][~slots] == PAD).all()


def _check_last_per_user_split(
    frame: pd.DataFrame, config: FeatureConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    train, val, test = split_frame(frame, config.data)
    assert len(train) + len(val) + len(test) == len(frame)
    assert not set(train.index) & set(val.index)
    assert not set(train.index) & set(test.index)
    assert not set(val.index) & set(test.index)
    test_keys = set(zip(test["user_id"], test["ts"], strict=True))
    train_keys = set(zip(train["user_id"], train["ts"], strict=True))
    assert not test_keys & train_keys
    last_train = train.groupby("user_id")["ts"].max()
    first_test = test.groupby("user_id")["ts"].min()
    common = first_test.index.intersection(last_train.index)
    assert len(common) > 0
    assert (first_test[common] > last_train[common]).all()
    return train, val, test


# ---- Amazon -------------------------------------------------------------------------


def test_category_rule_picks_most_specific_supported_node() -> None:
    attrs = {
        # brand 100/101 first; path nodes 2 (universal) > 10 > 20 / 21
        "a": [100, 2, 10, 20],
        "b": [100, 2, 10, 20],
        "c": [101, 2, 10, 21],
        "d": [2, 10],  # no brand: first attribute is a category node
        "e": [102],  # brand only
    }
    cates = category_map(attrs, min_items=2)
    assert cates == {"a": "20", "b": "20", "c": "10", "d": "10", "e": "unk"}
    # below the support floor everywhere -> broadest node
    assert category_map({"x": [7, 8, 9]}, min_items=5) == {"x": "8"}


def test_build_examples_pairs_share_history() -> None:
    seqs = [("u1", ["1", "2", "3", "4", "5"]), ("u2", ["6", "7", "8"])]
    universe_cate = {str(i): f"c{i % 2}" for i in range(1, 9)}
    frame = build_examples(seqs, universe_cate, max_seq_len=2, targets_per_user=3, min_history=2)
    # u1: targets t=2,3,4; u2: t=2 only (needs 2 earlier items)
    assert list(frame["ts"]) == [2, 2, 3, 3, 4, 4, 2, 2]
    assert list(frame["label"]) == [1, 0] * 4
    pos = frame.iloc[4]
    assert pos["item_id"] == "5" and pos["hist_item_id"] == ["3", "4"]
    assert pos["hist_cate_id"] == ["c1", "c0"]
    assert frame.iloc[5]["hist_item_id"] == ["3", "4"]
    assert frame.iloc[5]["item_id"] in {"6", "7", "8"}
    assert frame.iloc[7]["item_id"] in {"1", "2", "3", "4", "5"}


@pytest.fixture(scope="module")
def amazon() -> tuple[FeatureConfig, pd.DataFrame]:
    _folder("amazon-s3rec-sequences")
    config = load_config(CONFIGS / "amazon_beauty_din.yaml")
    return config, load_frame(config)


@pytest.mark.data
def test_amazon_frame(amazon: tuple[FeatureConfig, pd.DataFrame]) -> None:
    config, frame = amazon
    cols = ["user_id", "item_id", "cate_id", "hist_item_id", "hist_cate_id", "label", "ts"]
    assert list(frame.columns) == cols
    assert set(frame["label"].unique()) == {0.0, 1.0}
    assert (frame["label"] == 1).sum() == (frame["label"] == 0).sum()
    assert frame["hist_item_id"].map(len).max() <= config.max_seq_len
    assert (frame["hist_item_id"].map(len) == frame["hist_cate_id"].map(len)).all()
    assert frame["hist_item_id"].map(len).min() >= 2
    assert isinstance(frame["item_id"].iloc[0], str)

    seqs: dict[str, list[str]] = {}
    path = _folder("amazon-s3rec-sequences") / "Beauty.txt"
    for line in path.read_text().splitlines():
        user, *items = line.split()
        seqs[user] = items
    assert frame["user_id"].nunique() == len(seqs)

    pos = frame[frame["label"] == 1].reset_index(drop=True)
    neg = frame[frame["label"] == 0].reset_index(drop=True)
    assert len(pos) == len(neg)
    # rows come as (positive, negative) pairs for the same user, ts and history
    assert (pos["user_id"] == neg["user_id"]).all() and (pos["ts"] == neg["ts"]).all()
    assert (pos["hist_item_id"] == neg["hist_item_id"]).all()
    assert (pos["hist_cate_id"] == neg["hist_cate_id"]).all()
    for user, t, item, hist in pos[["user_id", "ts", "item_id", "hist_item_id"]].itertuples(
        index=False
    ):
        seq = seqs[user]
        assert item == seq[t]
        assert hist == seq[:t][-config.max_seq_len :]
    for user, item in neg[["user_id", "item_id"]].itertuples(index=False):
        assert item not in seqs[user]
    # targets are the last 3 positions with at least 2 earlier items
    targets = pos.groupby("user_id")["ts"].agg(list)
    for user, ts in targets.items():
        n = len(seqs[str(user)])
        assert ts == list(range(max(2, n - 3), n))


@pytest.mark.data
def test_amazon_split_and_encode(amazon: tuple[FeatureConfig, pd.DataFrame]) -> None:
    config, frame = amazon
    train, val, test = _check_last_per_user_split(frame, config)
    # a pair never straddles splits
    for part in (train, val, test):
        assert (part.groupby(["user_id", "ts"]).size() == 2).all()
    sample = pd.concat([train.head(2000), test.head(2000)])
    mapper, enc = _fit_and_encode(config, train, sample)
    _check_encoded(config, sample, enc)
    assert mapper.table_sizes()["cate_id"] > 50


# ---- MovieLens ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens() -> tuple[FeatureConfig, pd.DataFrame]:
    _folder("movielens-100k")
    config = load_config(
        CONFIGS / "movielens_din.yaml", {"data.options.max_examples_per_user": None}
    )
    return config, load_frame(config)


@pytest.mark.data
def test_movielens_frame(movielens: tuple[FeatureConfig, pd.DataFrame]) -> None:
    config, frame = movielens
    cols = [
        "user_id",
        "gender",
        "age_bucket",
        "occupation",
        "item_id",
        "cate_id",
        "hist_item_id",
        "hist_cate_id",
        "label",
        "ts",
    ]
    assert set(cols) <= set(frame.columns)
    assert set(frame["label"].unique()) == {0.0, 1.0}
    assert frame["hist_item_id"].map(len).max() <= config.max_seq_len
    assert frame["hist_item_id"].map(len).min() >= 5
    assert len(frame) == 100_000 - 943 * 5
    assert ((frame["rating"] >= 4) == (frame["label"] == 1)).all()
    known = {  # (user, movie) -> (rating from u.data, cate, gender, age bucket, occupation)
        ("186", "302"): (3, "Crime", "F", "30s", "executive"),
        ("22", "377"): (1, "Children's", "M", "20s", "writer"),
        ("298", "474"): (4, "Sci-Fi", "M", "40s", "executive"),
        ("253", "465"): (5, "Adventure", "F", "20s", "librarian"),
        ("166", "346"): (1, "Crime", "M", "40s", "educator"),
    }
    for (user, movie), (rating, cate, gender, age, occ) in known.items():
        row = frame[(frame["user_id"] == user) & (frame["item_id"] == movie)]
        assert len(row) == 1
        r = row.iloc[0]
        assert r["label"] == float(rating >= 4)
        assert (r["cate_id"], r["gender"], r["age_bucket"], r["occupation"]) == (
            cate,
            gender,
            age,
            occ,
        )
    # user 1's first example: position 5 of its (timestamp, item) order
    first = frame[frame["user_id"] == "1"].iloc[0]
    assert first["ts"] == 5 and first["item_id"] == "196"
    assert first["hist_item_id"] == ["168", "172", "165", "156", "166"]
    # a history holds movies of earlier seconds and, of the target's own second, those
    # with a smaller item id (the documented tie order; never a later second's)
    from training.data.movielens import dataset_dir, read_ratings

    ratings = read_ratings(dataset_dir(config))
    cols = (ratings["user_id"], ratings["item_id"], ratings["timestamp"])
    when = {(str(u), str(i)): int(t) for u, i, t in zip(*cols, strict=True)}
    rows = zip(frame["user_id"], frame["item_id"], frame["hist_item_id"], strict=True)
    same_second = tied_positions = positions = 0
    for u, target, hist in rows:
        at = when[(u, target)]
        assert all(when[(u, i)] <= at for i in hist)
        tied = [int(i) for i in hist if when[(u, i)] == at]
        assert all(i < int(target) for i in tied)
        same_second += bool(tied)
        tied_positions += len(tied)
        positions += len(hist)
    # the shares docs/datasets.md gives: 51 % of examples, 2.5 % of history positions
    assert 0.50 < same_second / len(frame) < 0.52
    assert 0.02 < tied_positions / positions < 0.03


@pytest.mark.data
def test_movielens_cap_keeps_last_examples() -> None:
    _folder("movielens-100k")
    config = load_config(CONFIGS / "movielens_din.yaml", {"data.options.max_examples_per_user": 3})
    frame = load_frame(config)
    assert (frame.groupby("user_id").size() == 3).all()
    full = load_config(CONFIGS / "movielens_din.yaml")
    assert frame.groupby("user_id")["ts"].min().min() >= full.data.options["min_history"]


@pytest.mark.data
def test_movielens_split_and_encode(movielens: tuple[FeatureConfig, pd.DataFrame]) -> None:
    config, frame = movielens
    train, val, test = _check_last_per_user_split(frame, config)
    assert len(test) == config.data.test_steps * frame["user_id"].nunique()
    sample = pd.concat([train.head(3000), val, test])
    _, enc = _fit_and_encode(config, train, sample)
    _check_encoded(config, sample, enc)
    assert (enc.user_sparse != OOV).all()  # every user/profile value is seen in train


# ---- Alimama ------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("file, rows", [("paddlerec", 304), ("deepctr", 99)])
def test_alimama_frame_split_encode(file: str, rows: int) -> None:
    _folder("alimama-display-ad-dmr")
    config = load_config(CONFIGS / "alimama_din.yaml", {"data.options.file": file})
    assert config.data.split == "random"
    frame = load_frame(config)
    assert len(frame) == rows
    for col in ["user_id", "item_id", "cate_id", "brand", "hist_cate_id", "hist_brand", "label"]:
        assert col in frame.columns
    assert set(frame["label"].unique()) <= {0.0, 1.0}
    assert frame["label"].sum() > 0
    lens = frame["hist_cate_id"].map(len)
    assert lens.max() <= config.max_seq_len
    assert (lens == frame["hist_brand"].map(len)).all()
    assert not any("0" in h for h in frame["hist_cate_id"])  # padding dropped
    if file == "paddlerec":
        # 14 distinct clicks: the file repeats each 15 times (210 lines), kept once here
        assert int(frame["label"].sum()) == 14
        assert frame["user_id"].iloc[0] == "1000043" and frame["item_id"].iloc[0] == "328301"
        assert frame["cate_id"].iloc[0] == "6410" and frame["brand"].iloc[0] == "121422"
        assert lens.iloc[0] == 50

    train, val, test = split_frame(frame, config.data)
    idx = [set(p.index) for p in (train, val, test)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert sum(map(len, idx)) == len(frame)
    _, enc = _fit_and_encode(config, train, frame)
    _check_encoded(config, frame, enc)
    # sequences share the candidate's tables: a history cate equal to the target cate
    # gets the same index
    pairs = zip(frame["cate_id"], frame["hist_cate_id"], strict=True)
    row = int(np.flatnonzero([cate in hist for cate, hist in pairs])[0])
    pos = frame["hist_cate_id"].iloc[row].index(frame["cate_id"].iloc[row])
    assert enc.hist[row, 0, pos] == enc.item_sparse[row, 1]


@pytest.mark.data
def test_alimama_duplicate_rows_kept_once() -> None:
    """The PaddleRec file repeats 14 rows 15 times each; by default each is kept once
    (so no impression is in train and test at once), ``keep_duplicates`` keeps all."""
    _folder("alimama-display-ad-dmr")
    config = load_config(CONFIGS / "alimama_din.yaml")
    frame = load_frame(config)
    cols = [c for c in frame.columns if c != "row"]
    as_text = frame[cols].astype(str)
    assert not as_text.duplicated().any()
    train, _, test = split_frame(frame, config.data, seed=config.train.seed)
    seen = set(map(tuple, as_text.loc[train.index].to_numpy().tolist()))
    assert not any(tuple(r) in seen for r in as_text.loc[test.index].to_numpy().tolist())
    keep = {"data.options.keep_duplicates": True}
    every = load_frame(load_config(CONFIGS / "alimama_din.yaml", keep))
    assert len(every) == 500 and int(every["label"].sum()) == 210
    assert every[cols].astype(str).duplicated().sum() == 500 - len(frame)
    # a kept row names its first line in the file
    assert frame["row"].is_monotonic_increasing and set(frame["row"]) <= set(every["row"])
    with pytest.raises(DataError, match="keep_duplicates"):
        load_frame(
            load_config(CONFIGS / "alimama_din.yaml", {"data.options.keep_duplicates": "no"})
        )


def test_unknown_option_is_rejected() -> None:
    config = load_config(CONFIGS / "amazon_beauty_din.yaml", {"data.options.nmae": "Beauty"})
    with pytest.raises(DataError, match="unknown amazon data.options"):
        load_frame(config)


# ---- generic CSV path ---------------------------------------------------------------


def _csv_config(path: Path, delimiter: str) -> FeatureConfig:
    raw: dict[str, Any] = {
        "name": "csv_din",
        "max_seq_len": 3,
        "features": [
            {"name": "user_id", "kind": "sparse", "side": "user"},
            {"name": "item_id", "kind": "sparse", "side": "item"},
            {"name": "cate_id", "kind": "sparse", "side": "item"},
            {"name": "price", "kind": "dense", "side": "item", "log1p": True},
            {"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id"},
            {"name": "hist_cate_id", "kind": "sequence", "shared_with": "cate_id"},
        ],
        "data": {"source": "csv", "path": str(path), "seq_delimiter": delimiter},
    }
    return FeatureConfig.model_validate(raw)


@pytest.mark.parametrize("delimiter", ["|", ";"])
def test_generic_csv_matches_list_frame(tmp_path: Path, delimiter: str) -> None:
    listed = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3"],
            "item_id": ["i9", "i3", "i1", "i2"],
            "cate_id": ["c1", "c2", "c1", "c3"],
            "price": [1.5, 2.0, 0.0, 10.0],
            "hist_item_id": [["i1", "i2"], ["i1", "i2", "i9", "i4", "i5"], [], ["i3"]],
            "hist_cate_id": [["c1", "c1"], ["c1", "c1", "c1", "c2", "c3"], [], ["c2"]],
            "label": [1, 0, 1, 0],
            "ts": [0, 1, 0, 0],
        }
    )
    as_csv = listed.copy()
    for col in ("hist_item_id", "hist_cate_id"):
        as_csv[col] = [delimiter.join(v) for v in listed[col]]
    path = tmp_path / "logs.csv"
    as_csv.to_csv(path, index=False)

    config = _csv_config(path, delimiter)
    loaded = load_frame(config)
    assert len(loaded) == 4 and loaded["label"].tolist() == [1.0, 0.0, 1.0, 0.0]

    mapper_csv = FeatureMapper.fit(config, raw_columns_for_fit(config, loaded, delimiter))
    mapper_list = FeatureMapper.fit(config, raw_columns_for_fit(config, listed))
    assert mapper_csv.to_json() == mapper_list.to_json()
    enc_csv = encode_frame(config, mapper_csv, loaded, delimiter)
    enc_list = encode_frame(config, mapper_list, listed)
    for name in ("user_sparse", "user_dense", "hist", "hist_len", "item_sparse", "item_dense"):
        np.testing.assert_array_equal(getattr(enc_csv, name), getattr(enc_list, name))
    assert enc_csv.hist_len.tolist() == [2, 3, 0, 1]
    # most recent max_seq_len kept, oldest first
    item_of = mapper_list.mapper_for("hist_item_id")
    assert enc_csv.hist[1, 0].tolist() == [item_of.map_one(t) for t in ("i9", "i4", "i5")]
    assert enc_csv.item_dense[:, 0] == pytest.approx(np.log1p([1.5, 2.0, 0.0, 10.0]))


def test_a_user_id_feature_beside_another_user_key_serves_its_stored_value(
    tmp_path: Path,
) -> None:
    """``data.user_key: acct`` with a user feature ``user_id`` read from its own column:
    ``ctr load`` stores each user's ``user_id`` in the profile, and serving fed the
    request's ID (the acct) in its place, out of vocabulary. The key's own feature still
    takes the request's ID."""
    from types import SimpleNamespace

    from service.features import encode_user
    from service.store import UserData

    raw = _csv_config(tmp_path / "x.csv", "|").model_dump()
    raw["features"].insert(0, {"name": "acct", "kind": "sparse", "side": "user"})
    raw["data"]["user_key"] = "acct"
    config = FeatureConfig.model_validate(raw)
    frame = pd.DataFrame({"acct": ["A-u1", "A-u2"], "user_id": ["u1", "u2"],
                          "item_id": ["i1", "i2"], "cate_id": ["c1", "c2"],
                          "price": [1.0, 2.0], "hist_item_id": [["i2"], ["i1"]],
                          "hist_cate_id": [["c2"], ["c1"]], "label": [1, 0]})  # fmt: skip
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, frame))
    bundle = SimpleNamespace(config=config, mapper=mapper, dense_bounds={})
    stored = UserData(profile={"user_id": "u1", "acct": "A-u1"})
    rows = encode_user(bundle, "A-u1", {}, stored, b"")  # type: ignore[arg-type]
    names = [f.source for f in config.user_sparse]
    got = dict(zip(names, rows.user_sparse[0].tolist(), strict=True))
    assert got["user_id"] == mapper.mapper_for("user_id").map_one("u1") != OOV
    assert got["acct"] == mapper.mapper_for("acct").map_one("A-u1") != OOV


def test_last_per_user_split_steps() -> None:
    """``test_steps``/``val_steps`` move whole time steps per user, newest to test."""
    rows = [{"user_id": u, "ts": t, "label": float(t % 2)} for u in ("a", "b") for t in range(6)]
    frame = pd.DataFrame(rows)
    from ctr.spec import DataSpec

    spec = DataSpec(split="last_per_user", time_column="ts", test_steps=2, val_steps=1)
    tr, va, te = split_frame(frame, spec)
    for u in ("a", "b"):
        assert sorted(te[te.user_id == u].ts) == [4, 5]
        assert sorted(va[va.user_id == u].ts) == [3]
        assert sorted(tr[tr.user_id == u].ts) == [0, 1, 2]


def test_time_split_without_its_column_is_an_error_not_a_shuffle() -> None:
    """A frame without ``ts`` under ``split: last_per_user`` (the default) used to fall back
    to a random row split, putting users' later rows (whose histories hold the test
    targets) into training. It is an error naming the fix; ``split: random`` shuffles."""
    from ctr.spec import DataSpec

    frame = pd.DataFrame([{"user_id": u, "label": 1.0} for u in ("a", "b") for _ in range(5)])
    for split in ("last_per_user", "time"):
        with pytest.raises(DataError, match="no time column"):
            split_frame(frame, DataSpec(source="csv", split=split, time_column="ts"))
    tr, va, te = split_frame(frame, DataSpec(split="random", test_fraction=0.2))
    assert (len(tr), len(va), len(te)) == (7, 1, 2)


@pytest.mark.parametrize("source", ["amazon", "movielens", "synthetic"])
def test_a_time_split_on_an_adapters_positions_is_refused(source: str) -> None:
    """The adapters' ``ts`` is an example's position in its user's sequence: a cut at its
    quantiles put the heavy users' late examples in test, every one older (MovieLens'
    real times) than training's newest (data review s42). Training refuses it, naming
    what to use; MovieLens' own times cut, as does any source's named time column. A
    bundle whose manifest records such a split (trained before) still loads: serving
    splits nothing (diff review s42)."""
    from ctr.spec import DataSpec
    from training.dataset import prepare

    config = load_config(CONFIGS / "synthetic_din.yaml", {"data.options.n_users": 50})
    frame = load_frame(config)
    spec = DataSpec(source=source, split="time")  # as a manifest's config is read
    with pytest.raises(DataError, match="position in its user's sequence") as err:
        split_frame(frame, spec)
    assert "last_per_user" in str(err.value)
    assert ("time_column: timestamp" in str(err.value)) == (source == "movielens")
    timed_rows = frame.assign(ts=np.arange(len(frame)), timestamp=np.arange(len(frame)))
    split_frame(timed_rows, DataSpec(source="csv", split="time"))  # a file's own times
    if source == "synthetic":
        timed = config.model_copy(update={"data": spec})
        with pytest.raises(DataError, match="not a time"):
            prepare(timed)
    if source == "movielens":
        split_frame(timed_rows, DataSpec(source=source, split="time", time_column="timestamp"))
    # ctr load --bundle re-makes such a bundle's split to check its data (diff review s42)
    from ctr.cmd_train import check_trained_on
    from training.data.generic import fingerprint

    train_part, _, _ = split_frame(timed_rows, spec, trained=True)
    manifest = {"data_fingerprint": fingerprint(train_part), "data_split_seed": 0}
    check_trained_on(config.model_copy(update={"data": spec}), timed_rows, manifest, "b")


def test_time_split_that_leaves_a_part_empty_is_an_error() -> None:
    """Quantile cuts on few distinct times (ties stay together) can leave test empty."""
    from ctr.spec import DataSpec

    rows = [{"user_id": u, "ts": t, "label": 1.0} for u in range(100) for t in range(8)]
    few = pd.DataFrame(rows)
    with pytest.raises(DataError, match="leaves test empty"):
        split_frame(few, DataSpec(source="csv", split="time", time_column="ts"))
    many = few.assign(ts=np.arange(len(few)))
    tr, va, te = split_frame(many, DataSpec(source="csv", split="time", time_column="ts"))
    assert (len(tr), len(va), len(te)) == (640, 80, 80)
    assert tr.ts.max() < va.ts.min() and va.ts.max() < te.ts.min()


# ---- ctr load agrees with training ---------------------------------------------------


def _loader_config(path: Path, max_seq_len: int) -> FeatureConfig:
    raw: dict[str, Any] = {
        "name": "csv_loader",
        "max_seq_len": max_seq_len,
        "features": [
            {"name": "user_id", "kind": "sparse", "side": "user"},
            {"name": "item_id", "kind": "sparse", "side": "item"},
            {"name": "price", "kind": "dense", "side": "item", "default": 3.0, "log1p": True},
            {"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id"},
        ],
        "data": {"source": "csv", "path": str(path), "test_steps": 1, "val_steps": 1},
    }
    return FeatureConfig.model_validate(raw)


def _clicks_csv(path: Path, prices: list[str] | None = None) -> None:
    """User u1 clicks i0..i11 at times 0..11, each row's history the clicks before it."""
    items = [f"i{t}" for t in range(12)]
    rows = {
        "user_id": ["u1"] * 12,
        "item_id": items,
        "price": prices or ["1.5"] * 12,
        "hist_item_id": ["|".join(items[:t]) for t in range(12)],
        "label": ["1"] * 12,
        "ts": [str(t) for t in range(12)],
    }
    pd.DataFrame(rows).to_csv(path, index=False)


def test_loaded_history_is_the_newest_by_numeric_time(tmp_path: Path) -> None:
    """A CSV is read as strings, where "9" sorts after "11": ``ctr load`` took the row
    of time 9 for the newest and stored a shorter, older history than training used.
    It orders time as training's split does: Redis gets the newest ``max_seq_len``
    behaviours, the newest (test) row's history followed by its click."""
    from redis import Redis

    from service.loader import load_into_redis
    from service.store import event_keys, user_key
    from tests.helpers import REDIS_URL

    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    config = _loader_config(path, max_seq_len=5)
    frame = load_frame(config)
    assert frame["ts"].tolist() == [str(t) for t in range(12)]  # strings, as read
    _, _, test = split_frame(frame, config.data)
    assert test["ts"].tolist() == ["11"]  # training's newest row
    newest = test.iloc[0]
    want = (newest["hist_item_id"].split("|") + [newest["item_id"]])[-5:]
    assert want == ["i7", "i8", "i9", "i10", "i11"]

    client = Redis.from_url(REDIS_URL, decode_responses=True)
    client.delete(user_key("u1", "seq"), user_key("u1", "profile"))
    # an event ID remembered for the list the load replaces: forgotten with it (a retry
    # of that event would otherwise answer `duplicate` and never be stored)
    # (and those of the key earlier versions kept them in)
    ids_keys = event_keys("u1")[1:]
    for key in ids_keys:
        client.zadd(key, {"e-before-the-load": 1})
    load_into_redis(config, frame, REDIS_URL, progress=False)
    stored = [json.loads(e)["item_id"] for e in client.lrange(user_key("u1", "seq"), 0, -1)]
    forgotten = client.exists(*ids_keys) == 0
    client.delete(user_key("u1", "seq"), user_key("u1", "profile"), *ids_keys)
    assert stored == want and forgotten
    # the history a request then feeds is the test row's, one step on
    mapper, enc = _fit_and_encode(config, frame, test)
    hist = enc.hist[0, 0, : enc.hist_len[0]].tolist()
    item_of = mapper.mapper_for("hist_item_id")
    assert hist[1:] == [item_of.map_one(i) for i in stored[:-1]]


def test_loaded_dense_item_features_read_as_training_reads_them(tmp_path: Path) -> None:
    """An empty dense cell (a CSV is read with ``keep_default_na=False``) or a non-number
    made ``ctr load`` fail on ``float("")``. Training reads such a cell as the feature's
    default; the loader stores nothing for it, which serving reads as the default too."""
    from ctr.encode import to_float
    from service.loader import item_records

    path = tmp_path / "clicks.csv"
    prices = ["1.5", "", "NA", "nan", "inf", "2"] + ["0.5"] * 6
    _clicks_csv(path, prices)
    config = _loader_config(path, max_seq_len=5)
    frame = load_frame(config)
    assert frame["price"].tolist()[:3] == ["1.5", "", "NA"]
    stored = item_records(config, frame)["price"]
    assert set(stored) == {"i0", "i5"} | {f"i{t}" for t in range(6, 12)}
    spec = config.feature("price")
    _, enc = _fit_and_encode(config, frame, frame)
    served = [to_float(stored.get(f"i{t}"), spec) for t in range(12)]  # missing: None
    assert served == pytest.approx(enc.item_dense[:, 0].tolist())
    assert served[1] == pytest.approx(np.log1p(3.0))  # the default, as training has it


def _edit_clicks(path: Path, **columns: list[str]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)


def test_own_csv_files_pandas_writes_load_or_name_their_row(tmp_path: Path) -> None:
    """What a pandas user writes to a CSV: a bool label (``True``/``False``) trains as
    1/0, as bool IDs do; a list column written as text, a row without its user and a
    file that is not UTF-8 are one-line errors naming the column, row or file (they
    trained as one junk token per history, or failed in pandas naming nothing)."""
    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    config = _loader_config(path, max_seq_len=5)
    _edit_clicks(path, label=["True", "False"] * 6)
    assert load_frame(config)["label"].tolist() == [1.0, 0.0] * 6
    _clicks_csv(path)
    _edit_clicks(path, hist_item_id=[str(["i0", "i1"])] * 12)  # "['i0', 'i1']"
    with pytest.raises(DataError, match=r"history column 'hist_item_id' holds a list .*row 0"):
        load_frame(config)
    # a token that is only bracketed is a token: [UNK], [a]|[b]
    _clicks_csv(path)
    _edit_clicks(path, hist_item_id=["[UNK]", "[a]|[b]"] + ["i0|i1"] * 10)
    assert load_frame(config)["hist_item_id"].tolist()[:2] == ["[UNK]", "[a]|[b]"]
    _clicks_csv(path)
    _edit_clicks(path, user_id=["u1"] * 5 + [""] + ["u1"] * 6)
    with pytest.raises(DataError, match=r"1 rows have no 'user_id' .*row 5"):
        load_frame(config)
    _clicks_csv(path)
    _edit_clicks(path, label=["1"] * 3 + ["2"] + ["1"] * 8)
    with pytest.raises(DataError, match=r"must be 0/1 \(1 rows are not; first: row 3"):
        load_frame(config)
    _clicks_csv(path)
    path.write_bytes(path.read_bytes().replace(b"i11", b"caf\xe9"))  # latin-1
    with pytest.raises(DataError, match=r"clicks.csv is not UTF-8 text"):
        load_frame(config)


@pytest.mark.parametrize("other", [",", ";", " "])
def test_a_history_joined_by_another_delimiter_is_a_data_error(tmp_path: Path, other: str) -> None:
    """A history joined by ``,`` where the config says ``|`` trained silently as one
    token per row, none of them an item. It is refused, naming the delimiter it looks
    joined by; an item ID that itself holds that character is not refused."""
    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    items = [f"i{t}" for t in range(12)]
    _edit_clicks(path, hist_item_id=[other.join(items[:t]) for t in range(12)])
    config = _loader_config(path, max_seq_len=5)
    with pytest.raises(DataError, match=rf"'hist_item_id' looks joined by '{re.escape(other)}'"):
        load_frame(config)
    # one-behaviour histories hold no delimiter at all: nothing to tell, accepted
    _edit_clicks(path, hist_item_id=[""] + items[:11])
    assert load_frame(config)["hist_item_id"].tolist()[1] == "i0"
    # IDs holding the character, each history one of them: whole cells are items
    named = [f"a{other}{t}" for t in range(12)]
    _edit_clicks(path, item_id=named, hist_item_id=[""] + named[:11])
    assert load_frame(config)["hist_item_id"].tolist()[2] == named[1]


def test_loaded_item_features_are_the_newest_rows(tmp_path: Path) -> None:
    """``ctr load`` stored an item's features from its last row in file order: a log
    not sorted by time served an older price. The newest row by the time column wins,
    and among histories, the newest row's."""
    from service.loader import item_records

    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    # i3 is seen again at the newest time (11) with another price, in the file's first row
    later = [str(t) for t in range(1, 12)]
    _edit_clicks(path, item_id=["i3"] + [f"i{t}" for t in range(1, 12)],
                 price=["9"] + ["1.5"] * 11, ts=["11", *later])  # fmt: skip
    config = _loader_config(path, max_seq_len=5)
    assert item_records(config, load_frame(config))["price"]["i3"] == "9.0"


@pytest.mark.parametrize("value", ["19,74", "$5", "abc"])
def test_a_dense_value_that_is_not_a_number_is_a_data_error(tmp_path: Path, value: str) -> None:
    """A decimal comma or a unit trained silently as the feature's default (a constant
    where the whole column was written so); a blank or a missing marker still is one."""
    path = tmp_path / "clicks.csv"
    _clicks_csv(path, ["1.5", "", "null", value] + ["0.5"] * 8)
    with pytest.raises(DataError, match=rf"dense feature 'price': 1 values.*'{re.escape(value)}'"):
        load_frame(_loader_config(path, max_seq_len=5))


@pytest.mark.parametrize("kind", ["timestamp", "timestamp_tz", "duration", "period"])
def test_a_parquet_time_column_as_a_dense_feature_is_a_data_error(
    tmp_path: Path, kind: str
) -> None:
    """A Parquet timestamp or duration column passed the dense check (pandas reads it as
    integers) and trained as the feature's default on every row (``float`` refuses a
    Timestamp): a constant, silently. The same values as CSV text were refused."""
    csv = tmp_path / "clicks.csv"
    _clicks_csv(csv)
    frame = pd.read_csv(csv, dtype=str)
    seconds = pd.Series(np.arange(len(frame)) * 86_400)
    frame["price"] = {
        "timestamp": pd.to_datetime(seconds, unit="s"),
        "timestamp_tz": pd.to_datetime(seconds, unit="s", utc=True),
        "duration": pd.to_timedelta(seconds, unit="s"),
        "period": pd.to_datetime(seconds, unit="s").dt.to_period("D"),
    }[kind]
    path = tmp_path / "clicks.parquet"
    frame.to_parquet(path)
    config = _loader_config(path, max_seq_len=5)
    config.data.source = "parquet"
    with pytest.raises(DataError, match=r"'price' holds .*(datetime|timedelta|period)"):
        load_frame(config)
    frame["price"] = seconds.astype(float)  # as numbers: trained on
    frame.to_parquet(path)
    assert load_frame(config)["price"].max() == 86_400 * 11


@pytest.mark.parametrize(
    ("behaviours", "label", "appended"),
    [
        (None, "0", False), ("positive", "0", False), ("all", "0", True),
        (None, "1", True), ("none", "1", False),  # a click, but not a behaviour here
    ],
)  # fmt: skip
def test_loaded_history_appends_the_newest_behaviours_the_data_has(
    tmp_path: Path, behaviours: str | None, label: str, appended: bool
) -> None:
    """The newest example's candidate follows its history. Whether it is a behaviour
    depends on the data: a sampled negative (Amazon) is not, a low rating (MovieLens,
    whose histories hold every rated movie) is, and no candidate of the synthetic
    generator is. ``label``: the newest example's."""
    from service.loader import user_records

    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    frame = pd.read_csv(path, dtype=str)
    frame.loc[frame["ts"] == "11", "label"] = label
    path.write_text(frame.to_csv(index=False))
    config = _loader_config(path, max_seq_len=20)
    if behaviours is not None:
        config.data.behaviour_labels = behaviours  # type: ignore[assignment]
    [(user, _, events)] = list(user_records(config, load_frame(config)))
    items = [e["item_id"] for e in events]
    assert user == "u1"
    assert items == [f"i{t}" for t in range(12 if appended else 11)]


def test_movielens_candidates_are_behaviours_by_default() -> None:
    from ctr.spec import DataSpec

    assert DataSpec(source="movielens").behaviours == "all"
    assert DataSpec(source="amazon").behaviours == "positive"
    assert DataSpec(source="movielens", behaviour_labels="positive").behaviours == "positive"
    # the generator draws candidates apart from the histories: none is a behaviour
    assert DataSpec(source="synthetic").behaviours == "none"


def test_a_synthetic_users_stored_history_is_its_newest_examples() -> None:
    """``ctr load`` stores, for the synthetic data, the newest example's history as it
    is, with no candidate appended: training never saw a clicked candidate followed by
    the history it was drawn apart from."""
    from service.loader import user_records
    from tests.helpers import small_config

    config = small_config("din")
    frame = load_frame(config)
    newest = frame.sort_values("ts", kind="stable").groupby("user_id").tail(1)
    want = {r.user_id: list(r.hist_item_id)[-config.max_seq_len :] for r in newest.itertuples()}
    got = {u: [e["item_id"] for e in ev] for u, _, ev in user_records(config, frame)}
    assert got == want


@pytest.mark.parametrize(
    ("seq", "tied_from", "max_seq_len"),
    [
        ("abcde", 2, 10),  # a, b at times 0, 1; c, d, e at time 2
        ("abcde", 2, 3),  # the histories cut to one length
        ("abcdef", 2, 2),  # more rows at that time than L + 1
        ("XBAB", 2, 10),  # B again among them
        ("XAA", 2, 10),  # the newest a repeat of the one before
        ("XAABA", 1, 10),
        ("AAAA", 2, 10),  # these five: file order decided (diff review s42)
        ("BAABA", 2, 10),
        ("ABA", 0, 1),
        ("XABA", 1, 1),
        ("XABAB", 1, 2),
        ("BABBC", 2, 1),  # a row to go first that only the rest of the path tells
    ],
)
def test_a_loaded_history_with_rows_sharing_the_newest_time_ignores_their_file_order(
    seq: str, tied_from: int, max_seq_len: int
) -> None:
    """Rows at a user's newest time were taken in some order (MovieLens: movies rated in
    the same second); each one's history holds those before it. Whatever order the file
    lists them in, ``ctr load`` stores the user's true sequence's newest behaviours,
    each once, as training's rows saw them: taking the first row's history and
    appending every candidate stored a movie twice and dropped the oldest where a later
    row came first (review s42: 415 MovieLens users with the rows reversed); a count of
    the tied candidates each history ends with dropped an item consumed again and
    misordered ties longer than L + 1 (diff review s42). A sampled negative (label 0
    under ``positive``) is no behaviour."""
    import itertools

    from service.loader import user_records

    rows = [
        {"item_id": x, "hist_item_id": "|".join(seq[:t][-max_seq_len:]), "label": 1.0,
         "ts": str(min(t, tied_from))}  # fmt: skip
        for t, x in enumerate(seq)
    ]
    negative = {**rows[tied_from], "item_id": "n", "label": 0.0}  # a sampled negative
    for behaviours, extra in (("all", []), ("positive", [negative])):
        config = _loader_config(Path("unused.csv"), max_seq_len=max_seq_len)
        config.data.behaviour_labels = behaviours  # type: ignore[assignment]
        older = rows[:tied_from]  # their order: by time
        for newest in itertools.permutations(rows[tied_from:] + extra):
            frame = pd.DataFrame(
                [{"user_id": "u1", "price": "1.5", **r} for r in [*newest, *older]]
            )
            [(_, _, events)] = list(user_records(config, frame))
            items = "".join(e["item_id"] for e in events)  # the true sequence's newest
            assert items == seq[len(seq) - len(items) :], newest
            assert len(items) >= min(len(seq), max_seq_len + 1), newest  # what L + 1 keeps


def test_tied_rows_of_repeated_items_are_put_in_their_order_wherever_it_is_told() -> None:
    """Random short sequences over 1 to 3 items, cut to 1, 2, 3 or 10, ties from a
    random row on, rows shuffled: wherever the histories tell one order (every order of
    the tied rows in which each row's history is the one before's history and
    candidate, cut to its length, stores the same newest L + 1), ``ctr load`` stores
    the true sequence's newest L + 1. Where they tell several, none can be told."""
    import itertools
    import random

    from service.loader import user_records

    rng = random.Random(42)
    checked = 0
    for _ in range(400):
        seq = "".join(rng.choice("ABC"[: rng.randint(1, 3)]) for _ in range(rng.randint(1, 7)))
        cut, tied_from = rng.choice([1, 2, 3, 10]), rng.randrange(len(seq))
        rows = [{"item_id": x, "hist_item_id": "|".join(seq[:t][-cut:]),
                 "ts": str(min(t, tied_from))} for t, x in enumerate(seq)]  # fmt: skip
        tied = rows[tied_from:]
        hist = [tuple(r["hist_item_id"].split("|")) if r["hist_item_id"] else () for r in tied]
        told = set()
        for order in itertools.permutations(range(len(tied))):
            if all(len(hist[j]) in (len(hist[i]), len(hist[i]) + 1)
                   and hist[j] == (*hist[i], tied[i]["item_id"])[len(hist[i]) + 1 - len(hist[j]):]
                   for i, j in itertools.pairwise(order)):  # fmt: skip
                whole = "".join(hist[order[0]]) + "".join(tied[i]["item_id"] for i in order)
                told.add(whole[-cut - 1 :])
        if len(told) != 1:
            continue
        checked += 1
        rng.shuffle(tied)
        config = _loader_config(Path("unused.csv"), max_seq_len=cut)
        config.data.behaviour_labels = "all"  # type: ignore[assignment]
        frame = pd.DataFrame([{"user_id": "u1", "price": "1.5", "label": 1.0, **r}
                              for r in [*tied, *rows[:tied_from]]])  # fmt: skip
        [(_, _, events)] = list(user_records(config, frame))
        items = "".join(e["item_id"] for e in events)
        assert items[-cut - 1 :] == seq[-cut - 1 :], (seq, cut, tied_from, items)
    assert checked > 300


@pytest.mark.parametrize("seq", ["CCCBDBABBBA", "CDBCCDDBCBBABA"])
def test_many_tied_rows_cut_short_are_put_in_order_past_a_bounded_search(seq: str) -> None:
    """Every row at one time, histories cut to 1, items repeating: an order of the rows
    is an Euler trail through the histories, which a depth-first search within its
    step budget missed in 129 of 200 shuffles (diff review s42); the trail is found
    in linear time, and every shuffle stores the true newest two."""
    import random

    from service.loader import user_records

    config = _loader_config(Path("unused.csv"), max_seq_len=1)
    config.data.behaviour_labels = "all"  # type: ignore[assignment]
    rows = [{"user_id": "u1", "price": "1.5", "label": 1.0, "ts": "1", "item_id": x,
             "hist_item_id": seq[t - 1] if t else ""} for t, x in enumerate(seq)]  # fmt: skip
    rng = random.Random(0)
    for _ in range(50):
        rng.shuffle(rows)
        [(_, _, events)] = list(user_records(config, pd.DataFrame(rows)))
        assert "".join(e["item_id"] for e in events)[-2:] == seq[-2:]


def test_a_tied_item_is_known_by_its_id_where_its_category_differs() -> None:
    """With two sequences (item, category), an item re-categorised (its candidate row's
    category is not the one its history entry carries; ``item_key_tolerance`` allows a
    few) is still the same behaviour: stored once, in order, whatever the rows' order."""
    import itertools

    from service.loader import user_records

    config = _csv_config(Path("unused.csv"), "|")  # item and category histories
    config.data.behaviour_labels = "all"  # type: ignore[assignment]
    rows = [  # A's row says category y, the histories after it x
        {"item_id": "X", "cate_id": "x", "hist_item_id": "", "hist_cate_id": "", "ts": "0"},
        {"item_id": "A", "cate_id": "y", "hist_item_id": "X", "hist_cate_id": "x", "ts": "1"},
        {"item_id": "B", "cate_id": "x", "hist_item_id": "X|A", "hist_cate_id": "x|x",
         "ts": "1"},  # fmt: skip
    ]
    for order in itertools.permutations(rows):
        frame = pd.DataFrame([{"user_id": "u1", "label": 1.0, "price": 1.0, **r} for r in order])
        [(_, _, events)] = list(user_records(config, frame))
        assert [e["item_id"] for e in events] == ["X", "A", "B"], order


@pytest.mark.parametrize("labels", ["all", "positive"])
def test_a_replay_load_stores_the_history_of_the_first_of_rows_sharing_a_time(
    labels: str,
) -> None:
    """``ctr load --replay-split`` (``as_of_first``): where rows share the user's first
    time (movies rated in the same second), the stored history is the one of the row
    their histories put first, whatever the file order: the history of a later one
    holds the candidates before it, behaviours the replay has yet to score (a replay
    review, session 47: MovieLens on ``timestamp`` with each second's rows reversed,
    472 of 943 users stored one). Negatives share their positive's history."""
    import itertools

    from service.loader import user_records

    config = _csv_config(Path("unused.csv"), "|")
    config.data.behaviour_labels = labels  # type: ignore[assignment]
    rows = [
        {"item_id": "A", "cate_id": "x", "hist_item_id": "X", "hist_cate_id": "x", "label": 1.0},
        {"item_id": "B", "cate_id": "x", "hist_item_id": "X|A", "hist_cate_id": "x|x",
         "label": 1.0},  # fmt: skip
        {"item_id": "C", "cate_id": "x", "hist_item_id": "X|A|B", "hist_cate_id": "x|x|x",
         "label": 1.0},  # fmt: skip
    ]
    if labels == "positive":  # each positive's sampled negative, sharing its history
        rows += [{**r, "item_id": r["item_id"].lower(), "label": 0.0} for r in rows]
    for order in itertools.permutations(rows):
        frame = pd.DataFrame([{"user_id": "u1", "price": 1.0, "ts": "5", **r} for r in order])
        [(_, _, events)] = list(user_records(config, frame, as_of_first=True))
        assert [e["item_id"] for e in events] == ["X"], order


@pytest.mark.data
def test_movielens_loaded_histories_in_any_row_order(
    movielens: tuple[FeatureConfig, pd.DataFrame],
) -> None:
    """The stored history of every MovieLens user is its last ``max_seq_len`` + 1 rated
    movies in u.data's order (time, then movie), the adapter's rows in their own order,
    reversed or shuffled (a log need not be in time order)."""
    from service.loader import user_records
    from training.data.movielens import dataset_dir, read_ratings

    config, frame = movielens
    config = config.model_copy(deep=True)
    config.data.time_column = "timestamp"
    ratings = read_ratings(dataset_dir(config))
    full = {str(u): [str(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
    keep = config.max_seq_len + 1
    for order in (frame, frame.iloc[::-1], frame.sample(frac=1.0, random_state=0)):
        stored = {u: [e["item_id"] for e in ev] for u, _, ev in user_records(config, order)}
        assert len(stored) == frame["user_id"].nunique()
        wrong = [u for u, items in stored.items() if items[-keep:] != full[u][-keep:]]
        assert not wrong, wrong[:5]


def test_loaded_history_with_blank_or_non_numeric_times() -> None:
    """A blank time counts as the oldest, and a time column with no number at all (ISO
    dates, which a random split never reads) keeps its own order: ``ctr load`` neither
    crashes nor takes an older row for the newest."""
    from service.loader import user_records

    config = _loader_config(Path("unused.csv"), max_seq_len=10)
    items = [f"i{t}" for t in range(3)]
    # in both, the newest row is the second: its history a|b, then its click i1
    for times in (["1", "2", ""], ["2024-01-01", "2024-01-03", "2024-01-02"]):
        frame = pd.DataFrame(
            {
                "user_id": ["u1"] * 3,
                "item_id": items,
                "price": ["1.5"] * 3,
                "hist_item_id": ["a", "a|b", "a|b|c"],
                "label": [1.0] * 3,
                "ts": times,
            }
        )
        [(_, _, events)] = list(user_records(config, frame))
        assert [e["item_id"] for e in events] == ["a", "b", "i1"], times


def _flat_config(*features: dict[str, Any]) -> FeatureConfig:
    """A config without histories: user_id, item_id and ``features``."""
    ids = [{"name": "user_id", "kind": "sparse", "side": "user"},
           {"name": "item_id", "kind": "sparse", "side": "item"}]  # fmt: skip
    raw = {"name": "flat", "features": [*ids, *features],
           "data": {"source": "csv", "path": "unused.csv"}}  # fmt: skip
    return FeatureConfig.model_validate(raw)


@pytest.mark.parametrize("weights", [["30", "0", "7.5"], [30.0, 0.0, 7.5]], ids=["csv", "float"])
def test_a_column_read_as_a_category_and_a_number_is_stored_as_its_token(
    weights: list[Any],
) -> None:
    """An item column read both as a dense feature and as a sparse one (``column:``):
    ``ctr load`` stored the dense text (30.0), which the category's vocabulary (30) does
    not hold, so a candidate named by ID alone scored that view as OOV, up to 3e-3 off
    its offline score (config review s42). The stored value is the category's token,
    which the dense view parses to the number training read."""
    from ctr.encode import parse_dense
    from service.loader import item_records

    config = _flat_config(
        {"name": "weight", "kind": "dense", "side": "item"},
        {"name": "weight_cat", "column": "weight", "kind": "sparse", "side": "item"},
    )
    frame = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"],
                          "weight": weights, "label": [1.0, 0.0, 1.0]})  # fmt: skip
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, frame, "|"))
    stored = item_records(config, frame)["weight"]
    assert stored == {"i1": "30", "i2": "0", "i3": "7.5"}
    assert OOV not in mapper.mapper_for("weight_cat").map_many(stored.values())
    assert [parse_dense(stored[i]) for i in ("i1", "i2", "i3")] == [30.0, 0.0, 7.5]


def test_a_stored_profile_keeps_an_int64_id_past_2_53_in_a_numeric_frame() -> None:
    """A frame of numeric columns alone (hashed int64 IDs, a price; no history): its
    newest row, taken as a row, was a float64 Series, so ``ctr load`` stored
    4611686018427387904 for the profile's 4611686018427387905, an ID training never saw
    (formats review s42: served != offline on 58 of 59 candidates)."""
    from service.loader import user_records

    config = _flat_config(
        {"name": "device_id", "kind": "sparse", "side": "user"},
        {"name": "price", "kind": "dense", "side": "item"},
    )
    device = 2**62 + 1
    frame = pd.DataFrame({"user_id": np.array([7, 7], dtype=np.int64),
                          "device_id": np.array([5, device], dtype=np.int64),
                          "item_id": np.array([1, 2], dtype=np.int64), "price": [1.5, 2.5],
                          "label": [1.0, 0.0], "ts": np.array([1, 2], dtype=np.int64)})  # fmt: skip
    [(user, profile, events)] = list(user_records(config, frame))
    assert (user, profile, events) == ("7", {"device_id": str(device)}, [])


@pytest.mark.parametrize(
    ("column", "cells", "says"),
    [
        ("item_id", [np.array(["i0"]), np.array(["i1"])], "column 'item_id' holds lists"),
        ("item_id", [{"a": "i0"}, {"a": "i1"}], "column 'item_id' holds lists, structs"),
        ("user_id", [["u0"], ["u1"]], "column 'user_id' holds lists"),
        ("hist_item_id", [[np.array(["i0"])], []], "'hist_item_id' holds lists of lists"),
    ],
    ids=["list-item", "struct-item", "list-user", "nested-history"],
)
def test_a_parquet_list_struct_or_map_where_one_value_belongs_is_refused(
    column: str, cells: list[Any], says: str
) -> None:
    """A Parquet list, struct or map column read as an ID trained silently on the text
    of each cell (``['i0']``), which no request names, and a list of lists in a history
    failed with a TypeError's traceback (formats review s42): one line naming the
    column and its first row."""
    from training.data.generic import validate_frame

    config = _loader_config(Path("unused.csv"), max_seq_len=5)
    frame = pd.DataFrame({"user_id": ["u0", "u1"], "item_id": ["i0", "i1"],
                          "price": [1.0, 2.0], "hist_item_id": [["i9"], []],
                          "label": [1.0, 0.0], "ts": [1, 2]})  # fmt: skip
    validate_frame(config, frame)  # as it is: fine
    frame[column] = pd.Series(cells, dtype=object)
    with pytest.raises(DataError, match=re.escape(says) + ".*row 0"):
        validate_frame(config, frame)


def test_item_features_are_loaded_for_a_model_without_histories() -> None:
    """A DeepFM with no sequence feature still reads its candidates' item features from
    Redis when a request sends IDs only: ``ctr load`` stored none for it (every such
    candidate scored with an out-of-vocabulary category and the default price)."""
    from service.loader import item_records
    from tests.helpers import small_config

    base = small_config("deepfm").model_dump()
    base["features"] = [f for f in base["features"] if f["kind"] != "sequence"]
    base["groups"] = [g for g in base["groups"] if g["type"] != "sequence"]
    config = FeatureConfig.model_validate(base)
    assert not config.sequences
    frame = load_frame(config)
    stored = item_records(config, frame)
    assert set(stored) == {"cate_id", "item_price"}
    pairs = set(zip(frame["item_id"], frame["cate_id"], strict=True))
    assert set(stored["cate_id"].items()) == pairs and len(pairs) == frame["item_id"].nunique()
    assert len(stored["item_price"]) == len(pairs)


def test_a_time_split_refuses_rows_without_a_time() -> None:
    """A time cut would leave them in no part, silently (a ``last_per_user`` split failed
    with a pandas cast error): both name the column and the count."""
    from tests.helpers import small_config

    config = small_config("din")
    frame = load_frame(config)
    frame.loc[frame.index[:7], "ts"] = np.nan
    for split in ("time", "last_per_user"):
        spec = config.data.model_copy(update={"split": split})
        with pytest.raises(DataError, match=f"7 of {len(frame)} rows have no 'ts'"):
            split_frame(frame, spec)


def test_an_item_key_that_is_not_the_items_id_is_refused() -> None:
    """A config whose item key is the category (Alimama without ``item_key``): training
    and ``ctr load`` refuse it, naming the feature, before anything is written; a key
    that identifies items, or a rare conflict (an item re-categorised), passes."""
    from ctr.encode import check_item_key
    from service.loader import load_into_redis
    from tests.helpers import REDIS_URL, fresh_redis, small_config
    from training.dataset import prepare

    good = small_config("din")
    config = FeatureConfig.model_validate({**good.model_dump(), "item_key": "cate_id"})
    frame = load_frame(config)
    with pytest.raises(ValueError, match=r"item key 'cate_id' does not identify an item: \d+ "
                       r"of its \d+ values carry more than one item_id"):  # fmt: skip
        prepare(config, frame)
    client = fresh_redis()
    with pytest.raises(ValueError, match="item key 'cate_id' does not identify an item"):
        load_into_redis(config, frame, REDIS_URL, progress=False)
    assert client.dbsize() == 0
    lenient = {**config.model_dump(), "data": {**config.data.model_dump(), "item_key_tolerance": 1}}
    check_item_key(FeatureConfig.model_validate(lenient), frame)  # the check turned off
    check_item_key(good, frame)  # item_id: one category per item
    items = [f"i{k}" for k in range(200)]
    cats = [f"c{k % 7}" for k in range(200)]
    check_item_key(good, {"item_id": [*items, "i0"], "cate_id": [*cats, "c6"]})  # 1 of 200
    with pytest.raises(ValueError, match="3 of its 200 values carry more than one cate_id"):
        check_item_key(good, {"item_id": [*items, "i0", "i1", "i2"],
                              "cate_id": [*cats, "c6", "c6", "c6"]})  # fmt: skip
    # (nearly) every value carries two: no tolerance under 1 passes (it said "above 1.000")
    with pytest.raises(ValueError, match="data.item_key_tolerance: 1 turns the check off"):
        check_item_key(good, {"item_id": ["i0", "i0", "i1", "i1"],
                              "cate_id": ["c0", "c1", "c0", "c1"]})  # fmt: skip
    many = [f"i{k}" for k in range(3000)]
    with pytest.raises(ValueError, match="data.item_key_tolerance: 1 turns the check off"):
        check_item_key(good, {"item_id": [*many, *many[1:]],
                              "cate_id": ["a"] * 3000 + ["b"] * 2999})  # fmt: skip


def test_a_missing_value_is_no_second_value_for_the_item_key() -> None:
    """An item whose category is missing on some rows (None, NaN, "") still has one
    category: only values present count towards the item key's check, so such data
    trains (a missing value is OOV, not another category)."""
    from ctr.encode import check_item_key
    from tests.helpers import small_config

    good = small_config("din")
    items = [f"i{k}" for k in range(200)]
    cats = [f"c{k % 7}" for k in range(200)]
    missing: list[object] = [None, float("nan"), ""] * 10
    check_item_key(good, {"item_id": [*items, *items[:30]], "cate_id": [*cats, *missing]})
    # an ID that is missing names no item: its rows' categories are no conflict either
    # (with 50 items, one key of two categories would be past the 1% tolerance)
    check_item_key(good, {"item_id": [*items[:50], None, float("nan"), ""],
                          "cate_id": [*cats[:50], "c1", "c2", "c3"]})  # fmt: skip


@pytest.mark.data
def test_movielens_load_stores_every_movies_genre() -> None:
    """Movies no example holds (the config keeps each user's last 40 examples) get their
    genre from ``u.item`` too (a candidate named by ID alone scored with an unknown
    genre); for the others it is the examples' genre."""
    from service.loader import item_records
    from training.data import load_catalog
    from training.data.movielens import dataset_dir, read_genres

    _folder("movielens-100k")
    config = load_config(CONFIGS / "movielens_din.yaml")
    frame = load_frame(config)
    from_examples = item_records(config, frame)["cate_id"]
    stored = item_records(config, frame, load_catalog(config))["cate_id"]
    genres = read_genres(dataset_dir(config))
    assert len(stored) == len(genres) > len(from_examples)
    assert stored == {str(m): g for m, g in genres.items()}
    assert all(stored[i] == g for i, g in from_examples.items())


def test_a_loads_identity_is_its_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ctr load --once`` compares what a load writes: the data source and options,
    the features, the behaviours kept and CTR_DATA_ROOT; a retrain's settings (epochs,
    model) are not in it. A load that fails halfway leaves no record of the last
    complete one, so a `--once` of that data loads again over the half."""
    import service.loader as loader
    from ctr.spec import apply_overrides
    from service.loader import LOADED_KEY, load_identity, load_into_redis
    from tests.helpers import REDIS_URL, fresh_redis, small_config

    def variant(**overrides: Any) -> FeatureConfig:
        raw = apply_overrides(small_config("din").model_dump(mode="json"), overrides)
        return FeatureConfig.model_validate(raw)

    base = load_identity(small_config("din"))
    assert base == load_identity(small_config("din"))  # stable
    assert load_identity(variant(**{"train.epochs": 7, "model.dropout": 0.3})) == base
    assert load_identity(variant(**{"data.options.n_users": 301})) != base
    assert load_identity(small_config("din"), keep=7) != base
    monkeypatch.setenv("CTR_DATA_ROOT", "/somewhere/else")
    assert load_identity(small_config("din")) != base
    monkeypatch.delenv("CTR_DATA_ROOT")

    config = small_config("din", n_users=20)
    frame = load_frame(config)
    client = fresh_redis()
    load_into_redis(config, frame, REDIS_URL, progress=False)
    assert client.get(LOADED_KEY) == load_identity(config)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the item table could not be read")

    monkeypatch.setattr(loader, "item_records", broken)
    with pytest.raises(RuntimeError, match="item table"):
        load_into_redis(config, frame, REDIS_URL, progress=False)
    assert client.get(LOADED_KEY) is None
    client.flushdb()


@pytest.mark.parametrize("split", ["last_per_user", "time"])
def test_a_datetime_time_column_with_nat_is_an_error(split: str) -> None:
    """NaT in a datetime column (a Parquet file's) is a missing time, never the oldest
    row; datetimes otherwise order exactly, and text that is no number names the column."""
    from ctr.spec import DataSpec

    ts = pd.to_datetime(["2020-01-01", None, "2020-01-03", "2020-01-04"])
    frame = pd.DataFrame({"user_id": ["a"] * 4, "ts": ts, "label": [0, 1, 0, 1]})
    spec = DataSpec(source="parquet", split=split, test_steps=1, val_steps=1)
    with pytest.raises(DataError, match="1 of 4 rows have no 'ts'"):
        split_frame(frame, spec)
    ok = frame.assign(ts=pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"]))
    train, val, test = split_frame(ok, DataSpec(split="last_per_user"))
    assert list(train.index) == [0, 1] and list(val.index) == [2] and list(test.index) == [3]
    aware = ok.assign(ts=ok["ts"].dt.tz_localize("UTC"))
    parts = split_frame(aware, DataSpec(split="last_per_user"))
    assert [list(p.index) for p in parts] == [[0, 1], [2], [3]]
    text = ok.assign(ts=["2020-01-01", "x", "y", "z"])
    with pytest.raises(DataError, match="numbers, datetimes or ISO 8601 .* row 1 holds 'x'"):
        split_frame(text, spec)
    # a blank of spaces among numbers is a missing time, as "" is (an IndexError)
    spaced = ok.assign(ts=["1", "2", " ", "4"])
    with pytest.raises(DataError, match="1 of 4 rows have no 'ts'"):
        split_frame(spaced, spec)
    # numbers and ISO times mixed: every value parses one way, so it named row 0 as bad
    mixed = ok.assign(ts=["1700000001", "1700000002", "2020-01-03T00:00:00Z", "1700000004"])
    with pytest.raises(DataError, match=r"mixes numbers \(row 0: '1700000001'\) and ISO "
                       r"8601 times \(row 2: '2020-01-03T00:00:00Z'\)"):  # fmt: skip
        split_frame(mixed, spec)
    # ISO 8601 text (what a CSV holds of a datetime column) orders as its times, the
    # zone read; and a Parquet date column
    iso = ok.assign(ts=["2020-01-02T00:00:00+01:00", "2020-01-01T23:30:00Z", "2020-01-03",
                        "2020-01-03T00:00:01"])  # fmt: skip
    assert [list(p.index) for p in split_frame(iso, DataSpec(split="last_per_user"))] == [
        [0, 1], [2], [3]]  # fmt: skip
    import datetime as dt

    dates = ok.assign(ts=[dt.date(2020, 1, d) for d in (1, 2, 3, 4)])
    parts = split_frame(dates, DataSpec(split="last_per_user"))
    assert [list(p.index) for p in parts] == [[0, 1], [2], [3]]


def test_iso_time_text_with_blank_cells_and_text_that_is_not_iso() -> None:
    """A time column of ISO 8601 text may hold blank cells (``""``, spaces): they are
    missing times (NaN), not values that fail the column. Text in another date format
    (``01/02/2024``: the 1st of February or the 2nd of January?) is no ISO 8601 time:
    the column is refused, not read by a guess at its format."""
    from ctr.spec import DataSpec
    from ctr.times import time_numbers

    got = time_numbers(pd.Series(["2024-01-02", "", "  ", "2024-01-01T00:00:00Z"]))
    assert got is not None and got.isna().tolist() == [False, True, True, False]
    assert got[0] > got[3]  # a day later, in the unit pandas chose
    for other in (["01/02/2024", "2024-01-03"], ["Jan 2 2024", "2024-01-03"]):
        assert time_numbers(pd.Series(other)) is None, other
    frame = pd.DataFrame({"user_id": ["a"] * 2, "ts": ["01/02/2024", "2024-01-03"],
                          "label": [0, 1]})  # fmt: skip
    with pytest.raises(DataError, match="ISO 8601 .* row 0 holds '01/02/2024'"):
        split_frame(frame, DataSpec(split="last_per_user"))


# ---- data problems that trained silently (a review of the offline pipeline) ---------


def _listed() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "item_id": ["i9", "i3", "i1", "i2"],
            "cate_id": ["c1", "c2", "c1", "c3"],
            "price": [1.5, 2.0, 0.0, 10.0],
            "hist_item_id": ["i1|i2", "i1|i2|i9", "", "i3"],
            "hist_cate_id": ["c1|c1", "c1|c1|c1", "", "c2"],
            "label": [1, 0, 1, 0],
            "ts": [0, 1, 0, 0],
        }
    )


def test_a_dense_column_missing_from_the_data_is_an_error(tmp_path: Path) -> None:
    """A dense feature's column was left out of the check: misspelt, it trained as its
    default (a constant) and shipped."""
    path = tmp_path / "logs.csv"
    _listed().rename(columns={"price": "prcie"}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"columns missing from the data: \['price'\]"):
        load_frame(_csv_config(path, "|"))


def test_a_label_that_is_not_a_number_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "logs.csv"
    _listed().assign(label=["yes", "no", "yes", "no"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="label column 'label' must hold 0/1 numbers"):
        load_frame(_csv_config(path, "|"))
    # a boolean in any case the common writers use is 1/0, as an ID column's is
    _listed().assign(label=["true", "FALSE", "True", "false"]).to_csv(path, index=False)
    assert load_frame(_csv_config(path, "|"))["label"].tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("fractions", "field"),
    [({"val_fraction": -0.1}, "val_fraction"), ({"test_fraction": -0.1}, "test_fraction"),
     ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be under 1")],  # fmt: skip
)
def test_held_out_fractions_are_bounded(fractions: dict[str, float], field: str) -> None:
    """A negative test_fraction made a random split put every row in training, the test
    rows too."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        load_config(CONFIGS / "alimama_din.yaml", {f"data.{k}": v for k, v in fractions.items()})


def test_a_random_split_does_not_follow_the_model_seed(tmp_path: Path) -> None:
    """Runs of several model seeds are scored on one test set: the split has its own
    seed (``data.split_seed``); it followed ``train.seed``."""
    from training.dataset import prepare

    rows = pd.concat([_listed()] * 25, ignore_index=True)
    rows["user_id"] = [f"u{k}" for k in range(len(rows))]
    rows["label"] = [k % 2 for k in range(len(rows))]
    path = tmp_path / "logs.csv"
    rows.to_csv(path, index=False)
    raw = _csv_config(path, "|").model_dump()
    raw["data"].update(split="random", val_fraction=0.2, test_fraction=0.2)

    def test_users(**over: Any) -> list[str]:
        cfg = FeatureConfig.model_validate(
            {**raw, "train": {**raw["train"], **over.get("train", {})},
             "data": {**raw["data"], **over.get("data", {})}}  # fmt: skip
        )
        return [str(u) for u in prepare(cfg).test.users]

    base = test_users()
    assert test_users(train={"seed": 7}) == base  # another model seed: the same test set
    assert test_users(data={"split_seed": 7}) != base


def test_the_fingerprint_reads_array_cells_in_full() -> None:
    """Parquet list cells arrive as numpy arrays, whose text elides the middle past
    1,000 elements: two different histories had one fingerprint."""
    from training.dataset import fingerprint

    a = np.arange(2000)
    b = a.copy()
    b[1000] = -1
    one = pd.DataFrame({"hist": [a]})
    other = pd.DataFrame({"hist": [b]})
    assert fingerprint(one) != fingerprint(other)
    assert fingerprint(one) == fingerprint(pd.DataFrame({"hist": [a.tolist()]}))


def test_history_item_features_line_up_from_the_newest_end(tmp_path: Path) -> None:
    """A row whose history fields differ in length: training keeps the newest steps of
    each (from the end); ``ctr load``'s item features lined them up from the start and
    gave items another's category."""
    from service.loader import item_records

    frame = _listed().iloc[:1].assign(hist_item_id="i1|i2|i3", hist_cate_id="c8|c9")
    config = _csv_config(tmp_path / "unused.csv", "|")
    cats = item_records(config, frame)["cate_id"]
    assert cats.get("i2") == "c8" and cats.get("i3") == "c9" and "i1" not in cats


def test_csv_ids_written_as_floats_map_as_the_service_maps_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pandas writes an integer column with a missing value as 1.0, 3.0: read as text,
    training learnt the token "1.0" where a request's JSON number 1 maps "1" (OOV).
    Such columns, and True/False ones, read as the digits the service maps, with the
    history columns that share their table (decided on all of them, so that a candidate
    and the same item in a history keep one index)."""
    from ctr.mapping import normalize

    frame = _listed().assign(
        cate_id=["1.0", "", "3.0", "12345678901234567.0"],  # exact, as text
        hist_cate_id=["1.0|3.0", "3.0|3.0|1.0", "", "12345678901234567.0"],
        item_id=["9.0", "3.0", "1.0", "2.0"],
        hist_item_id=["1.0|2.0", "1.0|2.0|9.0", "", "3.0"],
        user_id=["7.0", "8.0", "9.0", "10.0"],
    )
    path = tmp_path / "logs.csv"
    frame.to_csv(path, index=False)
    config = _csv_config(path, "|")
    loaded = load_frame(config)
    assert loaded["cate_id"].tolist() == ["1", "", "3", "12345678901234567"]
    assert loaded["hist_cate_id"].tolist() == ["1|3", "3|3|1", "", "12345678901234567"]
    assert loaded["item_id"].tolist() == ["9", "3", "1", "2"]
    assert loaded["hist_item_id"].tolist() == ["1|2", "1|2|9", "", "3"]
    assert loaded["user_id"].tolist() == ["7", "8", "9", "10"]
    assert [normalize(v) for v in (1, 1.0, True)] == ["1", "1", "1"]  # the service's side
    assert "'item_id', 'hist_item_id': integers written as floats" in capsys.readouterr().out
    # the candidate and the same item in a history: one index
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, loaded, "|"))
    enc = encode_frame(config, mapper, loaded, "|")
    item_col = [f.name for f in config.item_sparse].index("item_id")
    assert enc.item_sparse[2, item_col] == enc.hist[0, 0, 0]  # item "1" both ways
    # a history token that is not such an integer keeps the table's columns as they are
    frame["hist_item_id"] = ["1.0|x", "1.0|2.0|9.0", "", "3.0"]
    frame.to_csv(path, index=False)
    again = load_frame(config)
    assert again["item_id"].tolist() == ["9.0", "3.0", "1.0", "2.0"]
    assert again["hist_item_id"].tolist() == ["1.0|x", "1.0|2.0|9.0", "", "3.0"]
    # booleans
    frame["item_id"], frame["hist_item_id"] = ["True", "False", "True", "True"], ["", "", "", ""]
    frame.to_csv(path, index=False)
    assert load_frame(config)["item_id"].tolist() == ["1", "0", "1", "1"]


@pytest.mark.parametrize(
    ("items", "hists"),
    [(["1.0", "3.0", "", "2.0"], ["1|2", "1|2|3", "", "3"]),  # pandas' usual mix
     (["1", "3", "4", "2"], ["1.0|2.0", "1.0", "", "3.0"])],  # the other way round
)  # fmt: skip
def test_float_written_ids_beside_digits_map_to_one_index(
    tmp_path: Path, items: list[str], hists: list[str]
) -> None:
    """The usual case: an item column with a gap (pandas writes 1.0) beside histories
    joined from integers ("1|2"). Every token an integer in one form or the other: the
    float-written ones become digits, so a candidate and the same item in a history keep
    one index (deciding on "all float-written" left this mix split)."""
    frame = _listed().assign(item_id=items, hist_item_id=hists)
    path = tmp_path / "logs.csv"
    frame.to_csv(path, index=False)
    config = _csv_config(path, "|")
    loaded = load_frame(config)
    assert not any(".0" in v for v in loaded["item_id"].tolist() + loaded["hist_item_id"].tolist())
    mapper = FeatureMapper.fit(config, raw_columns_for_fit(config, loaded, "|"))
    enc = encode_frame(config, mapper, loaded, "|")
    col = [f.name for f in config.item_sparse].index("item_id")
    item_of = mapper.mapper_for("item_id")
    for row, item in enumerate(loaded["item_id"].tolist()):
        if item:
            assert enc.item_sparse[row, col] == item_of.map_one(item.split(".")[0])
    assert enc.hist[1, 0, 0] == item_of.map_one("1") == enc.item_sparse[0 if items[0] else 2, col]


def test_two_features_on_one_column_are_decided_together(tmp_path: Path) -> None:
    """A second feature reading the item column (a hashed copy) must not rewrite it
    when the history sharing the first one's table rules the rewrite out."""
    frame = _listed().assign(item_id=["7.0", "8.0", "9.0", "7.0"],
                             hist_item_id=["7.0|x", "", "8.0", ""])  # fmt: skip
    path = tmp_path / "logs.csv"
    frame.to_csv(path, index=False)
    raw = _csv_config(path, "|").model_dump()
    raw["features"].insert(2, {"name": "item_h", "kind": "sparse", "side": "item",
                               "column": "item_id"})  # fmt: skip
    loaded = load_frame(FeatureConfig.model_validate(raw))
    assert loaded["item_id"].tolist() == ["7.0", "8.0", "9.0", "7.0"]
    assert loaded["hist_item_id"].tolist() == ["7.0|x", "", "8.0", ""]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _movielens_folder(folder: Path, rating: str = "5") -> Path:
    """A MovieLens-100k layout of a few hand-written lines (not the real files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.genre").write_text("unknown|0\nAction|1\n\n")
    movies = ["1|A (1995)|01-Jan-1995||url|0|1", "2|B (1995)|01-Jan-1995||url|1|0"]
    (folder / "u.item").write_text("\n".join(movies) + "\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    rows = [f"{u}\t{i}\t{rating if (u, i) == (1, 1) else 4}\t{t}"
            for t, (u, i) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)])]  # fmt: skip
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    return folder


def test_a_malformed_shared_data_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    """A rating that is no number, a short u.item line, truncated or mistyped Amazon
    attributes were one-line errors naming neither file nor row, or a traceback."""
    from ctr.spec import load_config

    ml = _movielens_folder(tmp_path / "ml", rating="five")
    config = load_config(CONFIGS / "movielens_din.yaml", {"data.path": str(ml)})
    with pytest.raises(DataError, match=r"u\.data is malformed: ValueError"):
        load_frame(config)
    _movielens_folder(ml)
    (ml / "u.item").write_text("1|A (1995)|01-Jan-1995||url|0|1\n2|B (1995)\n")
    with pytest.raises(DataError, match=r"u\.item is malformed"):
        load_frame(config)
    amazon = tmp_path / "amazon"
    amazon.mkdir()
    (amazon / "Beauty.txt").write_text("u1 i1 i2 i3\nu2 i2 i3 i4\n")
    config = load_config(CONFIGS / "amazon_beauty_din.yaml", {"data.path": str(amazon)})
    for text, says in (('{"i1": [1, 2], "i2":', "JSONDecodeError"), ("[1, 2]", "not a list")):
        (amazon / "Beauty_item2attributes.json").write_text(text)
        with pytest.raises(DataError, match=rf"Beauty_item2attributes\.json is malformed.*{says}"):
            load_frame(config)


@pytest.mark.parametrize(
    ("config_file", "option", "value", "says"),
    [
        ("amazon_beauty_din.yaml", "targets_per_user", -1, "must be at least 0"),
        ("amazon_beauty_din.yaml", "min_history", 2.7, "must be an integer"),
        ("amazon_beauty_din.yaml", "seed", "x", "must be an integer"),
        ("movielens_din.yaml", "max_examples_per_user", "ten", "must be an integer or null"),
        ("movielens_din.yaml", "min_history", -2, "must be at least 0"),
    ],
)  # fmt: skip
def test_an_adapters_option_of_the_wrong_kind_is_named(
    tmp_path: Path, config_file: str, option: str, value: object, says: str
) -> None:
    """Amazon's and MovieLens' options were not checked: -1 targets gave no rows (the
    split's error named no option), 2.7 was read as 2, "ten" failed in int()."""
    from ctr.spec import load_config

    ml = _movielens_folder(tmp_path / "ml")
    config = load_config(CONFIGS / config_file,
                         {"data.path": str(ml), f"data.options.{option}": value})  # fmt: skip
    with pytest.raises(DataError, match=rf"data\.options\.{option} {says}"):
        load_frame(config)


@pytest.mark.parametrize("words", [("true", "false"), ("TRUE", "FALSE")])
def test_lowercase_and_uppercase_csv_booleans_read_as_a_requests_true(
    tmp_path: Path, words: tuple[str, str]
) -> None:
    """Spark, Java and JS write true/false, R and Excel TRUE/FALSE: only pandas' True
    was read as 1, so a context feature trained on "true" was out of vocabulary for
    every request's JSON true (which maps "1")."""
    path = tmp_path / "clicks.csv"
    _clicks_csv(path)
    config = _loader_config(path, max_seq_len=5)
    items = [words[t % 2] for t in range(12)]
    _edit_clicks(path, item_id=items, hist_item_id=["|".join(items[:t]) for t in range(12)])
    frame = load_frame(config)
    assert set(frame["item_id"]) == {"1", "0"}
    assert frame["hist_item_id"].tolist()[3] == "1|0|1"
