"""Dense inputs clamped to the training split's range (``train.clip_dense``).

A dense value far beyond anything training saw (``item_price: 1e30``) must not drive the
network into saturation and a confident 0 or 1: the model clamps each dense column to
the range its encoded values held in the training split, the exported graph carries the
clamp, the manifest records the bounds (``dense_range``), and the service counts the
values it clamps (``ctr_dense_out_of_range_total``). Inside the range nothing changes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis import Redis

from ctr.bundle import MANIFEST, MODEL_FILE, BundleError, load_bundle
from ctr.encode import to_float
from ctr.spec import FeatureConfig, manifest_config
from service.app import create_app
from tests.conftest import tiny_raw
from tests.helpers import Built, build_bundle, loaded_redis, settings_for
from training.dataset import prepare
from training.models import build_model
from training.train import dense_bounds, load_run, train

FEATURE = "item_price"  # the synthetic configs' one dense feature (item side, log1p)


def _price_column(config: FeatureConfig) -> int:
    return [f.name for f in config.item_dense].index(FEATURE)


def test_bounds_are_the_training_splits_range(trained: Callable[[str], Any]) -> None:
    run = trained("din")
    enc = run.prep.train.enc
    j = _price_column(run.config)
    spec = run.config.feature(FEATURE)
    default = np.float32(to_float(None, spec))  # what a missing price is fed as
    seen = enc.item_dense[:, j]
    lo, hi = float(min(seen.min(), default)), float(max(seen.max(), default))
    assert lo < hi
    assert run.model.dense_range() == {FEATURE: [lo, hi]}
    assert run.metrics["dense_range"] == {FEATURE: [lo, hi]}
    # the synthetic prices are all above 1, so the default (0 -> log1p 0) widens the range
    assert default < seen.min() and lo == default


def test_a_missing_value_is_never_clamped(tiny_config: Callable[..., FeatureConfig]) -> None:
    """The encoded default lies inside the bounds even where training never used it, and
    so do the values training saw."""
    feats = [
        {**f, "default": 99.0} if f["name"] == FEATURE else f for f in tiny_raw("din")["features"]
    ]
    config = tiny_config("din", features=feats)
    assert config.feature(FEATURE).default == 99.0
    prep = prepare(config)
    (_, _), (lo, hi) = dense_bounds(config, prep.train)
    seen = prep.train.enc.item_dense[:, 0]
    assert float(hi[0]) == pytest.approx(math.log1p(99.0)) and float(lo[0]) == seen.min()
    assert seen.max() < math.log1p(99.0)


def _batch(run: Any, rows: int = 16) -> dict[str, torch.Tensor]:
    return run.prep.test.batch(np.arange(rows))


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(batch)["logits"].numpy()


@pytest.mark.parametrize("model_type", ["din", "dien", "deepfm", "base", "multi_tower_din"])
def test_beyond_the_range_scores_as_its_edge(
    trained: Callable[[str], Any], model_type: str
) -> None:
    run = trained(model_type)
    model = run.model
    j = _price_column(run.config)
    lo, hi = model.dense_range()[FEATURE]
    batch = _batch(run)
    at_hi, at_lo = copy.copy(batch), copy.copy(batch)
    at_hi["item_dense"] = batch["item_dense"].clone()
    at_hi["item_dense"][:, j] = hi
    at_lo["item_dense"] = batch["item_dense"].clone()
    at_lo["item_dense"][:, j] = lo
    for far in (hi + 1.0, 1e30, 3.0e38):
        beyond = {**at_hi, "item_dense": at_hi["item_dense"].clone()}
        beyond["item_dense"][:, j] = far
        np.testing.assert_array_equal(_logits(model, beyond), _logits(model, at_hi))
    below = {**at_lo, "item_dense": at_lo["item_dense"].clone()}
    below["item_dense"][:, j] = -1e30
    np.testing.assert_array_equal(_logits(model, below), _logits(model, at_lo))

    # without the bounds the same far value scores otherwise (what the clamp prevents)
    free = build_model(run.config, run.mapper.table_sizes())
    state = {k: v for k, v in model.state_dict().items() if "_clip." not in k}
    free.load_state_dict(state)
    free.eval()
    assert free.dense_range() == {}
    far = {**at_hi, "item_dense": at_hi["item_dense"].clone()}
    far["item_dense"][:, j] = 1e30
    # (DeepFM's unclamped 1e30 squares past float32: NaN)
    assert not np.allclose(_logits(free, far), _logits(model, far), atol=1e-3)
    # inside the range the clamp changes nothing
    inside = {**batch, "item_dense": batch["item_dense"].clone()}
    inside["item_dense"][:, j] = (lo + hi) / 2
    np.testing.assert_array_equal(_logits(free, inside), _logits(model, inside))


def test_a_checkpoint_from_before_the_bounds_loads_unbounded(
    trained: Callable[[str], Any], tmp_path: Path
) -> None:
    run = trained("din")
    old = {k: v for k, v in run.model.state_dict().items() if "_clip." not in k}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(old, ckpt)
    fresh = build_model(run.config, run.mapper.table_sizes())
    fresh.load_state_dict(torch.load(ckpt, weights_only=True))  # strict: no missing key
    assert fresh.dense_range() == {}
    assert not fresh.item_clip.bounded and not fresh.user_clip.bounded
    # one with them keeps them
    again = build_model(run.config, run.mapper.table_sizes())
    again.load_state_dict(run.model.state_dict())
    assert again.dense_range() == run.model.dense_range()


def test_bounds_must_be_finite_and_ordered(trained: Callable[[str], Any]) -> None:
    run = trained("din")
    model = build_model(run.config, run.mapper.table_sizes())
    empty = (torch.zeros(0), torch.zeros(0))
    for lo, hi in ((2.0, 1.0), (math.nan, 1.0), (0.0, math.inf)):
        with pytest.raises(ValueError, match="finite"):
            model.set_dense_range(empty, (torch.tensor([lo]), torch.tensor([hi])))
    with pytest.raises(ValueError, match="shape"):
        model.set_dense_range(empty, (torch.zeros(2), torch.ones(2)))
    assert model.dense_range() == {}


def test_clip_dense_false_trains_without_bounds(
    tiny_config: Callable[..., FeatureConfig], tiny_prep: Any, tmp_path: Path
) -> None:
    config = tiny_config("din", train__clip_dense=False)
    metrics = train(config, tmp_path / "run", prep=tiny_prep, progress=False)
    assert metrics["dense_range"] == {}
    _, _, model, _ = load_run(tmp_path / "run")
    assert model.dense_range() == {}
    # and dense_bounds is what clip_dense would have used
    (ulo, uhi), (ilo, ihi) = dense_bounds(config, tiny_prep.train)
    assert ulo.numel() == uhi.numel() == 0 and ilo.numel() == ihi.numel() == 1
    # the manifest never holds the key (a service one release older forbids unknown
    # keys): the manifest's dense_range records what it did
    for clip in (True, False):
        stored = manifest_config(tiny_config("din", train__clip_dense=clip))
        assert "clip_dense" not in stored["train"]
        assert FeatureConfig.model_validate(stored).train.clip_dense is True


# ---- the exported graph and the service ---------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("dense_range"), "din")


def _graph_probs(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probs"], feed)[0]


def test_the_exported_graph_clamps_and_the_manifest_says_where(built: Built) -> None:
    bundle = load_bundle(built.models_dir, built.config.name, built.version)
    _, _, model, _ = load_run(built.run_dir)
    lo, hi = bundle.manifest["dense_range"][FEATURE]
    assert [lo, hi] == model.dense_range()[FEATURE]
    prep = prepare(built.config, built.frame)
    j = _price_column(built.config)
    enc = prep.test.enc
    rows = np.arange(12)
    feed = {
        "user_sparse": enc.user_sparse[rows], "user_dense": enc.user_dense[rows],
        "hist": enc.hist[rows], "hist_len": enc.hist_len[rows],
        "item_sparse": enc.item_sparse[rows], "item_dense": enc.item_dense[rows].copy(),
        "user_idx": np.arange(len(rows), dtype=np.int64),
    }  # fmt: skip
    feed = {k: feed[k] for k in bundle.input_names}
    feed["item_dense"][:, j] = hi
    at_edge = _graph_probs(bundle.model_path, feed)
    feed["item_dense"][:, j] = 1e30
    np.testing.assert_array_equal(_graph_probs(bundle.model_path, feed), at_edge)
    fused = bundle.fused
    if fused is not None:  # the fused graph carries the clamp as well
        from ctr import native

        so = ort.SessionOptions()
        so.register_custom_ops_library(str(native.library().path))
        sess = ort.InferenceSession(
            str(bundle.path / fused["file"]), so, providers=["CPUExecutionProvider"]
        )
        np.testing.assert_allclose(sess.run(["probs"], feed)[0], at_edge, atol=1e-5, rtol=0)
    bounds = bundle.dense_bounds["item"]
    assert bounds.names == (FEATURE,)
    assert "user" not in bundle.dense_bounds  # the config has no user-side dense feature
    assert bounds.outside(np.array([[lo], [hi], [hi + 1], [-5.0]], np.float32)) == {FEATURE: 2}
    assert bounds.outside(np.array([[lo], [hi]], np.float32)) == {}


@pytest.mark.parametrize(
    "value",
    [{"item_price": [1.0]}, {"item_price": [2.0, 1.0]}, {"item_price": [0, "1"]},
     {"item_price": [0, None]}, {"item_price": [0, 1e999]}, {"nope": [0, 1]}, [0, 1]],
)  # fmt: skip
def test_a_bad_dense_range_is_a_bundle_error(built: Built, tmp_path: Path, value: Any) -> None:
    import shutil

    src = built.models_dir / built.config.name / str(built.version)
    dst = tmp_path / "models" / built.config.name / "1"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["dense_range"] = value
    (dst / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="dense_range"):
        load_bundle(tmp_path / "models", built.config.name, 1)


def test_a_bundle_without_dense_range_loads(built: Built, tmp_path: Path) -> None:
    """Bundles exported before the bounds existed have no ``dense_range``."""
    import shutil

    src = built.models_dir / built.config.name / str(built.version)
    dst = tmp_path / "models" / built.config.name / "1"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    del manifest["dense_range"]
    (dst / MANIFEST).write_text(json.dumps(manifest))
    bundle = load_bundle(tmp_path / "models", built.config.name, 1)
    assert bundle.dense_bounds == {}
    assert (dst / MODEL_FILE).is_file()


@pytest.fixture(scope="module")
def client(built: Built) -> Iterator[TestClient]:
    redis_db: Redis = loaded_redis(built)
    del redis_db
    with TestClient(create_app(settings_for(built))) as c:
        yield c


def _clamped() -> float:
    return REGISTRY.get_sample_value("ctr_dense_out_of_range_total", {"feature": FEATURE}) or 0.0


def _scores(client: TestClient, user: str, cands: list[dict[str, Any]]) -> dict[str, float]:
    r = client.post("/v1/score", json={"user_id": user, "candidates": cands})
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] is False
    return {it["item_id"]: it["probability"] for it in r.json()["items"]}


def test_the_service_scores_a_far_value_as_the_edge_and_counts_it(
    built: Built, client: TestClient
) -> None:
    bundle = load_bundle(built.models_dir, built.config.name, built.version)
    lo, hi = bundle.manifest["dense_range"][FEATURE]
    top = math.expm1(hi)  # the raw price whose log1p is the top of the range
    items = built.frame["item_id"].astype(str).unique().tolist()[:6]
    user = "u5"

    def with_price(price: float) -> list[dict[str, Any]]:
        return [{"item_id": i, "features": {FEATURE: price}} for i in items]

    # the loaded model's bounded features start at 0 (a series Grafana can rate)
    start = REGISTRY.get_sample_value("ctr_dense_out_of_range_total", {"feature": FEATURE})
    assert start is not None
    before = _clamped()
    far = _scores(client, user, with_price(1e30))
    assert _clamped() - before == len(items)  # each far value counted once
    huge = _scores(client, user, with_price(1.7e308))
    assert _clamped() - before == 2 * len(items)
    edge = _scores(client, user, with_price(top * 1.5))  # beyond too: the same scores
    assert far == huge == edge
    assert all(0.0 < p < 1.0 for p in far.values())
    # inside the range: scored as given, nothing counted
    counted = _clamped()
    inside = _scores(client, user, with_price(math.expm1((lo + hi) / 2)))
    assert _clamped() == counted
    assert inside != far
    # items nobody knows (no price in the request or Redis: the default) are not counted
    unknown = [{"item_id": f"never-seen-{k}"} for k in range(5)]
    _scores(client, user, unknown)
    assert _clamped() == counted
    models = client.get("/v1/models").json()
    assert models["dense_range"] == {FEATURE: [lo, hi]}


def test_a_single_candidate_far_value_is_counted_too(built: Built, client: TestClient) -> None:
    """One candidate (an item_dense of one value, where the model has one item dense
    feature) beyond the range is counted like each of many: a request's batch size
    does not decide whether ``ctr_dense_out_of_range_total`` sees a clamp."""
    item = built.frame["item_id"].astype(str).iloc[0]
    before = _clamped()
    _scores(client, "u5", [{"item_id": item, "features": {FEATURE: 1e30}}])
    assert _clamped() - before == 1


def _copied(built: Built, tmp_path: Path, edit: Callable[[dict], Any]) -> Built:
    """``built``'s bundle as version 1 of a fresh store, its manifest edited (the
    graphs untouched: their sha256s still match)."""
    import shutil

    src = built.models_dir / built.config.name / str(built.version)
    dst = tmp_path / "models" / built.config.name / "1"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return Built(built.config, built.frame, tmp_path / "models", built.run_dir, 1)


def test_every_graph_carries_the_range_it_clamps_to(built: Built) -> None:
    from ctr.bundle import DENSE_RANGE_KEY

    bundle = load_bundle(built.models_dir, built.config.name, built.version)
    folder = built.models_dir / built.config.name / str(built.version)
    graphs = [p for p in folder.glob("*.onnx")]
    assert len(graphs) >= 2  # model.onnx and the fused graph
    for path in graphs:
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                    sess_options=_with_ops()).get_modelmeta()  # fmt: skip
        assert json.loads(meta.custom_metadata_map[DENSE_RANGE_KEY]) == bundle.manifest[
            "dense_range"
        ], path.name


def _with_ops() -> ort.SessionOptions:
    from ctr import native

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native.library().path))
    return so


@pytest.mark.parametrize(
    "edit",
    [lambda m: m["dense_range"].update({FEATURE: [0.0, 0.5]}), lambda m: m.pop("dense_range")],
    ids=["narrowed", "removed"],
)
def test_a_dense_range_edited_after_the_export_does_not_serve(
    built: Built, tmp_path: Path, edit: Callable[[dict], Any]
) -> None:
    """A chaos review edited ``dense_range`` to ``[0, 0.5]``: the bundle loaded,
    ``/v1/models`` showed the edit and ``ctr_dense_out_of_range_total`` counted by it,
    while the graph clamped at its own range. The graph's stamp now refuses it, at
    start-up and on a reload, like an edited mapping."""
    store = _copied(built, tmp_path, edit)
    with TestClient(create_app(settings_for(store, model_version="1"))) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "dense_range" in ready.json()["model_error"]
    ok = _copied(built, tmp_path / "ok", lambda m: None)
    store_dir = ok.models_dir / built.config.name
    import shutil

    shutil.copytree(store.models_dir / built.config.name / "1", store_dir / "2")
    with TestClient(create_app(settings_for(ok, model_version="1", api_key="k"))) as c:
        r = c.post("/admin/reload", json={"version": 2}, headers={"X-API-Key": "k"})
        assert r.status_code == 409 and "dense_range" in r.json()["detail"], r.text
        assert c.get("/v1/models").json()["version"] == "1"


def test_v1_models_shows_the_graphs_inputs_not_the_manifests_copy(
    built: Built, tmp_path: Path
) -> None:
    """The manifest's ``inputs`` is a copy nothing reads: edited to ``[]`` it was what
    ``/v1/models`` showed."""
    store = _copied(built, tmp_path, lambda m: m.update(inputs=[]))
    with TestClient(create_app(settings_for(store, model_version="1"))) as c:
        shown = c.get("/v1/models").json()["inputs"]
    graph = ort.InferenceSession(str(built.models_dir / built.config.name / str(built.version)
                                     / MODEL_FILE), providers=["CPUExecutionProvider"])  # fmt: skip
    assert [i["name"] for i in shown] == [i.name for i in graph.get_inputs()]


def test_a_graph_that_clamps_nothing_says_so(
    built: Built, tiny_config: Callable[..., FeatureConfig]
) -> None:
    """A model trained with ``clip_dense: false`` clamps nothing, and its graphs say so
    (``{}``): a ``dense_range`` added to its manifest would otherwise have loaded and
    been shown and counted as if the graph clamped to it."""
    from ctr.bundle import DENSE_RANGE_KEY, contract_of
    from service.model import check_dense_range
    from training.export import graph_stamps

    config = tiny_config("din")
    model = build_model(config, {t.name: 20 for t in config.tables})
    stamps = graph_stamps(contract_of({}, {}), model)
    assert stamps[DENSE_RANGE_KEY] == "{}"
    bundle = load_bundle(built.models_dir, built.config.name, built.version)
    assert bundle.manifest["dense_range"]  # this bundle's manifest names a range
    with pytest.raises(BundleError, match="dense_range"):
        check_dense_range(bundle, {DENSE_RANGE_KEY: "{}"})
    check_dense_range(bundle, {})  # an older graph, no stamp: not checked

