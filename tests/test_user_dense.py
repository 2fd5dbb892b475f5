"""A user-side dense feature end to end: a bundle trained on the synthetic DIN config plus
a per-user number (``user_spend``, read from the stored profile or the request's
``context``), served by the real app from a real exported bundle and a real Redis.

The service must read that number as training does (a stored non-number is the
feature's default), let a ``context`` value override the stored one (``null`` is
absent), reject a context value that is not a JSON number with a 422 naming
``context.user_spend``, and never answer a new context value with rows the user cache
kept for another one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from redis import Redis

from ctr.encode import encode_frame
from ctr.spec import FeatureConfig
from service.app import create_app
from service.loader import item_records
from service.store import user_key
from tests.helpers import (
    ROOT,
    Built,
    loaded_redis,
    offline_rows,
    settings_for,
    torch_inputs,
)

FEATURE = "user_spend"
DEFAULT = 7.0  # outside every stored value's range, so "took the default" shows
MISSING_USER = "u4"  # its rows carry no value: nothing is stored, the default applies
N_ITEMS = 25


def user_dense_config() -> FeatureConfig:
    """configs/synthetic_din.yaml, small, with ``user_spend`` in the user group."""
    raw = yaml.safe_load((ROOT / "configs" / "synthetic_din.yaml").read_text())
    raw["name"] = "din_user_dense"
    raw["max_seq_len"] = 20
    raw["features"].insert(
        2, {"name": FEATURE, "kind": "dense", "side": "user", "log1p": True, "default": DEFAULT}
    )
    raw["groups"][0]["features"].append(FEATURE)
    raw["train"]["epochs"] = 1
    raw["data"]["options"] = {"n_users": 300, "samples_per_user": 4}
    return FeatureConfig.model_validate(raw)


def with_spend(frame: pd.DataFrame) -> pd.DataFrame:
    """A per-user ``user_spend`` in [0.5, 4.5) (three decimals), NaN for MISSING_USER;
    the label leans on it, so the trained model reads it."""
    rng = np.random.default_rng(11)
    users = frame["user_id"].unique().tolist()
    spend = dict(zip(users, np.round(rng.uniform(0.5, 4.5, len(users)), 3).tolist(), strict=True))
    spend[MISSING_USER] = float("nan")
    frame = frame.assign(**{FEATURE: frame["user_id"].map(spend)})
    high = (frame[FEATURE] > 2.5).to_numpy() & (rng.random(len(frame)) < 0.3)
    frame.loc[high, "label"] = 1.0
    return frame


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from training.data.generic import validate_frame
    from training.data.synthetic import check_options, generate
    from training.dataset import prepare
    from training.export import export_bundle
    from training.train import load_run, train

    tmp: Path = tmp_path_factory.mktemp("user_dense")
    config = user_dense_config()
    # the generator's frame with the column added (load_frame refuses a config whose
    # data lacks one of its columns), then checked as load_frame checks it
    frame = validate_frame(config, with_spend(generate(config, **check_options(config))))
    run = tmp / f"run-{config.name}"
    train(config, run, prep=prepare(config, frame), progress=False)
    _, mapper, model, metrics = load_run(run)
    version, _, _ = export_bundle(model, config, mapper, metrics, tmp / "models")
    return Built(config, frame, tmp / "models", run, version)


@pytest.fixture(scope="module")
def redis_db(built: Built) -> Redis:
    return loaded_redis(built)


@pytest.fixture(scope="module")
def client(built: Built, redis_db: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(built))) as c:  # the user cache on (default)
        yield c


class Offline:
    """The trained torch model, fed through the training encoder (``encode_frame``)."""

    def __init__(self, built: Built, redis_db: Redis) -> None:
        from training.train import load_run

        self.config, self.mapper, self.model, _ = load_run(built.run_dir)
        self.items = item_records(self.config, built.frame)
        self.redis = redis_db

    def probs(self, user: str, items: list[str], profile: dict[str, Any]) -> np.ndarray:
        """Scores of ``items`` for ``user`` with these raw profile values (a key left out
        is missing) and the user's stored behaviours."""
        import torch

        hist = [orjson.loads(x) for x in self.redis.lrange(user_key(user, "seq"), 0, -1)]
        assert hist, user
        rows = offline_rows(user, profile, items, self.items, hist)
        enc = encode_frame(self.config, self.mapper, rows)
        with torch.no_grad():
            return torch.sigmoid(self.model(torch_inputs(enc))["logits"]).numpy()


@pytest.fixture(scope="module")
def offline(built: Built, redis_db: Redis) -> Offline:
    return Offline(built, redis_db)


@pytest.fixture(scope="module")
def items(built: Built) -> list[str]:
    return built.frame["item_id"].astype(str).unique().tolist()[:N_ITEMS]


def score(
    client: TestClient, user: str, items: list[str], context: dict[str, Any] | None = None
) -> np.ndarray:
    """The service's probabilities for ``items``, in that order."""
    body: dict[str, Any] = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
    if context is not None:
        body["context"] = context
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["cold_start"] is False and got["degraded"] is False
    by_id = {it["item_id"]: it["probability"] for it in got["items"]}
    return np.array([by_id[i] for i in items])


def stored(redis_db: Redis, user: str) -> dict[str, str]:
    return redis_db.hgetall(user_key(user, "profile"))


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """The user dense value moved the scores (far beyond the 1e-5 parity tolerance)."""
    assert float(np.max(np.abs(a - b))) > 1e-4, (a, b)


def test_stored_value_parity(
    client: TestClient, redis_db: Redis, offline: Offline, items: list[str]
) -> None:
    for user in ("u3", "u17", "u42"):
        profile = stored(redis_db, user)
        assert 0.5 <= float(profile[FEATURE]) < 4.5, profile  # the loader stored the number
        got = score(client, user, items)
        np.testing.assert_allclose(got, offline.probs(user, items, profile), atol=1e-5, rtol=0)
        # the stored number counts: the default in its place scores otherwise
        assert_differs(got, offline.probs(user, items, {**profile, FEATURE: DEFAULT}))
    # a user whose data had no value: nothing stored, the feature's default, as training
    profile = stored(redis_db, MISSING_USER)
    assert FEATURE not in profile and profile
    got = score(client, MISSING_USER, items)
    np.testing.assert_allclose(got, offline.probs(MISSING_USER, items, profile), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        got, offline.probs(MISSING_USER, items, {**profile, FEATURE: DEFAULT}), atol=1e-5, rtol=0
    )


def test_context_value_overrides_profile(
    client: TestClient, redis_db: Redis, offline: Offline, items: list[str]
) -> None:
    user = "u8"
    profile = stored(redis_db, user)
    plain = score(client, user, items)
    for value in (40.0, 40, 0.25):
        got = score(client, user, items, {FEATURE: value})
        want = offline.probs(user, items, {**profile, FEATURE: float(value)})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert_differs(got, plain)
    # null is absent: the stored value stands
    np.testing.assert_allclose(
        score(client, user, items, {FEATURE: None}), plain, atol=1e-6, rtol=0
    )
    np.testing.assert_allclose(plain, offline.probs(user, items, profile), atol=1e-5, rtol=0)


def test_stored_non_number_is_the_default(
    client: TestClient, redis_db: Redis, offline: Offline, items: list[str]
) -> None:
    user = "u23"
    key = user_key(user, "profile")
    profile = stored(redis_db, user)
    before = score(client, user, items)
    default = offline.probs(user, items, {**profile, FEATURE: DEFAULT})
    assert_differs(before, default)
    try:
        for junk in ("n/a", "NaN", "inf", ""):
            redis_db.hset(key, FEATURE, junk)
            got = score(client, user, items)
            np.testing.assert_allclose(got, default, atol=1e-5, rtol=0, err_msg=junk)
            # the training encoder on the same stored text agrees
            np.testing.assert_allclose(
                got, offline.probs(user, items, {**profile, FEATURE: junk}), atol=1e-5, rtol=0
            )
        redis_db.hdel(key, FEATURE)
        np.testing.assert_allclose(score(client, user, items), default, atol=1e-5, rtol=0)
        # a context number still overrides the junk
        redis_db.hset(key, FEATURE, "n/a")
        np.testing.assert_allclose(
            score(client, user, items, {FEATURE: 3.0}),
            offline.probs(user, items, {**profile, FEATURE: 3.0}),
            atol=1e-5,
            rtol=0,
        )
    finally:
        redis_db.hset(key, FEATURE, profile[FEATURE])
    np.testing.assert_allclose(score(client, user, items), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", ["3.5", True, "NaN"], ids=["string", "bool", "nan-string"])
def test_context_non_number_is_422(client: TestClient, items: list[str], value: Any) -> None:
    r = client.post(
        "/v1/score",
        json={
            "user_id": "u3",
            "candidates": [{"item_id": i} for i in items[:3]],
            "context": {FEATURE: value},
        },
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == f"context.{FEATURE}", r.json()


def test_user_cache_follows_context_value(
    client: TestClient, redis_db: Redis, offline: Offline, items: list[str]
) -> None:
    user = "u51"
    users_cache = client.app.state.ctr.model.users
    assert users_cache.size > 0  # the default settings keep encoded users
    profile = stored(redis_db, user)
    want = {v: offline.probs(user, items, {**profile, FEATURE: v}) for v in (1.5, 30.0)}
    assert_differs(want[1.5], want[30.0])
    first = score(client, user, items, {FEATURE: 1.5})
    assert users_cache.data[user].context == {FEATURE: 1.5}  # kept with its context
    np.testing.assert_allclose(first, want[1.5], atol=1e-5, rtol=0)
    second = score(client, user, items, {FEATURE: 30.0})
    np.testing.assert_allclose(second, want[30.0], atol=1e-5, rtol=0)
    # and back: the first value's score again, then the stored value's
    np.testing.assert_allclose(score(client, user, items, {FEATURE: 1.5}), first, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        score(client, user, items), offline.probs(user, items, profile), atol=1e-5, rtol=0
    )
