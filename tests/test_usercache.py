"""The encoded-user cache (``service.usercache``): kept rows are reused only while the
user's stored profile, stored behaviours and request context are what they were, so a
service with the cache answers exactly like one without it, through appends, profile
edits, context changes and cold starts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.store import user_key
from service.tracking import UserTracker
from service.usercache import UserRowCache, UserRows, digest
from tests.helpers import Built, build_and_load, settings_for


def rows(tag: int, raw: list[bytes], context: dict | None = None) -> UserRows:
    a = np.full((1, 1), tag, np.int64)
    return UserRows({"p": str(tag)}, digest(raw), context or {}, a, a, a, a, True)


def test_reused_only_for_the_same_inputs_and_bounded() -> None:
    cache = UserRowCache(2)
    kept = rows(1, [b"e1", b"e2"], {"hour": 3})
    cache.put("u1", kept)
    same = digest([b"e1", b"e2"])
    assert cache.get("u1", {"p": "1"}, same, {"hour": 3}) is kept
    for other in ([b"e1", b"e2", b"e3"], [b"e1"], [b"e1e2"], [b"e1", b"e", b"2"], [b"e2", b"e1"]):
        assert digest(other) != same  # appended, trimmed, or the same bytes split otherwise
        assert cache.get("u1", {"p": "1"}, digest(other), {"hour": 3}) is None
    assert cache.get("u1", {"p": "2"}, same, {"hour": 3}) is None  # profile
    assert cache.get("u1", {"p": "1"}, same, {"hour": 4}) is None  # context
    assert cache.get("u2", {"p": "1"}, same, {"hour": 3}) is None  # other user
    cache.put("u2", rows(2, []))
    cache.put("u1", rows(3, [b"x"]))  # replaces u1's entry, which becomes the newest
    cache.put("u3", rows(4, []))  # full: the oldest (u2) goes
    assert len(cache) == 2 and set(cache.data) == {"u1", "u3"}
    # a hit makes the user the newest: the one used least recently goes, not the first read
    assert cache.get("u1", {"p": "3"}, digest([b"x"]), {}) is not None
    cache.put("u4", rows(5, []))
    assert list(cache.data) == ["u1", "u4"]
    off = UserRowCache(0)
    off.put("u1", kept)
    assert len(off) == 0


def test_a_trusted_hit_makes_the_user_the_newest() -> None:
    tracker = UserTracker("redis://127.0.0.1:1/0", 0.1)  # never connected: live by hand
    tracker.live = True
    cache = UserRowCache(2)
    cache.put("u1", rows(1, []))
    cache.put("u2", rows(2, []))
    cache.note_read("u1", tracker.stamp())
    assert cache.trusted("u1", {}, tracker) is cache.data["u1"]
    assert cache.trusted("u2", {}, tracker) is None  # no read noted for u2
    cache.put("u3", rows(3, []))  # full: u2, used least recently, goes
    assert list(cache.data) == ["u1", "u3"] and "u1" in cache.stamps


def test_a_stamp_belongs_to_the_rows_it_was_noted_with() -> None:
    """Rows put anew (from another read) are not trusted under the stamp noted for the
    rows they replace: only a read noted for them makes them trusted. No stamp is kept
    for a user the cache holds no rows of (with the cache off, none at all: the stamps
    would grow by every user scored), nor for one evicted."""
    tracker = UserTracker("redis://127.0.0.1:1/0", 0.1)  # never connected: live by hand
    tracker.live = True
    cache = UserRowCache(2)
    cache.put("u1", rows(1, []))
    cache.note_read("u1", tracker.stamp())
    assert cache.trusted("u1", {}, tracker) is not None
    cache.put("u1", rows(2, [b"e"]))  # new rows: the old stamp is not theirs
    assert cache.trusted("u1", {}, tracker) is None
    cache.note_read("u1", tracker.stamp())
    assert cache.trusted("u1", {}, tracker) is cache.data["u1"]
    cache.note_read("u9", tracker.stamp())  # no rows kept for u9
    assert "u9" not in cache.stamps
    cache.put("u2", rows(3, []))
    cache.note_read("u2", tracker.stamp())
    cache.put("u3", rows(4, []))  # full: u1 goes, and its stamp with it
    assert set(cache.stamps) == {"u2"}
    off = UserRowCache(0)
    off.note_read("u1", tracker.stamp())
    assert not off.stamps


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("usercache"), "din")


@pytest.fixture(scope="module")
def clients(built: Built) -> Iterator[tuple[TestClient, TestClient]]:
    with (
        TestClient(create_app(settings_for(built))) as cached,
        TestClient(create_app(settings_for(built, user_cache_size=0))) as fresh,
    ):
        yield cached, fresh


def same_answer(clients: tuple[TestClient, TestClient], body: dict[str, Any]) -> dict:
    cached, fresh = clients
    a, b = cached.post("/v1/score", json=body), fresh.post("/v1/score", json=body)
    assert a.status_code == b.status_code == 200
    a_body, b_body = a.json(), b.json()
    for k in ("items", "cold_start", "degraded"):
        assert a_body[k] == b_body[k], k
    return a_body


def test_answers_like_no_cache_through_every_change(
    built: Built, clients: tuple[TestClient, TestClient]
) -> None:
    cached, _ = clients
    users_cache = cached.app.state.ctr.model.users
    redis = Redis.from_url(settings_for(built).redis_url, decode_responses=True)
    user = str(built.frame["user_id"].iloc[0])
    items = built.frame["item_id"].astype(str).unique()[:30].tolist()
    body: dict[str, Any] = {
        "user_id": user,
        "candidates": [{"item_id": i} for i in items],
        "explain": True,
    }
    first = same_answer(clients, body)
    assert user in users_cache.data
    kept = users_cache.data[user]
    assert same_answer(clients, body)["items"] == first["items"]
    assert users_cache.data[user] is kept  # same inputs: the kept rows were reused
    # a new behaviour: the history changes, so do the scores and the kept rows
    r = cached.post(
        "/v1/events",
        json={"user_id": user, "event_id": "uc-1", "item_id": items[0], "timestamp": 9.0},
    )
    assert r.status_code == 202 and r.json()["appended"] is True
    after_event = same_answer(clients, body)
    assert users_cache.data[user] is not kept
    assert after_event["items"] != first["items"]
    # an edited profile
    kept = users_cache.data[user]
    profile = redis.hgetall(user_key(user, "profile"))
    field = next(iter(profile))
    redis.hset(user_key(user, "profile"), field, profile[field] + "-edited")
    same_answer(clients, body)
    assert users_cache.data[user] is not kept
    # other context from the request
    kept = users_cache.data[user]
    same_answer(clients, {**body, "context": {"hour": "7"}})
    assert users_cache.data[user] is not kept
    same_answer(clients, {**body, "context": {"hour": "8"}})
    # a user the store does not know, then known
    newcomer = {**body, "user_id": "uc-newcomer"}
    assert same_answer(clients, newcomer)["cold_start"] is True
    redis.rpush(user_key("uc-newcomer", "seq"), orjson.dumps({"item_id": items[1]}))
    assert same_answer(clients, newcomer)["cold_start"] is False


def test_kept_rows_are_read_only(clients: tuple[TestClient, TestClient]) -> None:
    """Kept arrays are fed to later requests: nothing may write into them."""
    cached, _ = clients
    for kept in cached.app.state.ctr.model.users.data.values():
        for a in (kept.user_sparse, kept.user_dense, kept.hist, kept.hist_len):
            assert not a.flags.writeable
