"""The real FastAPI app over HTTP, a real exported bundle and a real Redis server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis

from ctr.encode import encode_frame
from service.app import create_app
from service.loader import item_records, load_into_redis, user_records
from service.scoring import _inline
from service.settings import Settings
from service.store import event_keys, item_key, user_key
from tests.helpers import (
    REDIS_URL,
    Built,
    ShiftedClock,
    build_bundle,
    loaded_redis,
    offline_rows,
    settings_for,
    torch_inputs,
    wait_for,
)
from tests.redis_proc import RedisProcess, free_port


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("svc"), "din")


@pytest.fixture(scope="module")
def redis_db(built: Built) -> Redis:
    return loaded_redis(built)


@pytest.fixture(scope="module")
def client(built: Built, redis_db: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(built))) as c:
        yield c


def stored_history(redis_db: Redis, user: str) -> list[dict]:
    return [orjson.loads(x) for x in redis_db.lrange(user_key(user, "seq"), 0, -1)]


def offline_probs(built: Built, user: str, redis_db: Redis, items: list[str]) -> np.ndarray:
    """The torch model on the same raw features, encoded by the training code path."""
    return offline_outputs(built, user, redis_db, items)["probs"]


def offline_outputs(
    built: Built, user: str, redis_db: Redis, items: list[str]
) -> dict[str, np.ndarray]:
    """``probs [N]`` and ``attention [N, L]`` of the torch model on the same raw features
    (encoded by the training code path), and ``hist`` (the raw item IDs fed, oldest
    first, ``hist_len`` of them)."""
    from training.train import load_run

    config, mapper, model, _ = load_run(built.run_dir)
    hist = stored_history(redis_db, user)
    profile = redis_db.hgetall(user_key(user, "profile"))
    cats = item_records(config, built.frame)
    rows = offline_rows(user, {**profile, "hour": None}, items, cats, hist)
    enc = encode_frame(config, mapper, rows)
    with torch.no_grad():
        out = model(torch_inputs(enc))
    fed = int(enc.hist_len[0])
    return {
        "probs": torch.sigmoid(out["logits"]).numpy(),
        "attention": out["attention"].numpy(),
        "hist": np.array([e["item_id"] for e in hist][len(hist) - fed :]),
    }


def some_items(built: Built, n: int) -> list[str]:
    return built.frame["item_id"].astype(str).unique().tolist()[:n]


def test_parity_with_offline_torch(built: Built, redis_db: Redis, client: TestClient) -> None:
    """Users with short histories, with full ones (exactly L stored) and with more than L
    stored (a longer CTR_SEQUENCE_KEEP): the newest L are fed, none dropped or added."""
    length = built.config.max_seq_len
    full = [u for u in (f"u{k}" for k in range(300)) if redis_db.llen(user_key(u, "seq")) == length]
    assert len(full) >= 2
    long_user = "parity-long-user"
    redis_db.delete(user_key(long_user, "seq"), user_key(long_user, "profile"))
    profile = redis_db.hgetall(user_key(full[0], "profile"))
    redis_db.hset(user_key(long_user, "profile"), mapping=profile)
    redis_db.rpush(user_key(long_user, "seq"), *redis_db.lrange(user_key(full[1], "seq"), 0, 2))
    redis_db.rpush(user_key(long_user, "seq"), *redis_db.lrange(user_key(full[0], "seq"), 0, -1))
    assert redis_db.llen(user_key(long_user, "seq")) == length + 3
    # unknown IDs too: out-of-vocabulary on both sides, with no stored features
    items = [*some_items(built, 40), "no-such-item-Ω", "zz-unknown"]
    for user in ("u3", "u17", *full[:2], long_user):
        r = client.post(
            "/v1/score", json={"user_id": user, "candidates": [{"item_id": i} for i in items]}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cold_start"] is False and body["degraded"] is False
        got = {it["item_id"]: it["probability"] for it in body["items"]}
        want = offline_probs(built, user, redis_db, items)
        assert len(stored_history(redis_db, user)) > 0
        np.testing.assert_allclose([got[i] for i in items], want, atol=1e-5, rtol=0)


def test_ranking_order_and_top_k(built: Built, client: TestClient) -> None:
    items = some_items(built, 50)
    r = client.post(
        "/v1/score",
        json={"user_id": "u5", "candidates": [{"item_id": i} for i in items], "top_k": 7},
    )
    body = r.json()
    probs = [it["probability"] for it in body["items"]]
    assert len(probs) == 7
    assert probs == sorted(probs, reverse=True)
    assert [it["rank"] for it in body["items"]] == list(range(1, 8))
    full = client.post(
        "/v1/score", json={"user_id": "u5", "candidates": [{"item_id": i} for i in items]}
    ).json()
    assert len(full["items"]) == 50
    assert [it["item_id"] for it in full["items"][:7]] == [it["item_id"] for it in body["items"]]
    assert body["model"] == {"name": built.config.name, "version": str(built.version)}


def test_cold_start_user(built: Built, client: TestClient) -> None:
    items = some_items(built, 5)
    r = client.post(
        "/v1/score",
        json={"user_id": "never-seen-user", "candidates": [{"item_id": i} for i in items]},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["cold_start"] is True and body["degraded"] is False
    assert all(0.0 < it["probability"] < 1.0 for it in body["items"])


def test_unknown_item_maps_to_oov(built: Built, redis_db: Redis, client: TestClient) -> None:
    """Item IDs the vocabulary lacks, with no stored features, all score as the one
    out-of-vocabulary row (as the offline model scores them); a known one does not."""
    unknown = ["no-such-item-Ω", "zz-unknown", "i999999"]
    assert all(redis_db.hget(item_key("cate_id"), i) is None for i in unknown)
    items = [*unknown, "i1"]
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items]}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200
    got = {it["item_id"]: it["probability"] for it in r.json()["items"]}
    assert set(got) == set(items)
    assert got[unknown[0]] == got[unknown[1]] == got[unknown[2]] != got["i1"]
    want = offline_probs(built, "u1", redis_db, items)
    np.testing.assert_allclose([got[i] for i in items], want, atol=1e-5, rtol=0)


def test_missing_feature_looked_up_from_redis(
    built: Built, redis_db: Redis, client: TestClient
) -> None:
    item = some_items(built, 1)[0]
    true_cate = redis_db.hget(item_key("cate_id"), item)
    price = redis_db.hget(item_key("item_price"), item)
    assert true_cate is not None

    def prob(features: dict | None) -> float:
        cand: dict = {"item_id": item}
        if features is not None:
            cand["features"] = features
        r = client.post("/v1/score", json={"user_id": "u2", "candidates": [cand]})
        return r.json()["items"][0]["probability"]

    looked_up = prob(None)
    explicit = prob({"cate_id": true_cate, "item_price": float(price)})
    other = prob({"cate_id": "c-does-not-exist", "item_price": float(price)})
    assert looked_up == pytest.approx(explicit, abs=1e-7)
    assert other != pytest.approx(looked_up, abs=1e-7)


def test_numbers_and_nulls_the_model_reads(
    built: Built, redis_db: Redis, client: TestClient
) -> None:
    """A dense value given as a JSON number (int or float) or null is scored (null: looked
    up in Redis); a `null` context key is absent, so the stored profile's value stands."""
    item = some_items(built, 1)[0]
    price = float(redis_db.hget(item_key("item_price"), item))

    def prob(features: dict | None = None, context: dict | None = None) -> float:
        cand: dict = {"item_id": item, **({"features": features} if features else {})}
        body: dict = {"user_id": "u2", "candidates": [cand], "context": context or {}}
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, r.text
        return r.json()["items"][0]["probability"]

    stored = prob()
    assert prob({"item_price": price}) == stored == prob({"item_price": None})
    assert prob({"item_price": round(price) + 1000}) != stored  # an int is a number too
    # only null is absent: a 0 or an empty string is the request's value, not the store's
    assert price != 0 and prob({"item_price": 0}) == prob({"item_price": 0.0}) != stored
    cate = redis_db.hget(item_key("cate_id"), item)
    assert cate and prob({"cate_id": ""}) != stored == prob({"cate_id": cate})
    profile = redis_db.hgetall(user_key("u2", "profile"))
    assert "age_bucket" in profile
    other = "zz" if profile["age_bucket"] != "zz" else "yy"
    assert prob(context={"age_bucket": None}) == stored
    assert prob(context={"age_bucket": profile["age_bucket"]}) == stored
    assert prob(context={"age_bucket": other}) != stored  # the context does override


def test_explain_returns_history_items(built: Built, redis_db: Redis, client: TestClient) -> None:
    """`explain` lists, per item, the `CTR_EXPLAIN_TOP` (3) history items with the largest
    attention weights by magnitude, largest first, with the weights the model gives
    (the torch model's attention over the same history)."""
    items = some_items(built, 6)
    r = client.post(
        "/v1/score",
        json={"user_id": "u4", "candidates": [{"item_id": i} for i in items], "explain": True},
    )
    assert r.status_code == 200, r.text
    want = offline_outputs(built, "u4", redis_db, items)
    hist = want["hist"]
    assert len(hist) > 3
    for it in r.json()["items"]:
        w = want["attention"][items.index(it["item_id"]), : len(hist)]
        got = it["attention"]
        assert len(got) == 3
        top = np.sort(np.abs(w))[::-1][:3]
        np.testing.assert_allclose([abs(a["weight"]) for a in got], top, atol=1e-5)
        for a in got:  # each weight is that history item's (largest first, as above)
            at = np.flatnonzero(np.abs(w - a["weight"]) <= 1e-5)
            assert a["item_id"] in set(hist[at].tolist())


def test_explain_names_stored_ids_as_requests_do(
    built: Built, redis_db: Redis, client: TestClient
) -> None:
    """A behaviour written by hand with a numeric item ID (or none) is named by the ID's
    canonical string, as the model read it (``12345``, ``13.0`` -> ``"12345"``,
    ``"13"``; it came back as the JSON number), and null where it has none; entries are
    per history position (an explain review)."""
    events = [orjson.loads(x) for x in redis_db.lrange(user_key("u4", "seq"), 0, 2)]
    assert len(events) == 3
    events[0]["item_id"], events[1]["item_id"] = 12345, 13.0
    del events[2]["item_id"]
    key = user_key("xp-numeric", "seq")
    redis_db.delete(key)
    redis_db.rpush(key, *[orjson.dumps(e) for e in events])
    try:
        r = client.post("/v1/score", json={"user_id": "xp-numeric", "explain": True,
                                           "candidates": [{"item_id": "i1"}]})  # fmt: skip
        assert r.status_code == 200, r.text
        named = sorted(a["item_id"] or "" for a in r.json()["items"][0]["attention"])
        assert named == ["", "12345", "13"]
    finally:
        redis_db.delete(key)


def test_explain_with_no_history_gives_every_item_an_empty_list(client: TestClient) -> None:
    """A cold start has no history to attend to: each item still carries ``attention``
    (empty), so a client reads the same shape for every user; ``explain: null`` is
    ``false``, as ``top_k`` and ``context`` may be null."""
    body = {"user_id": "never-seen-xp", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
    r = client.post("/v1/score", json={**body, "explain": True})
    assert r.status_code == 200, r.text
    assert r.json()["cold_start"] is True
    assert [it["attention"] for it in r.json()["items"]] == [[], []]
    plain = client.post("/v1/score", json={**body, "explain": None})
    assert plain.status_code == 200, plain.text
    assert all("attention" not in it for it in plain.json()["items"])
    assert [it["probability"] for it in plain.json()["items"]] == [
        it["probability"] for it in r.json()["items"]
    ]


def test_equal_scores_keep_the_request_order(client: TestClient) -> None:
    """Unknown items with no stored features get the same row, hence the same score:
    they keep the order the request gave them in."""
    names = ["zz-unk-3", "zz-unk-1", "zz-unk-2", "zz-unk-0"]
    for order in (names, names[::-1]):
        r = client.post(
            "/v1/score", json={"user_id": "u6", "candidates": [{"item_id": i} for i in order]}
        )
        assert r.status_code == 200, r.text
        body = r.json()["items"]
        assert len({it["probability"] for it in body}) == 1  # one score for all four
        assert [it["item_id"] for it in body] == order


def test_event_features_past_the_size_limit_are_refused(
    redis_db: Redis, client: TestClient
) -> None:
    """An event's features are stored in the history and read with it on every score:
    more than CTR_EVENT_MAX_BYTES (4096) of them as JSON is a 422 naming ``features``,
    and nothing is stored; just under the limit is stored."""
    user = "fat-event-user"
    redis_db.delete(*event_keys(user))
    ev = {"user_id": user, "event_id": "f1", "item_id": "i7", "timestamp": 1000.0}
    big = {f"k{j}": "v" * 250 for j in range(20)}  # about 5.3 KB
    r = client.post("/v1/events", json={**ev, "features": big})
    assert r.status_code == 422 and r.json()["field"] == "features", r.text
    assert "CTR_EVENT_MAX_BYTES" in r.json()["detail"]
    assert redis_db.exists(*event_keys(user)) == 0
    under = {f"k{j}": "v" * 250 for j in range(15)}  # about 4 KB
    assert len(orjson.dumps(under)) <= 4096
    r = client.post("/v1/events", json={**ev, "features": under})
    assert r.status_code == 202 and r.json()["appended"] is True, r.text
    assert redis_db.llen(user_key(user, "seq")) == 1


def test_events_append_trim_idempotent(built: Built, redis_db: Redis, client: TestClient) -> None:
    user = "event-user"
    redis_db.delete(*event_keys(user))
    ev = {"user_id": user, "event_id": "e1", "item_id": "i7", "features": {"cate_id": "c3"},
          "type": "click", "timestamp": 1000.0}  # fmt: skip
    r = client.post("/v1/events", json=ev)
    assert r.status_code == 202 and r.json() == {"appended": True, "duplicate": False}
    again = client.post("/v1/events", json=ev)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    seq = stored_history(redis_db, user)
    assert len(seq) == 1 and seq[0]["item_id"] == "i7" and seq[0]["cate_id"] == "c3"
    length = built.config.max_seq_len
    for k in range(length + 5):
        client.post("/v1/events", json={**ev, "event_id": f"t{k}", "item_id": f"i{k}"})
    seq = stored_history(redis_db, user)
    assert len(seq) == length
    assert seq[-1]["item_id"] == f"i{length + 4}"  # newest kept, oldest trimmed
    # the new behaviour is now part of the user's history when scoring
    r = client.post("/v1/score", json={"user_id": user, "candidates": [{"item_id": "i1"}]})
    assert r.json()["cold_start"] is False
    # a late event takes its place in time; one older than every kept behaviour is not
    # stored (training keeps the newest L by time), and says so
    for eid, ts in (("new", 2000.0), ("late", 1500.0)):
        r = client.post("/v1/events", json={**ev, "event_id": eid, "item_id": eid,
                                            "timestamp": ts})  # fmt: skip
        assert r.json() == {"appended": True, "duplicate": False}
    assert [e["item_id"] for e in stored_history(redis_db, user)[-2:]] == ["late", "new"]
    r = client.post("/v1/events", json={**ev, "event_id": "ancient", "item_id": "ancient",
                                               "timestamp": 5.0})  # fmt: skip
    assert r.status_code == 202
    assert r.json() == {"appended": False, "duplicate": False, "outside_window": True}
    assert "ancient" not in [e["item_id"] for e in stored_history(redis_db, user)]
    assert len(stored_history(redis_db, user)) == length


@pytest.mark.parametrize(
    ("cache_ttl", "tracking", "trips"),
    [(60.0, False, 1), (0.0, False, 1), (0.0, True, 1), (60.0, True, 0)],
    ids=["item-cache", "no-item-cache", "no-item-cache-tracked", "item-cache-tracked"],
)
def test_one_redis_round_trip_per_score(
    built: Built, cache_ttl: float, tracking: bool, trips: int
) -> None:
    """Measured on a private redis-server, so no other client's reads are counted. With
    CTR_USER_TRACKING a repeat user is not read: with every candidate's features cached
    the request makes no round trip at all; one that looks item features up still
    makes exactly one."""
    items = some_items(built, 20)
    body = {"user_id": "u9", "candidates": [{"item_id": i} for i in items]}
    own = RedisProcess().start()
    try:
        load_into_redis(built.config, built.frame, own.url, progress=False)
        probe = Redis.from_url(own.url)
        probe.info("stats")  # the probe's own connection set-up happens here

        def reads() -> int:
            """Reads Redis has processed, less the tracking heartbeat's probe writes (the
            only SETs; one INFO for both)."""
            info = probe.info("all")
            probes = int(info.get("cmdstat_set", {}).get("calls", 0))
            return int(info["total_reads_processed"]) - probes

        def hmget_calls() -> int:
            return int(probe.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

        s = Settings(
            models_dir=str(built.models_dir),
            model_name=built.config.name,
            redis_url=own.url,
            redis_timeout_ms=500,
            item_cache_ttl_s=cache_ttl,
            user_tracking=tracking,
        )
        with TestClient(create_app(s)) as client:
            if tracking:  # rows read before the tracking connection is live are not kept
                wait_for(lambda: client.get("/v1/models").json()["user_tracking"]["live"],
                         "tracking live", 10)  # fmt: skip
            client.post("/v1/score", json=body)  # warm the pool (connection set-up)
            # the start-up's background reads (the held-data check, the reload bus's
            # subscription) done first: on a loaded machine (fresh-clone CI) they fell in
            # the first measured request, [3, 1, 1]
            def idle() -> bool:
                first = reads()
                time.sleep(0.3)
                return reads() - first == 1  # the probe's own INFO only

            wait_for(idle, "Redis idle between requests", 10)
            deltas = []
            hm_before = hmget_calls()
            for _ in range(3):
                before = reads()
                assert client.post("/v1/score", json=body).status_code == 200
                deltas.append(reads() - before - 1)  # minus the probe's own INFO
            hm_after = hmget_calls()
    finally:
        own.stop()
    assert deltas == [trips] * 3
    if cache_ttl == 0:  # every request looked item features up, still in the one trip
        assert hm_after - hm_before >= 3
    else:  # warm cache: only the user's keys were read
        assert hm_after - hm_before == 0


def test_metrics_exposed_and_move(client: TestClient) -> None:
    def sample(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if line.startswith(name + " "):
                    return float(line.split()[-1])
        return 0.0

    before = client.get("/metrics").text
    client.post("/v1/score", json={"user_id": "u1", "candidates": [{"item_id": "i1"}]})
    after = client.get("/metrics").text
    assert (
        sample(after, "ctr_candidates_per_request_count")
        == sample(before, "ctr_candidates_per_request_count") + 1
    )
    # without micro-batching every graph call holds one user
    for part in ("count", "sum"):
        name = f"ctr_batch_users_{part}"
        assert sample(after, name) == sample(before, name) + 1
    for stage in ("redis_fetch", "feature_mapping", "inference", "serialization", "write"):
        assert f'ctr_stage_duration_seconds_count{{stage="{stage}"}}' in after
    assert 'route="/v1/score"' in after and 'status="200"' in after
    assert "ctr_model_info{" in after
    assert sample(after, "ctr_requests_in_flight") == 0  # raised to 1 in the request, then back
    assert "ctr_requests_in_flight " in after


def test_worker_memory_and_cpu_in_metrics(client: TestClient) -> None:
    """The worker's resident memory and CPU time reach /metrics (prometheus_client's own
    process_* metrics are missing in multiprocess mode): the memory is this process's
    (the TestClient serves in it), and the CPU counter grows by the CPU used between two
    scrapes, counted once."""
    import os
    import time

    from tests.test_workers import metric

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    page = os.sysconf("SC_PAGE_SIZE")
    text = client.get("/metrics").text
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    cpu_before = cpu()
    counted_before = metric(text, r"^ctr_worker_cpu_seconds_total ")
    rss = metric(text, r"^ctr_worker_resident_memory_bytes ")
    assert 50e6 < rss and abs(rss - rss_before) < 0.1 * rss_before, (rss, rss_before)
    assert counted_before > 0.5  # this process has used seconds of CPU by now
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU
        sum(range(10_000))
    text = client.get("/metrics").text
    grew = metric(text, r"^ctr_worker_cpu_seconds_total ") - counted_before
    used = cpu() - cpu_before
    # os.times() ticks in 10 ms: each difference may be off by a tick or two
    assert 0.27 <= grew <= used + 0.05, (grew, used)


def test_health_ready_models(built: Built, client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    for path in ("/healthz", "/readyz"):  # what some load balancers' checks send
        assert client.head(path).status_code == 200
    info = client.get("/v1/models").json()
    assert info["name"] == built.config.name and info["provider"] == "CPUExecutionProvider"
    assert info["features"]["sequence"] == ["hist_item_id", "hist_cate_id"]
    # the ones only a request's context gives (one left out scores as out of vocabulary)
    context = [f.name for f in built.config.features if f.side == "context"]
    assert info["features"]["context"] == context and context
    assert set(context) <= set(info["features"]["user"])


def test_missing_bundle_not_ready(tmp_path: Path, redis_db: Redis) -> None:
    """No model loaded: every route that needs one is a 503 `model_not_ready` (events
    too: the model's config says what to store, and nothing is written), and a reload
    that fails says nothing is served (`serving: null`)."""
    s = Settings(models_dir=str(tmp_path), model_name="absent", redis_url=REDIS_URL,
                 api_key="k")  # fmt: skip
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz", headers={"X-API-Key": "k"})
        assert r.status_code == 503 and "no versions" in r.json()["model_error"]
        # as every 503 (and the OpenAPI) says: it had none (session 38)
        assert r.headers["retry-after"] == "1" and c.head("/readyz").headers["retry-after"] == "1"
        s2 = c.post("/v1/score", json={"user_id": "u1", "candidates": [{"item_id": "i1"}]})
        assert s2.status_code == 503 and s2.json()["error"] == "model_not_ready"
        assert s2.headers["retry-after"] == "1"
        # why is for operators (/readyz, the log): no server path reaches an API caller
        assert str(tmp_path) not in s2.text and "see /readyz" in s2.json()["detail"]
        models = c.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"] == "model_not_ready"
        event = {"user_id": "nr-user", "event_id": "e1", "item_id": "i1", "timestamp": 1.0}
        ev = c.post("/v1/events", json=event, headers={"X-API-Key": "k"})
        assert ev.status_code == 503 and ev.json()["error"] == "model_not_ready"
        assert redis_db.exists(user_key("nr-user", "seq"), user_key("nr-user", "event_ids")) == 0
        rl = c.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
        assert rl.status_code == 409 and rl.json()["error"] == "reload_failed"
        assert rl.json()["serving"] is None and rl.json()["field"] == "version"


def test_loader_writes_the_newest_history(built: Built, redis_db: Redis) -> None:
    frame = built.frame
    for user in ("u3", "u8"):
        rows = frame[frame.user_id == user]
        newest = rows[rows.ts == rows.ts.max()]
        want = list(newest.iloc[0]["hist_item_id"])[-built.config.max_seq_len :]
        # the synthetic generator's candidates are drawn apart from the behaviours: none
        # follows the history (data.behaviour_labels: none, its default)
        assert built.config.data.behaviours == "none"
        got = [e["item_id"] for e in stored_history(redis_db, user)]
        assert got == want


def test_loader_keys_users_by_the_token_requests_use(built: Built) -> None:
    """A user-ID column read as floats (an int column with a gap, say) holds 5.0: the
    user is "5" in training and in requests, so its keys must say {u:5}, not {u:5.0};
    a row with no user ID is not loaded."""
    frame = built.frame[built.frame.user_id.isin(["u3", "u8"])].copy()
    frame["user_id"] = frame["user_id"].map({"u3": 5.0, "u8": None}).astype(float)
    users = [u for u, _, _ in user_records(built.config, frame)]
    assert users == ["5"]


def test_event_without_features_gets_them_from_the_item_table(
    redis_db: Redis, client: TestClient
) -> None:
    user = "event-user-2"
    redis_db.delete(*event_keys(user))
    cate = redis_db.hget(item_key("cate_id"), "i5")
    assert cate is not None
    ev = {"user_id": user, "event_id": "f1", "item_id": "i5", "timestamp": 3.0}
    assert client.post("/v1/events", json=ev).json()["appended"] is True
    assert stored_history(redis_db, user)[-1]["cate_id"] == cate


# --- the encoded candidate-row cache (service/rowcache.py), through the app ---


def same(got: dict[str, float], want: dict[str, float]) -> bool:
    """Same items, same scores (1e-6: batch composition may reorder float sums)."""
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-6 for k in want)


def probs_by_item(client: TestClient, user: str, cands: list[dict]) -> dict[str, float]:
    r = client.post("/v1/score", json={"user_id": user, "candidates": cands})
    assert r.status_code == 200, r.text
    return {it["item_id"]: it["probability"] for it in r.json()["items"]}


@pytest.fixture(scope="module")
def uncached_client(built: Built, redis_db: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(built, item_cache_ttl_s=0))) as c:
        yield c


def test_cached_rows_score_like_fresh_ones(
    built: Built, redis_db: Redis, uncached_client: TestClient
) -> None:
    items = some_items(built, 60)
    plain = [{"item_id": i} for i in items]
    reference = probs_by_item(uncached_client, "u7", plain)
    with TestClient(create_app(settings_for(built))) as c:
        cold = probs_by_item(c, "u7", plain[:30])  # half the rows get cached
        rows = c.app.state.ctr.model.rows  # type: ignore[attr-defined]
        assert len(rows) == 30
        mixed = probs_by_item(c, "u7", plain)  # 30 cached + 30 encoded in one request
        warm = probs_by_item(c, "u7", list(reversed(plain)))  # all cached, other order
        assert len(rows) == 60
    assert same(cold, {i: reference[i] for i in items[:30]})
    assert same(mixed, reference) and same(warm, reference)


def moved_by_category(c: TestClient, built: Built, user: str, category: str) -> str:
    """An item whose score ``category`` in place of its own moves by more than 1e-4 for
    ``user`` (how much a category moves a score depends on the trained weights); the
    category is sent with the request, which no cache keeps."""
    for item in some_items(built, 20):
        plain = probs_by_item(c, user, [{"item_id": item}])[item]
        sent = [{"item_id": item, "features": {"cate_id": category}}]
        if probs_by_item(c, user, sent)[item] != pytest.approx(plain, abs=1e-4):
            return item
    raise AssertionError(f"no item's score moved with category {category!r}")


def test_request_features_bypass_the_cache(
    built: Built, redis_db: Redis, uncached_client: TestClient
) -> None:
    item = moved_by_category(uncached_client, built, "u2", "c-not-a-category")
    plain = [{"item_id": item}]
    bogus = [{"item_id": item, "features": {"cate_id": "c-not-a-category"}}]
    want_plain = probs_by_item(uncached_client, "u2", plain)[item]
    want_bogus = probs_by_item(uncached_client, "u2", bogus)[item]
    with TestClient(create_app(settings_for(built))) as c:
        rows = c.app.state.ctr.model.rows  # type: ignore[attr-defined]
        # first: encoded from the request, not cached
        assert probs_by_item(c, "u2", bogus)[item] == pytest.approx(want_bogus, abs=1e-6)
        assert len(rows) == 0
        assert probs_by_item(c, "u2", plain)[item] == pytest.approx(want_plain, abs=1e-6)
        assert len(rows) == 1
        # a cached row does not shadow request features, nor they the cached row
        assert probs_by_item(c, "u2", bogus)[item] == pytest.approx(want_bogus, abs=1e-6)
        assert probs_by_item(c, "u2", plain)[item] == pytest.approx(want_plain, abs=1e-6)


def test_rows_built_while_the_store_is_down_are_not_kept(built: Built) -> None:
    proc = RedisProcess(free_port())
    items = some_items(built, 20)
    plain = [{"item_id": i} for i in items]
    with TestClient(create_app(settings_for(built, redis_url=proc.url))) as c:
        r = c.post("/v1/score", json={"user_id": "u3", "candidates": plain}).json()
        assert r["degraded"] is True
        assert r["cold_start"] is False  # not read is not unknown
        assert len(c.app.state.ctr.model.rows) == 0  # type: ignore[attr-defined]
        proc.start()
        try:
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            healthy = probs_by_item(c, "u3", plain)
            again = probs_by_item(c, "u3", plain)
        finally:
            proc.stop()
    with TestClient(create_app(settings_for(built, redis_url=proc.url, item_cache_ttl_s=0))) as ref:
        proc.start()
        try:
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            want = probs_by_item(ref, "u3", plain)
        finally:
            proc.stop()
    assert same(healthy, want) and same(again, want)


def test_item_update_visible_after_ttl(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without item tracking (``CTR_ITEM_TRACKING=false``; or on Cluster, TLS, or while
    the tracking connection is down) a changed item is scored from the cache until its
    TTL ends. With it, at once: test_tracking.py."""
    import service.itemcache
    import service.routes
    import service.rowcache
    import service.scoring

    # the caches' clock, moved on instead of sleeping past the TTL
    clock = ShiftedClock().install(
        monkeypatch, service.routes, service.scoring, service.itemcache, service.rowcache
    )
    proc = RedisProcess(free_port()).start()
    try:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        direct = Redis.from_url(proc.url, decode_responses=True)
        short_ttl = settings_for(
            built, redis_url=proc.url, item_cache_ttl_s=30, item_tracking=False
        )
        with TestClient(create_app(short_ttl)) as c:
            item = moved_by_category(c, built, "u4", "c-moved-category")
            before = probs_by_item(c, "u4", [{"item_id": item}])[item]
            direct.hset(item_key("cate_id"), item, "c-moved-category")
            within = probs_by_item(c, "u4", [{"item_id": item}])[item]
            assert within == pytest.approx(before, abs=1e-6)  # still the cached row
            clock.advance(31)
            after = probs_by_item(c, "u4", [{"item_id": item}])[item]
        no_cache = settings_for(built, redis_url=proc.url, item_cache_ttl_s=0)
        with TestClient(create_app(no_cache)) as ref:
            want = probs_by_item(ref, "u4", [{"item_id": item}])[item]
    finally:
        proc.stop()
    assert after == pytest.approx(want, abs=1e-6) and after != pytest.approx(before, abs=1e-4)


# --- review findings (session 9): each test failed on the code before its fix ---


def test_event_reads_item_features_from_redis_not_the_item_cache(
    redis_db: Redis, client: TestClient
) -> None:
    """An item scored before its category reached the store has "absent" in the item
    cache; a click on it must still store the category Redis has by then."""
    user, item = "event-user-3", "fresh-item-1"
    redis_db.delete(*event_keys(user))
    redis_db.hdel(item_key("cate_id"), item)
    r = client.post("/v1/score", json={"user_id": user, "candidates": [{"item_id": item}]})
    assert r.status_code == 200  # caches "no cate_id" for the item
    redis_db.hset(item_key("cate_id"), item, "c42")  # the catalogue job catches up
    ev = {"user_id": user, "event_id": "g1", "item_id": item, "timestamp": 5.0}
    assert client.post("/v1/events", json=ev).json()["appended"] is True
    assert stored_history(redis_db, user)[-1]["cate_id"] == "c42"
    redis_db.hdel(item_key("cate_id"), item)


def test_event_with_a_stored_value_that_is_not_utf8(redis_db: Redis, client: TestClient) -> None:
    """Bytes in the item table that are not UTF-8 are left out of the stored behaviour
    (they map to out-of-vocabulary when scored, too), not a 500 on every retry."""
    user, item = "event-user-4", "latin1-item"
    redis_db.delete(*event_keys(user))
    redis_db.hset(item_key("cate_id"), item, b"caf\xe9")
    ev = {"user_id": user, "event_id": "h1", "item_id": item, "timestamp": 6.0}
    r = client.post("/v1/events", json=ev)
    assert r.status_code == 202 and r.json()["appended"] is True, r.text
    stored = stored_history(redis_db, user)[-1]
    assert stored["item_id"] == item and "cate_id" not in stored
    r = client.post("/v1/score", json={"user_id": user, "candidates": [{"item_id": item}]})
    assert r.status_code == 200
    redis_db.hdel(item_key("cate_id"), item)


def test_unused_context_keys_do_not_defeat_the_user_cache(client: TestClient) -> None:
    """Context keys the model does not read are neither kept with the user's cached rows
    nor a reason to encode the user again."""
    model = client.app.state.ctr.model
    body = {"user_id": "u3", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}],
            "context": {"hour": 13}}  # fmt: skip
    base = client.post("/v1/score", json=body).json()["items"]
    kept = model.users.data["u3"]
    for k in range(3):
        extra = {**body, "context": {"hour": 13, "request_nonce": f"n{k}", "blob": "x" * 200}}
        assert client.post("/v1/score", json=extra).json()["items"] == base
    assert model.users.data["u3"] is kept  # the same rows: not encoded again
    assert kept.context == {"hour": 13}


def test_a_non_finite_score_is_a_500_that_says_so(built: Built, redis_db: Redis) -> None:
    """Should the graph ever return NaN, the answer names it instead of `null` scores."""
    # the Python runner, whose run is replaced below (the guard acts on both runners' scores)
    with TestClient(create_app(settings_for(built, native_runner=False))) as c:
        model = c.app.state.ctr.model
        real = model.run

        def nan_run(feeds: dict, explain: bool) -> list:
            outs = real(feeds, explain)
            outs[0] = outs[0].copy()
            outs[0][1] = np.nan
            return outs

        model.run = nan_run  # the guard, not a graph that yields NaN, is under test
        r = c.post(
            "/v1/score",
            json={"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]},
        )
        assert r.status_code == 500, r.text
        assert r.json()["error"] == "non_finite_score" and r.json()["field"] == "candidates[1]"


def test_degraded_responses_are_counted_once_answered(built: Built) -> None:
    """``ctr_degraded_responses_total`` counts the degraded answers given: it was counted
    at the failed read, so a request that then ended in a 500 (or 503, 499) was counted
    as a degraded response too (a docs review, session 45)."""
    from prometheus_client import REGISTRY

    def degraded() -> float:
        return REGISTRY.get_sample_value("ctr_degraded_responses_total") or 0.0

    body = {"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
    settings = settings_for(built, native_runner=False, redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as c:
        before = degraded()
        r = c.post("/v1/score", json=body)
        assert r.status_code == 200 and r.json()["degraded"] is True, r.text
        assert degraded() == before + 1
        model = c.app.state.ctr.model
        real = model.run

        def nan_run(feeds: dict, explain: bool) -> list:
            outs = real(feeds, explain)
            outs[0] = np.full_like(outs[0], np.nan)
            return outs

        model.run = nan_run
        r = c.post("/v1/score", json=body)
        assert r.status_code == 500 and r.json()["error"] == "non_finite_score", r.text
        assert degraded() == before + 1  # no degraded response given


def test_event_fields_and_item_features_of_the_same_name() -> None:
    """The stored behaviour carries the event's `type` and `ts` (its place in time), unless
    a sequence reads an item feature of that name: then the item's value stays, as the
    model saw it in training."""
    from service.features import stamp_event

    sent = {"item_id": "i3", "type": "bundle-offer", "ts": 99.0}
    plain = dict(sent)
    stamp_event(plain, {"item_id", "cate_id"}, "click", 7.0)
    assert plain == {"item_id": "i3", "type": "click", "ts": 7.0}
    read = dict(sent)
    stamp_event(read, {"item_id", "type"}, "click", 7.0)
    assert read == {"item_id": "i3", "type": "bundle-offer", "ts": 7.0}
    bare = {"item_id": "i3"}
    stamp_event(bare, {"item_id", "type"}, "click", 7.0)
    assert bare == {"item_id": "i3", "type": "click", "ts": 7.0}


def inline_runs(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ctr_inline_runs_total "):
            return float(line.split()[-1])
    raise AssertionError("no ctr_inline_runs_total in /metrics")


def ranked(r: object) -> list[tuple]:
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    items = r.json()["items"]  # type: ignore[attr-defined]
    return [(x["item_id"], x["probability"], x.get("attention")) for x in items]


def test_inline_graph_calls_score_as_the_hand_off_does(built: Built, redis_db: Redis) -> None:
    """CTR_INLINE_MAX_MS: a request alone in flight, whose call of about that many
    candidates took little time before, runs the graph on the event loop (counted in
    ctr_inline_runs_total) and gets the same ranked scores, explain included; a size
    range no call has timed yet (warm-up times N = 1, 64 and 512 only, without
    explain; an explain call is timed apart), and every call with the setting at 0, goes
    to the ORT thread."""
    items = some_items(built, 30)
    bodies = [
        {"user_id": u, "candidates": [{"item_id": i} for i in items[:n]], "explain": e}
        for u, e, n in [("u1", False, 30), ("u2", True, 30), ("nobody", False, 30)]
        + [("u1", False, 3)]
    ]
    answers = {}
    for limit in (0.0, 1000.0):
        settings = settings_for(built, inline_max_ms=limit, provider="cpu")
        with TestClient(create_app(settings)) as c:
            before = inline_runs(c)
            answers[limit] = [ranked(c.post("/v1/score", json=b)) for b in bodies]
            # the first call with 30 (and with 3) candidates has no expected time yet,
            # nor the first explain call: only "nobody" runs inline
            assert inline_runs(c) - before == (1 if limit else 0)
            again = [ranked(c.post("/v1/score", json=b)) for b in bodies]
            assert inline_runs(c) - before == (1 + len(bodies) if limit else 0)
            assert again == answers[limit]
    assert answers[1000.0] == answers[0.0]


def test_expected_call_time_scales_up_with_n_and_keeps_sessions_apart(
    built: Built, redis_db: Redis
) -> None:
    """The expected time of a call: the mean of its range, scaled up where N exceeds the
    range's mean N (a call for 1000 is not predicted by warm-up's 512), never down; the
    one-thread session's small calls do not predict the main session's, nor explain
    calls plain ones."""
    with TestClient(create_app(settings_for(built, provider="cpu"))) as c:
        model = c.app.state.ctr.model
        model.run_times.clear()
        assert model.expected_run_s(1000) is None
        model.run_times[model.run_key(1000)] = (0.004, 512.0)
        assert model.expected_run_s(1000) == pytest.approx(0.004 * 1000 / 512)
        assert model.expected_run_s(600) == pytest.approx(0.004 * 600 / 512)
        assert model.expected_run_s(513) == pytest.approx(0.004 * 513 / 512)
        model.run_times[model.run_key(1000)] = (0.004, 800.0)
        assert model.expected_run_s(600) == pytest.approx(0.004)  # not scaled down
        limit = model.single_thread_max
        if limit:  # a split runner (more than one intra-op thread, the default here)
            assert model.run_key(limit) != model.run_key(limit + 1)
        # a real call is timed into its own key: mean time and mean N
        ranked(
            c.post(
                "/v1/score",
                json={
                    "user_id": "u1",
                    "candidates": [{"item_id": i} for i in some_items(built, 20)],
                },
            )
        )
        took, mean_n = model.run_times[model.run_key(20)]
        assert took > 0 and mean_n == 20.0
        # an explain call (it also returns attention [N, L]) is timed apart: it neither
        # predicts nor moves the plain calls' time
        assert model.has_attention and model.run_key(20, True) != model.run_key(20)
        assert model.expected_run_s(20, True) is None
        explain = {
            "user_id": "u1",
            "candidates": [{"item_id": i} for i in some_items(built, 20)],
            "explain": True,
        }
        ranked(c.post("/v1/score", json=explain))
        assert model.run_times[model.run_key(20)] == (took, mean_n)
        assert model.run_times[model.run_key(20, True)][1] == 20.0


def test_inline_only_when_alone_short_and_before_the_deadline(
    built: Built, redis_db: Redis
) -> None:
    """No inline call with another request in flight, after arriving at a busy worker,
    with a graph call still running on the ORT thread, with a call expected to take more
    than CTR_INLINE_MAX_MS, or expected to end after the request's deadline."""
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in some_items(built, 20)]}
    n = len(body["candidates"])
    settings = settings_for(built, inline_max_ms=5.0, request_timeout_ms=400, provider="cpu")
    with TestClient(create_app(settings)) as c:
        state = c.app.state.ctr
        model = state.model
        ranked(c.post("/v1/score", json=body))  # the first call times the size range
        key = model.run_key(n)
        model.run_times[key] = (0.001, float(n))
        runs = inline_runs(c)
        ranked(c.post("/v1/score", json=body))
        assert inline_runs(c) == runs + 1  # the control: alone, short, well in time
        model.run_times[key] = (0.001, float(n))
        state.in_flight += 1  # another request in flight
        try:
            ranked(c.post("/v1/score", json=body))
        finally:
            state.in_flight -= 1
        model.run_times[key] = (0.006, float(n))  # over the 5 ms bound
        ranked(c.post("/v1/score", json=body))
        assert inline_runs(c) == runs + 1

        async def decide(idle: bool, in_flight: int = 1, running: int = 0) -> bool:
            state.in_flight += in_flight
            state.graph_calls.running += running
            try:
                deadline = asyncio.get_running_loop().time() + 0.4
                return _inline(state, model, n, deadline, idle)
            finally:
                state.in_flight -= in_flight
                state.graph_calls.running -= running

        model.run_times[key] = (0.001, float(n))
        assert asyncio.run(decide(True))  # the control
        # it came in while another request was in flight (that has ended since): under
        # load the call goes to the ORT thread
        assert not asyncio.run(decide(False))
        assert not asyncio.run(decide(True, in_flight=2))  # another came in since
        # a timed-out request's call still runs on the ORT thread
        assert not asyncio.run(decide(True, running=1))
        model.run_times[key] = (0.45, float(n))  # over the bound, and after the deadline
        assert not asyncio.run(decide(True))
    settings = settings_for(built, inline_max_ms=1000.0, request_timeout_ms=400, provider="cpu")
    with TestClient(create_app(settings)) as c:
        model = c.app.state.ctr.model
        ranked(c.post("/v1/score", json=body))
        model.run_times[model.run_key(n)] = (0.45, float(n))
        runs = inline_runs(c)
        ranked(c.post("/v1/score", json=body))
        assert inline_runs(c) == runs


@pytest.mark.parametrize("limit", [0.0, 1000.0])
def test_a_graph_call_past_the_deadline_is_a_503_inline_or_not(
    built: Built, redis_db: Redis, limit: float
) -> None:
    """The deadline's timer cannot fire while an inline call blocks the event loop: the
    request is checked after the call, and comes back as the same 503 as a request whose
    call on the ORT thread outlasts it, never as a late 200. A handed-off call that runs
    on past its request's deadline is counted until it ends: no inline call meanwhile."""

    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in some_items(built, 20)]}
    n = len(body["candidates"])
    settings = settings_for(
        built, inline_max_ms=limit, request_timeout_ms=300, provider="cpu", native_runner=False
    )  # the Python runner's threads (test_nativerun.py: the native runner's)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.ctr
        model = state.model
        ranked(c.post("/v1/score", json=body))  # the size range's first call
        model.run_times[model.run_key(n)] = (0.001, float(n))  # expected: fast
        real = model.run
        release = threading.Event()

        def slow_run(feeds: dict, explain: bool) -> list:
            # a call that takes twice the deadline, unforeseen; handed off, it runs on
            # until released (inline, nothing can release it: it blocks the loop)
            release.wait(0.6 if limit else 30)
            return real(feeds, explain)

        model.run = slow_run
        runs = inline_runs(c)
        r = c.post("/v1/score", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "deadline_exceeded"
        # the inline path was taken (and checked) when it is on
        assert inline_runs(c) - runs == (1 if limit else 0)
        assert state.graph_calls.running == (0 if limit else 1)
        release.set()
        state.executor.submit(lambda: None).result()  # the left-over call has ended
        assert state.graph_calls.running == 0
        model.run = real
        ranked(c.post("/v1/score", json=body))  # the worker serves on


def test_a_queued_call_dropped_at_the_deadline_is_not_counted_as_running(
    built: Built, redis_db: Redis
) -> None:
    """A request whose call is still queued behind another when its deadline passes gets
    its 503, and its call is dropped, never run: it must not count as a call running on
    the ORT thread, or no request would run inline again."""
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in some_items(built, 20)]}
    n = len(body["candidates"])
    settings = settings_for(
        built, inline_max_ms=1000.0, request_timeout_ms=300, provider="cpu", native_runner=False
    )  # the Python runner's threads (test_nativerun.py: the native runner's)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.ctr
        model = state.model
        ranked(c.post("/v1/score", json=body))
        gate = threading.Event()
        blocker = state.executor.submit(gate.wait, 30)  # the ORT thread is busy
        state.in_flight += 1  # so the request below hands its call off, to the queue
        try:
            r = c.post("/v1/score", json=body)
        finally:
            state.in_flight -= 1
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded", r.text
        gate.set()
        blocker.result()
        state.executor.submit(lambda: None).result()  # whatever was queued has gone by
        assert state.graph_calls.running == 0
        model.run_times[model.run_key(n)] = (0.001, float(n))
        runs = inline_runs(c)
        ranked(c.post("/v1/score", json=body))
        assert inline_runs(c) == runs + 1  # inline again


def test_each_stage_times_its_own_work(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that only the stages' own steps move: the candidates' mapping (before
    the read) counts as feature mapping, with the user's feeds and the item cache's
    puts of what the read brought; the read alone is ``redis_fetch`` (it used to hold
    the candidates' mapping, then the puts, too); ``write`` runs from the body built
    to the response handed to the client."""
    from prometheus_client import REGISTRY

    from service import asgi, scoring
    from service.itemcache import ItemCache

    now = [0.0]

    def moves(f: Any, by: float) -> Any:
        if asyncio.iscoroutinefunction(f):

            async def timed_async(*a: Any, **k: Any) -> Any:
                out = await f(*a, **k)
                now[0] += by
                return out

            return timed_async

        def timed(*a: Any, **k: Any) -> Any:
            out = f(*a, **k)
            now[0] += by
            return out

        return timed

    def total(stage: str) -> float:
        value = REGISTRY.get_sample_value("ctr_stage_duration_seconds_sum", {"stage": stage})
        return value or 0.0

    monkeypatch.setattr(asgi, "STAGE_CLOCK", lambda: now[0])
    monkeypatch.setattr(scoring, "candidates", moves(scoring.candidates, 1.0))
    monkeypatch.setattr(scoring, "fetch", moves(scoring.fetch, 10.0))
    monkeypatch.setattr(scoring, "build_feeds", moves(scoring.build_feeds, 100.0))
    monkeypatch.setattr(scoring, "orjson_response", moves(scoring.orjson_response, 1000.0))
    puts = [0]

    def put(*a: Any, **k: Any) -> None:
        puts[0] += 1
        now[0] += 10000.0

    monkeypatch.setattr(ItemCache, "put", put)  # the cache keeps nothing
    stages = ("redis_fetch", "feature_mapping", "inference", "serialization", "write")
    before = {st: total(st) for st in stages}
    counts = {st: REGISTRY.get_sample_value("ctr_stage_duration_seconds_count",
                                            {"stage": st}) or 0.0 for st in stages}  # fmt: skip
    body = {"user_id": "stage-clock-user", "candidates": [{"item_id": "i3"}]}  # never kept
    assert client.post("/v1/score", json=body).status_code == 200
    assert puts[0] >= 1  # the candidate's features were read, and put in the cache
    assert total("redis_fetch") - before["redis_fetch"] == 10.0
    assert total("feature_mapping") - before["feature_mapping"] == 101.0 + 10000.0 * puts[0]
    assert total("serialization") - before["serialization"] == 1000.0
    assert total("inference") - before["inference"] == 0.0  # the graph call moved no clock
    assert total("write") - before["write"] == 0.0  # nor the write
    for st in stages:  # each stage once
        assert REGISTRY.get_sample_value("ctr_stage_duration_seconds_count",
                                         {"stage": st}) == counts[st] + 1, st  # fmt: skip


def test_the_held_data_set_is_read_again_while_the_model_serves(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started while Redis was down said nothing of the data set Redis holds
    until the next model load, and one started before a ``ctr load`` of another data set
    finished kept saying the old one (session 47's note): the record is read again
    while the model serves, sooner while Redis does not answer, and each new record's
    warning is logged once."""
    from service import lifecycle
    from service.heldset import DATA_KEY
    from tests.helpers import until

    monkeypatch.setattr(lifecycle, "HELD_RETRY_S", 0.05, raising=False)
    monkeypatch.setattr(lifecycle, "HELD_RECHECK_S", 0.1, raising=False)
    port = free_port()
    proc = RedisProcess(port)  # not started yet: Redis is down at start-up
    s = settings_for(built, redis_url=proc.url, redis_connect_timeout_ms=200)
    try:
        with caplog.at_level("WARNING", logger="ctr.service"), TestClient(create_app(s)) as c:
            def said() -> Any:
                return c.get("/v1/models").json()["redis_data"]

            time.sleep(0.3)
            assert said() is None
            proc.start()
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            assert until(lambda: said() is not None, 10)
            assert said()["matches"] is True
            record = orjson.loads(Redis.from_url(proc.url).get(DATA_KEY))
            other = {**record, "name": "din_movielens", "source": "movielens"}
            caplog.clear()
            Redis.from_url(proc.url).set(DATA_KEY, orjson.dumps(other))
            assert until(lambda: said()["matches"] is False, 10)
            time.sleep(0.5)  # read again several times, unchanged: said once
            assert caplog.text.count("Redis holds another data set than model") == 1
            assert said()["held"] == {"name": "din_movielens", "source": "movielens"}
    finally:
        proc.stop()


def test_a_redis_holding_another_data_set_is_said(
    built: Built, redis_db: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A service pointed at another data set's database scored its users and items as
    its own (numeric IDs of two data sets collide), 200 and not degraded, silently.
    ``ctr load`` records the data set; the worker compares it with its bundle's, warns,
    and /v1/models says so (the loading machine's paths left out)."""
    import orjson

    from service.heldset import DATA_KEY
    from tests.helpers import until

    own = redis_db.get(DATA_KEY)
    assert own is not None  # written by the load
    try:
        with TestClient(create_app(settings_for(built))) as c:
            assert until(lambda: c.get("/v1/models").json()["redis_data"] is not None, 5)
            held = {"name": built.config.name, "source": "synthetic"}
            assert c.get("/v1/models").json()["redis_data"] == {
                "matches": True, "held": held, "complete": True, "replay": None}  # fmt: skip
        def said_with(record: dict[str, Any]) -> dict[str, Any]:
            """/v1/models' redis_data of a worker started while Redis holds ``record``."""
            redis_db.set(DATA_KEY, orjson.dumps(record))
            caplog.clear()
            with caplog.at_level("WARNING", logger="ctr.service"), TestClient(
                create_app(settings_for(built))
            ) as c:
                assert until(lambda: c.get("/v1/models").json()["redis_data"] is not None, 5)
                return c.get("/v1/models").json()["redis_data"]

        other = {**orjson.loads(own), "name": "din_movielens", "source": "movielens",
                 "options": {}, "path": "/data/movielens-100k"}  # fmt: skip
        named = {"name": "din_movielens", "source": "movielens"}
        assert said_with(other) == {"matches": False, "complete": True, "replay": None,
                                    "held": named}  # fmt: skip
        assert "Redis holds another data set than model" in caplog.text
        # what differs, not only the name and source (two loads of one config with
        # other options read as the same data set in the line)
        assert "source 'movielens' (this one's: 'synthetic')" in caplog.text
        assert "path 'movielens-100k' (this one's: None)" in caplog.text
        assert "did not complete" not in caplog.text
        # the same name and source
        assert said_with({**orjson.loads(own), "options": {"n_users": 7}})["matches"] is False
        assert "options {'n_users': 7} (this one's: {" in caplog.text
        # a load running, or cut short (session 38): said, matching or not
        got = said_with({**orjson.loads(own), "complete": False})
        assert got == {"matches": True, "held": held, "complete": False, "replay": None}
        assert "is running or did not complete" in caplog.text
        # a replay load (ctr load --replay-split, session 47): the same data set, said
        got = said_with({**orjson.loads(own), "replay": "test"})
        assert got == {"matches": True, "held": held, "complete": True, "replay": "test"}
        assert "Redis holds a replay load of" in caplog.text
    finally:
        redis_db.set(DATA_KEY, own)
