"""The encoded-row cache: unit behaviour, and through the real app that a cached row
scores like a freshly encoded one, never shadows request features, never keeps
rows built while the store was down, and expires with the item-cache TTL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.loader import load_into_redis
from service.rowcache import ItemRowCache
from service.settings import Settings
from service.store import item_key
from tests.helpers import REDIS_URL, Built, build_bundle, fresh_redis
from tests.redis_proc import RedisProcess, free_port


def rows(ids: list[str], base: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(ids)
    sparse = np.arange(base, base + 2 * k, dtype=np.int64).reshape(k, 2)
    return sparse, (sparse[:, :1] / 10).astype(np.float32)


def test_lookup_store_and_gather() -> None:
    cache = ItemRowCache(60, 8, 2, 1)
    assert cache.lookup(["a", "b"]).tolist() == [-1, -1]
    sparse, dense = rows(["a", "b", "c"], 10)
    cache.store(["a", "b", "c"], sparse, dense)
    slots = cache.lookup(["c", "x", "a"])
    assert slots[1] == -1
    np.testing.assert_array_equal(cache.sparse[slots[[0, 2]]], sparse[[2, 0]])
    np.testing.assert_array_equal(cache.dense[slots[[0, 2]]], dense[[2, 0]])
    # storing an ID again overwrites its row in the same slot
    new_sparse, new_dense = rows(["a"], 99)
    cache.store(["a"], new_sparse, new_dense)
    assert cache.lookup(["a"])[0] == slots[2]
    np.testing.assert_array_equal(cache.sparse[slots[2]], new_sparse[0])
    assert len(cache) == 3


def test_ring_evicts_oldest_and_keeps_the_rest_consistent() -> None:
    cache = ItemRowCache(60, 3, 2, 1)
    for k, item in enumerate(["a", "b", "c", "d"]):
        cache.store([item], *rows([item], 10 * k))
    assert cache.lookup(["a"]).tolist() == [-1]  # the oldest slot was reused for "d"
    for k, item in enumerate(["b", "c", "d"], start=1):
        slot = cache.lookup([item])[0]
        assert slot >= 0
        assert cache.sparse[slot, 0] == 10 * k
    assert len(cache) == 3
    # more rows than slots in one call: the last ones are kept
    many = [f"m{k}" for k in range(5)]
    cache.store(many, *rows(many, 100))
    assert (cache.lookup(many[:2]) == -1).all()
    got = cache.lookup(many[2:])
    np.testing.assert_array_equal(cache.sparse[got][:, 0], [104, 106, 108])


def test_expiry_and_disabled() -> None:
    cache = ItemRowCache(0.05, 4, 2, 1)
    cache.store(["a"], *rows(["a"], 1))
    assert cache.lookup(["a"])[0] >= 0
    time.sleep(0.08)
    assert cache.lookup(["a"])[0] == -1
    off = ItemRowCache(0, 4, 2, 1)
    off.store(["a"], *rows(["a"], 1))
    assert off.lookup(["a"]).tolist() == [-1] and len(off) == 0


# --- through the real app ---------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("rows"), "din")


@pytest.fixture(scope="module")
def redis_db(built: Built) -> Redis:
    client = fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    return client


def settings_for(built: Built, url: str = REDIS_URL, **kw: object) -> Settings:
    return Settings(
        models_dir=str(built.models_dir),
        model_name=built.config.name,
        redis_url=url,
        redis_timeout_ms=300,
        redis_connect_timeout_ms=300,
        **kw,
    )


def items_of(built: Built, n: int) -> list[str]:
    return built.frame["item_id"].astype(str).unique().tolist()[:n]


def same(got: dict[str, float], want: dict[str, float]) -> bool:
    """Same items, same scores (1e-6: batch composition may reorder float sums)."""
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-6 for k in want)


def score(client: TestClient, user: str, cands: list[dict]) -> dict[str, float]:
    r = client.post("/v1/score", json={"user_id": user, "candidates": cands})
    assert r.status_code == 200, r.text
    return {it["item_id"]: it["probability"] for it in r.json()["items"]}


@pytest.fixture(scope="module")
def uncached(built: Built, redis_db: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(built, item_cache_ttl_s=0))) as c:
        yield c


def test_cached_rows_score_like_fresh_ones(
    built: Built, redis_db: Redis, uncached: TestClient
) -> None:
    items = items_of(built, 60)
    plain = [{"item_id": i} for i in items]
    reference = score(uncached, "u7", plain)
    with TestClient(create_app(settings_for(built))) as c:
        cold = score(c, "u7", plain[:30])  # half the rows get cached
        rows = c.app.state.ctr.model.rows  # type: ignore[attr-defined]
        assert len(rows) == 30
        mixed = score(c, "u7", plain)  # 30 cached + 30 encoded in one request
        warm = score(c, "u7", list(reversed(plain)))  # all cached, other order
        assert len(rows) == 60
    assert same(cold, {i: reference[i] for i in items[:30]})
    assert same(mixed, reference) and same(warm, reference)


def test_request_features_bypass_the_cache(
    built: Built, redis_db: Redis, uncached: TestClient
) -> None:
    item = items_of(built, 1)[0]
    plain = [{"item_id": item}]
    bogus = [{"item_id": item, "features": {"cate_id": "c-not-a-category"}}]
    want_plain = score(uncached, "u2", plain)[item]
    want_bogus = score(uncached, "u2", bogus)[item]
    assert want_bogus != pytest.approx(want_plain, abs=1e-4)
    with TestClient(create_app(settings_for(built))) as c:
        rows = c.app.state.ctr.model.rows  # type: ignore[attr-defined]
        assert score(c, "u2", bogus)[item] == pytest.approx(want_bogus, abs=1e-6)  # not cached
        assert len(rows) == 0
        assert score(c, "u2", plain)[item] == pytest.approx(want_plain, abs=1e-6)
        assert len(rows) == 1
        # a cached row does not shadow request features, nor they the cached row
        assert score(c, "u2", bogus)[item] == pytest.approx(want_bogus, abs=1e-6)
        assert score(c, "u2", plain)[item] == pytest.approx(want_plain, abs=1e-6)


def test_rows_built_while_the_store_is_down_are_not_kept(built: Built) -> None:
    proc = RedisProcess(free_port())
    items = items_of(built, 20)
    plain = [{"item_id": i} for i in items]
    with TestClient(create_app(settings_for(built, proc.url))) as c:
        r = c.post("/v1/score", json={"user_id": "u3", "candidates": plain}).json()
        assert r["degraded"] is True
        assert len(c.app.state.ctr.model.rows) == 0  # type: ignore[attr-defined]
        proc.start()
        try:
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            healthy = score(c, "u3", plain)
            again = score(c, "u3", plain)
        finally:
            proc.stop()
    with TestClient(create_app(settings_for(built, proc.url, item_cache_ttl_s=0))) as ref:
        proc.start()
        try:
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            want = score(ref, "u3", plain)
        finally:
            proc.stop()
    assert same(healthy, want) and same(again, want)


def test_item_update_visible_after_ttl(built: Built) -> None:
    proc = RedisProcess(free_port()).start()
    try:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        item = items_of(built, 1)[0]
        direct = Redis.from_url(proc.url, decode_responses=True)
        with TestClient(create_app(settings_for(built, proc.url, item_cache_ttl_s=0.3))) as c:
            before = score(c, "u4", [{"item_id": item}])[item]
            direct.hset(item_key("cate_id"), item, "c-moved-category")
            within = score(c, "u4", [{"item_id": item}])[item]
            assert within == pytest.approx(before, abs=1e-6)  # still the cached row
            time.sleep(0.4)
            after = score(c, "u4", [{"item_id": item}])[item]
        with TestClient(create_app(settings_for(built, proc.url, item_cache_ttl_s=0))) as ref:
            want = score(ref, "u4", [{"item_id": item}])[item]
    finally:
        proc.stop()
    assert after == pytest.approx(want, abs=1e-6) and after != pytest.approx(before, abs=1e-4)
