"""Training/serving skew on the shared real datasets (MovieLens-100k, Alimama, Amazon Beauty).

For each dataset the frame is built the way ``ctr train`` builds it (``load_frame`` +
``prepare``: the adapter, the split, the mapping fitted on train, ``encode_frame``); a
DIN with random weights (parity of inputs needs no trained model) goes through the
project's export (``export_bundle``, parity gate included); the same frame goes into a
real Redis by ``ctr load``'s code path (``load_into_redis``). Then, for 30 sampled users,
``POST /v1/score`` runs through ``create_app`` and the tensors the service feeds the
graph (caught at ``service.scoring.build_feeds``, which still does all the work) are compared
with the training side's.

The training-side reference of a user's history is the history a training example of
the user's **next** event would hold, by the adapter's own rule: MovieLens, every movie
rated before it, i.e. the last L ratings of ``u.data`` in ``(timestamp, item_id)``
order; Amazon, the last L items of the user's line. That is the newest example's
history plus the newest example's candidate, which ``ctr load`` appends by the
documented ``data.behaviour_labels`` rule (MovieLens ``all``: whatever its rating;
Amazon ``positive``: the clicked one, not the sampled negative). The tests also check
it against the newest example's own encoded row in the prepared split. Alimama has no
time: the newest snapshot is the user's last row in the file, whose history ``ctr load``
stores, plus that row's ad when it was clicked (``positive``, the non-MovieLens default).
A candidate's reference row is the prepared split's encoding of an example with that
item as its candidate; the profile's is the newest example's ``user_sparse`` row.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import service.scoring
from ctr.encode import Encoded, encode_frame
from ctr.mapping import OOV
from ctr.spec import FeatureConfig, load_config
from service.app import create_app
from service.features import Prepared as Feeds
from tests.helpers import Built, loaded_redis, settings_for
from training.data import load_frame
from training.data.generic import data_root
from training.dataset import Prepared, prepare

pytestmark = pytest.mark.data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_USERS = 30  # users sampled per dataset
N_OTHER = 4  # candidates per request besides the user's newest one and an unknown ID
UNKNOWN = "no-such-item-Ω"
TOL = 1e-5

RawHistory = dict[str, list[Any]]  # sequence source -> raw values, oldest first


@dataclass(frozen=True)
class Case:
    config: str
    folder: str
    user_cap: int | None  # sample this many users before prepare (None: all of them)


CASES = {
    "movielens": Case("movielens_din.yaml", "movielens-100k", None),
    "alimama": Case("alimama_din.yaml", "alimama-display-ad-dmr", None),
    "amazon_beauty": Case("amazon_beauty_din.yaml", "amazon-s3rec-sequences", 400),
}


@dataclass
class Real:
    """One dataset, built for training and exported."""

    name: str
    config: FeatureConfig
    frame: pd.DataFrame  # what training prepared and ctr load loads
    prep: Prepared
    model: Any  # training.models.CTRModel, random weights, eval mode
    built: Built

    @cached_property
    def rows(self) -> dict[Any, tuple[str, int]]:
        """Frame index -> (split, position in that split's encoded arrays)."""
        out: dict[Any, tuple[str, int]] = {}
        for split, part in self.prep.frames.items():
            out.update({idx: (split, k) for k, idx in enumerate(part.index)})
        return out

    def encoded(self, idx: Any) -> tuple[Encoded, int]:
        split, k = self.rows[idx]
        return getattr(self.prep, split).enc, k


def build_real(name: str, tmp: Path) -> Real:
    """The dataset as ``ctr train`` prepares it, and a randomly initialised small DIN
    exported into ``tmp/models`` by ``export_bundle``."""
    from training.export import export_bundle
    from training.models import build_model

    case = CASES[name]
    if not (data_root() / case.folder).is_dir():
        pytest.skip(f"dataset folder {data_root() / case.folder} is absent")
    config = load_config(
        CONFIGS / case.config,
        {"model.mlp": [32, 16], "model.attention_mlp": [16, 8], "name": f"skew_{name}"},
    )
    frame = load_frame(config)
    if case.user_cap is not None:
        users = frame[config.data.user_key].drop_duplicates()
        keep = users.sample(n=case.user_cap, random_state=0)
        frame = frame[frame[config.data.user_key].isin(set(keep))].reset_index(drop=True)
    prep = prepare(config, frame)
    torch.manual_seed(0)
    model = build_model(config, prep.mapper.table_sizes())
    with torch.no_grad():  # std 0.05 would leave every score near 0.5: make inputs count
        for emb in model.emb.tables.values():
            emb.weight.mul_(20.0)
    model.eval()
    version, _, _ = export_bundle(model, config, prep.mapper, {}, tmp / "models")
    return Real(
        name, config, frame, prep, model, Built(config, frame, tmp / "models", tmp, version)
    )


@pytest.fixture(scope="module")
def real(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Real:
    return build_real(request.param, tmp_path_factory.mktemp(f"skew-{request.param}"))


@dataclass
class Served:
    real: Real
    client: TestClient
    seen: list[Feeds]  # the feeds of every request, in order


@pytest.fixture(scope="module")
def served(real: Real) -> Iterator[Served]:
    """``real`` loaded into the test Redis by ``ctr load``'s code path, and the app on its
    bundle; every request's graph feeds are recorded (``build_feeds`` still builds them)."""
    loaded_redis(real.built)
    seen: list[Feeds] = []

    def recording(build: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Feeds:
            out = build(*args, **kwargs)
            seen.append(out)
            return out

        return record

    with pytest.MonkeyPatch.context() as mp:
        # after a read, or from kept rows without one (CTR_USER_TRACKING)
        mp.setattr(service.scoring, "build_feeds", recording(service.scoring.build_feeds))
        mp.setattr(service.scoring, "rows_feeds", recording(service.scoring.rows_feeds))
        with TestClient(create_app(settings_for(real.built))) as client:
            yield Served(real, client, seen)


# ---- the training-side references ---------------------------------------------------


def newest_row(real: Real, user: str) -> pd.Series:
    """The user's newest example: the last time step (the positive of a time step shared
    by a sampled negative); with no time, the last row in the file."""
    spec = real.config.data
    rows = real.frame[real.frame[spec.user_key] == user]
    if spec.time_column is None:
        return rows.iloc[-1]
    newest = rows[rows[spec.time_column] == rows[spec.time_column].max()]
    return newest.sort_values(spec.label, kind="stable").iloc[-1]


def next_history(real: Real, user: str) -> RawHistory:
    """The raw history a training example of the user's next event would hold (see the
    module docstring), from the dataset files by the adapter's rule where there is time."""
    c = real.config
    length = c.max_seq_len
    row = newest_row(real, user)
    if real.name == "movielens":
        from training.data.movielens import dataset_dir

        rated, genre = movielens_files(dataset_dir(c))
        items = rated[int(user)][-length:]
        return {"hist_item_id": [str(i) for i in items], "hist_cate_id": [genre[i] for i in items]}
    if real.name == "amazon_beauty":
        from training.data.amazon import dataset_dir

        seq = amazon_lines(dataset_dir(c) / f"{c.data.options['name']}.txt")[user][-length:]
        cate = item_values(real, "cate_id")
        return {"hist_item_id": seq, "hist_cate_id": [cate[i] for i in seq]}
    # alimama: the last row's history, and its ad when it was clicked
    hist = {s.source: list(row[s.source]) for s in c.sequences}
    if row[c.data.label] == 1:
        for s, t in zip(c.sequences, c.sequence_targets, strict=True):
            hist[s.source].append(row[t.source])
    return {k: v[-length:] for k, v in hist.items()}


@cache
def movielens_files(folder: Path) -> tuple[dict[int, list[int]], dict[int, str]]:
    """user -> rated movies in the adapter's order (``(timestamp, item_id)``), and each
    movie's genre, by the adapter's own readers."""
    from training.data.movielens import read_genres, read_ratings

    ratings = read_ratings(folder)  # sorted by (user, timestamp, item_id)
    rated = ratings.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
    return rated, read_genres(folder)


@cache
def amazon_lines(path: Path) -> dict[str, list[str]]:
    """user -> items oldest first, by the adapter's own reader."""
    from training.data.amazon import read_sequences

    return dict(read_sequences(path))


def item_values(real: Real, source: str) -> dict[str, Any]:
    """item_id -> the raw value of an item feature, from candidates and histories."""
    f = real.frame
    out = dict(zip(f["item_id"], f[source], strict=True))
    hist = "hist_" + source
    if hist in f:
        for ids, vals in zip(f["hist_item_id"], f[hist], strict=True):
            out.update(zip(ids, vals, strict=True))
    return out


def user_tensors(real: Real, user: str, history: RawHistory) -> Encoded:
    """The newest example's user and context columns with ``history``, encoded by the
    training code path (one row; its candidate columns are those of the newest one)."""
    row = newest_row(real, user).to_dict()
    return encode_frame(
        real.config, real.prep.mapper, pd.DataFrame([{**row, **history}]),
        real.config.data.seq_delimiter,
    )  # fmt: skip


def item_rows(real: Real, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``item_sparse [N, Fi]``, ``item_dense [N, Di]`` as training encoded each item as a
    candidate (an example of the prepared splits); an unknown ID as encode_frame encodes
    a row with nothing but its ID."""
    c = real.config
    first = pd.Series(real.frame.index, index=real.frame["item_id"])
    first = first[~first.index.duplicated()]  # item -> the first example it is the candidate of
    sparse, dense = [], []
    for item in items:
        if item in first.index:
            enc, k = real.encoded(first[item])
            sparse.append(enc.item_sparse[k])
            dense.append(enc.item_dense[k])
        else:
            enc = encode_frame(c, real.prep.mapper, pd.DataFrame([{"item_id": item}]))
            sparse.append(enc.item_sparse[0])
            dense.append(enc.item_dense[0])
    return np.stack(sparse), np.stack(dense).reshape(len(items), len(c.item_dense))


def sample_users(real: Real) -> list[str]:
    users = real.frame[real.config.data.user_key].drop_duplicates()
    return sorted(users.sample(n=min(N_USERS, len(users)), random_state=1).tolist())


def candidates_for(real: Real, user: str) -> list[str]:
    """The newest example's candidate, N_OTHER other candidates of the data, an unknown ID."""
    rng = np.random.default_rng(zlib.crc32(user.encode()))
    pool = real.frame["item_id"].drop_duplicates().tolist()
    others = [pool[k] for k in rng.choice(len(pool), size=N_OTHER, replace=False)]
    return list(dict.fromkeys([newest_row(real, user)["item_id"], *others, UNKNOWN]))


def context_of(real: Real, user: str) -> dict[str, Any]:
    """The request context: the newest example's context-side features."""
    row = newest_row(real, user)
    return {f.source: row[f.source] for f in real.config.features if f.side == "context"}


def score(served: Served, user: str, candidates: list[dict[str, Any]]) -> tuple[Feeds, dict]:
    """POST /v1/score; the feeds the service built for it and the response body."""
    served.seen.clear()
    body = {"user_id": user, "candidates": candidates, "context": context_of(served.real, user)}
    r = served.client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    (feeds,) = served.seen
    out = r.json()
    assert out["degraded"] is False and out["cold_start"] is False
    return feeds, out


def fed(feeds: Feeds, name: str) -> np.ndarray:
    """A graph feed; a dense input the graph lacks (no such feature) as ``[rows, 0]``."""
    if name in feeds.feeds:
        return feeds.feeds[name]
    rows = feeds.feeds["item_sparse" if name == "item_dense" else "hist_len"].shape[0]
    return np.zeros((rows, 0), dtype=np.float32)


def torch_probs(real: Real, user: Encoded, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """The torch model on the training-side tensors: one user, N candidates."""
    x = {k: torch.from_numpy(np.ascontiguousarray(getattr(user, k)))
         for k in ("user_sparse", "user_dense", "hist", "hist_len")}  # fmt: skip
    x["item_sparse"] = torch.from_numpy(sparse)
    x["item_dense"] = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    x["user_idx"] = torch.zeros(len(sparse), dtype=torch.int64)
    with torch.no_grad():
        return torch.sigmoid(real.model(x)["logits"]).numpy()


ALL = ["movielens", "alimama", "amazon_beauty"]


def datasets(**marks: Any) -> Callable[[Any], Any]:
    """Parametrize ``real`` over the datasets, with ``marks`` on the named ones."""
    params = [pytest.param(n, marks=marks.get(n, ()), id=n) for n in ALL]
    return pytest.mark.parametrize("real", params, indirect=True)


# ---- the tests ------------------------------------------------------------------------


@datasets()
def test_history_and_profile_are_the_training_ones(real: Real, served: Served) -> None:
    """(a) the encoded history, in order, and its length; (b) the profile and context."""
    c = real.config
    length = c.max_seq_len
    appends = 0
    for user in sample_users(real):
        items = candidates_for(real, user)
        feeds, _ = score(served, user, [{"item_id": i} for i in items])
        got = feeds.feeds
        history = next_history(real, user)
        want = user_tensors(real, user, history)
        n = int(want.hist_len[0])
        assert n == min(len(history[c.sequences[0].source]), length) > 0
        assert int(got["hist_len"][0]) == n, user
        for s, f in enumerate(c.sequences):
            np.testing.assert_array_equal(
                got["hist"][0, s], want.hist[0, s], err_msg=f"{real.name} user {user} {f.name}"
            )
        # the same, from the newest example's own encoded row in the prepared split: its
        # history shifted by the candidate ctr load appends (data.behaviour_labels)
        row = newest_row(real, user)
        enc, k = real.encoded(row.name)
        appended = c.data.behaviours == "all" or row[c.data.label] == 1
        ids = {f.name: j for j, f in enumerate(c.item_sparse)}
        for s, (f, t) in enumerate(zip(c.sequences, c.sequence_targets, strict=True)):
            own = enc.hist[k, s, : enc.hist_len[k]].tolist()
            if appended:
                own.append(int(enc.item_sparse[k, ids[t.name]]))
            assert got["hist"][0, s, :n].tolist() == own[-length:], (real.name, user, f.name)
        appends += appended
        if appended:  # so the history served is not the newest example's own
            own = enc.hist[k, 0, : enc.hist_len[k]].tolist()
            assert got["hist"][0, 0, :n].tolist() != own, (real.name, user)
        # (b) user_id, the profile read from Redis and the request's context
        np.testing.assert_array_equal(got["user_sparse"][0], enc.user_sparse[k], err_msg=user)
        np.testing.assert_array_equal(got["user_sparse"][0], want.user_sparse[0], err_msg=user)
        np.testing.assert_array_equal(fed(feeds, "user_dense")[0], enc.user_dense[k], err_msg=user)
        for j, f in enumerate(c.user_sparse):  # every stored profile field was found
            if f.source != c.data.user_key:
                assert got["user_sparse"][0, j] != OOV, (real.name, user, f.name)
    assert appends > 0  # the sample has users whose newest candidate joined the history


def check_items(
    real: Real, user: str, feeds: Any, body: dict, items: list[Any], sent: list[str]
) -> float:
    """The candidates' fed rows are training's for ``items`` and the answer's scores
    (keyed by the ``sent`` IDs, in order) are the torch model's; returns their spread."""
    sparse, dense = item_rows(real, items)
    np.testing.assert_array_equal(feeds.feeds["item_sparse"], sparse, err_msg=user)
    np.testing.assert_array_equal(fed(feeds, "item_dense"), dense, err_msg=user)
    want = torch_probs(real, user_tensors(real, user, next_history(real, user)), sparse, dense)
    got = {it["item_id"]: it["probability"] for it in body["items"]}
    np.testing.assert_allclose([got[k] for k in sent], want, rtol=0, atol=TOL)
    return float(np.ptp(want))


@datasets()
def test_candidates_are_encoded_as_in_training(real: Real, served: Served) -> None:
    """(c) a candidate sent by its ID alone gets the item features training encoded for
    it (category, brand, dense price ...), looked up from what ctr load stored; and the
    score is the torch model's on the training-side tensors."""
    spread = []
    for user in sample_users(real):
        items = candidates_for(real, user)
        feeds, body = score(served, user, [{"item_id": i} for i in items])
        spread.append(check_items(real, user, feeds, body, items, items))
    assert np.median(spread) > 0.01  # the scores do tell candidates apart


@datasets()
def test_scores_with_request_features_match_torch(real: Real, served: Served) -> None:
    """Candidates that carry their item features in the request (the ID under the
    config's candidate ID feature, ``item_id_feature``): the feeds are the training-side
    tensors and the score is the torch model's on them. Isolates the user side and the
    model from the item features ctr load stored."""
    c = real.config
    key = c.item_id_feature.source
    item_feats = [f.source for f in c.item_sparse + c.item_dense if f.source != key]
    first = real.frame.drop_duplicates("item_id").set_index("item_id", drop=False)
    for user in sample_users(real)[:10]:
        # one candidate per request ID
        by_key = {str(first.at[i, key]): i for i in candidates_for(real, user)[:-1]}
        items = list(by_key.values())
        cands = [
            {"item_id": k, "features": {s: first.at[i, s] for s in item_feats}}
            for k, i in by_key.items()
        ]
        feeds, body = score(served, user, cands)
        check_items(real, user, feeds, body, items, list(by_key))
