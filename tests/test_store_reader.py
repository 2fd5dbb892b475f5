"""The scoring request's Redis reads (``service.store.Reader``) against a private
redis-server: the replies it returns, and that a read cut off half-way (the request
deadline) or a connection the server closed never hands one request another's replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.app import create_app
from service.loader import load_into_redis
from service.settings import MAX_TTL_S, Settings
from service.store import (
    APPENDED,
    OUTSIDE_WINDOW,
    SEEN,
    EventWriter,
    Reader,
    event_keys,
    fetch,
    fetch_items,
    make_client,
    user_key,
)
from tests.helpers import Built, build_bundle, redis_asleep
from tests.redis_proc import RedisProcess, private_redis
from tests.test_reliability import degraded_count, settings_for


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("reader"), "din")


@pytest.fixture(scope="module")
def rp(built: Built) -> Iterator[RedisProcess]:
    with private_redis() as proc:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        yield proc


def body(user: str) -> dict:
    return {"user_id": user, "candidates": [{"item_id": f"i{k}"} for k in range(40)]}


def two_users(rp: RedisProcess) -> tuple[str, str]:
    """Two users whose stored histories differ (so their scores differ)."""
    r = rp.client()
    users = sorted(k.split("}")[0][3:] for k in r.scan_iter("{u:*}:seq"))
    first = users[0]
    for other in users[1:]:
        if r.lrange(user_key(other, "seq"), 0, -1) != r.lrange(user_key(first, "seq"), 0, -1):
            return first, other
    raise AssertionError("no two users with different histories")


@pytest.mark.parametrize("protocol", [2, 3])
def test_fetch_returns_what_is_stored(rp: RedisProcess, protocol: int) -> None:
    """Profile, the newest L behaviours and item features, as stored, over RESP2 and RESP3
    (where HGETALL answers a map instead of a flat list)."""
    r = rp.client()
    user = two_users(rp)[0]
    stored = [orjson.loads(x) for x in r.lrange(user_key(user, "seq"), -5, -1)]
    profile = r.hgetall(user_key(user, "profile"))
    r.hset("ctr:item:cate_id", mapping={"ia": "c1", "ib": "c2"})

    async def go() -> tuple:
        client = make_client(f"{rp.url}?protocol={protocol}", False, 1.0, 1.0, 4)
        reader = Reader(client, 4)
        try:
            data = await fetch(reader, user, 5, {"cate_id": ["ib", "missing", "ia"]})
            items = await fetch_items(reader, {"cate_id": ["ia"]})
            nobody = await fetch(reader, "nobody-here", 5, {})
            return data, items, nobody, len(reader.idle)
        finally:
            await reader.aclose()
            await client.aclose()

    data, items, nobody, idle = asyncio.run(go())
    assert data.profile == profile and data.profile
    assert data.events == stored and len(stored) == 5
    assert data.item_features == {"cate_id": ["c2", None, "c1"]}
    assert data.found is True
    assert items == {"cate_id": ["c1"]}
    assert nobody.found is False and nobody.profile == {} and nobody.events == []
    assert idle == 1  # one connection, reused by every call in turn


def test_concurrent_reads_stay_within_size(rp: RedisProcess) -> None:
    """Twenty reads at once on a reader of size 3 open at most 3 connections, and each
    gets its own user's replies."""
    r = rp.client()
    users = sorted(k.split("}")[0][3:] for k in r.scan_iter("{u:*}:seq"))[:20]
    expected = {u: [orjson.loads(x) for x in r.lrange(user_key(u, "seq"), -8, -1)] for u in users}
    before = len(r.client_list())

    async def go() -> tuple[list, int, int]:
        client = make_client(rp.url, False, 1.0, 1.0, 3)
        reader = Reader(client, 3)
        peak = 0

        async def one(u: str) -> list:
            nonlocal peak
            data = await fetch(reader, u, 8, {})
            peak = max(peak, len(rp.client().client_list()) - before - 1)
            return data.events

        try:
            got = await asyncio.gather(*(one(u) for u in users))
            return got, peak, len(reader.idle)
        finally:
            await reader.aclose()
            await client.aclose()

    got, peak, idle = asyncio.run(go())
    assert dict(zip(users, got, strict=True)) == expected
    assert idle <= 3 and peak <= 3


def test_cut_off_read_never_answers_the_next_request(built: Built, rp: RedisProcess) -> None:
    """A read that hits the Redis deadline is abandoned with its reply still on the way.
    Its connection must be closed: were it reused, the next request (another user) would
    read the late reply and be scored with the first user's history."""
    a, b = two_users(rp)
    # every request reads (a kept user would need no read: CTR_USER_TRACKING)
    settings = settings_for(built, rp.url, redis_timeout_ms=100, user_tracking=False)
    with TestClient(create_app(settings)) as c:
        ref_a = c.post("/v1/score", json=body(a)).json()
        ref_b = c.post("/v1/score", json=body(b)).json()
        assert not ref_a["degraded"] and not ref_b["degraded"]
        assert ref_a["items"] != ref_b["items"]
        blocker = redis_asleep(rp.url, 0.5)
        cut = c.post("/v1/score", json=body(a)).json()
        blocker.join()
        assert cut["degraded"] is True
        time.sleep(0.1)  # the abandoned reply has arrived by now
        after_b = c.post("/v1/score", json=body(b)).json()
        after_a = c.post("/v1/score", json=body(a)).json()
        assert after_b["degraded"] is False and after_b["items"] == ref_b["items"]
        assert after_a["degraded"] is False and after_a["items"] == ref_a["items"]


def test_connection_closed_by_server_is_retried(built: Built, rp: RedisProcess) -> None:
    """An idle connection the server closed (timeout, CLIENT KILL, restart) costs a retry
    on a fresh connection, not a degraded response."""
    a = two_users(rp)[0]
    with TestClient(create_app(settings_for(built, rp.url))) as c:
        ref = c.post("/v1/score", json=body(a)).json()
        assert ref["degraded"] is False
        before = degraded_count(c)
        killed = rp.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert int(killed) >= 1
        again = c.post("/v1/score", json=body(a)).json()
        assert again["degraded"] is False and again["items"] == ref["items"]
        assert degraded_count(c) == before


def test_error_reply_mid_pipeline_never_answers_the_next_request(
    built: Built, rp: RedisProcess
) -> None:
    """A command that fails (here HGETALL on a key of the wrong type) stops the reads with
    the other replies still unread: the connection must not be reused."""
    a, b = two_users(rp)
    r = rp.client()
    with TestClient(create_app(settings_for(built, rp.url))) as c:
        ref_b = c.post("/v1/score", json=body(b)).json()
        saved = r.hgetall(user_key(a, "profile"))
        r.delete(user_key(a, "profile"))
        r.set(user_key(a, "profile"), "not a hash")
        try:
            broken = c.post("/v1/score", json=body(a))
            assert broken.status_code == 200 and broken.json()["degraded"] is True
            after_b = c.post("/v1/score", json=body(b)).json()
            assert after_b["degraded"] is False and after_b["items"] == ref_b["items"]
        finally:
            r.delete(user_key(a, "profile"))
            if saved:
                r.hset(user_key(a, "profile"), mapping=saved)


def test_close_while_a_read_is_in_flight(rp: RedisProcess) -> None:
    """A read in flight when the reader closes (shutdown under traffic) finishes, but its
    connection is not kept: nothing stays open, and later reads are refused."""
    user = two_users(rp)[0]

    async def go() -> tuple[bool, int, bool]:
        client = make_client(rp.url, False, 2.0, 1.0, 4)
        reader = Reader(client, 4)
        blocker = redis_asleep(rp.url, 0.5)  # returns once Redis answers nothing
        read = asyncio.create_task(fetch(reader, user, 5, {}))
        await asyncio.sleep(0.05)
        assert not read.done()  # in flight as the reader closes
        await reader.aclose()
        data = await read
        blocker.join()
        refused = False
        try:
            await fetch(reader, user, 5, {})
        except RedisConnectionError:
            refused = True
        await client.aclose()
        return data.found, len(reader.idle), refused

    found, idle, refused = asyncio.run(go())
    assert found and idle == 0 and refused
    reads = [c for c in rp.client().client_list() if c.get("cmd") in ("hgetall", "lrange")]
    assert reads == []  # the server holds no connection the reader used


def test_a_timeout_is_not_retried(rp: RedisProcess) -> None:
    """Only a connection error on a reused connection earns a second try: a read that
    times out (a slow server) is given up at once, without opening another connection."""
    import redis.exceptions

    user = two_users(rp)[0]
    r = rp.client()

    def accepted() -> int:
        return int(r.info("stats")["total_connections_received"])

    async def go() -> tuple[bool, int]:
        client = make_client(rp.url, False, 0.2, 1.0, 4)  # 200 ms socket timeout
        reader = Reader(client, 4)
        try:
            await fetch(reader, user, 5, {})  # leaves one idle connection to reuse
            before = accepted()
            blocker = redis_asleep(rp.url, 0.8)  # returns once Redis answers nothing
            try:
                await fetch(reader, user, 5, {})
                timed_out = False
            except redis.exceptions.TimeoutError:
                timed_out = True
            blocker.join()
            await asyncio.sleep(0.1)
            return timed_out, accepted() - before
        finally:
            await reader.aclose()
            await client.aclose()

    timed_out, new_connections = asyncio.run(go())
    assert timed_out
    # the blocker's and redis_asleep's probe's; a retry would have opened one more
    assert new_connections == 2


def test_behaviours_come_back_in_time_order(rp: RedisProcess) -> None:
    """A list stored out of time order (by hand, or by a version that appended by
    arrival) is still read for scoring in timestamp order, as training histories are.
    Behaviours without a timestamp (written by `ctr load`) stay first, in their order."""
    r = rp.client()
    user = "time-order-user"
    r.delete(user_key(user, "seq"))
    stored = [{"item_id": "old1"}, {"item_id": "old2"},  # from `ctr load`: no ts
              {"item_id": "b", "ts": 20.0}, {"item_id": "a", "ts": 10.0},  # a: retried
              {"item_id": "c", "ts": 30}, {"item_id": "c2", "ts": 30.0}]  # fmt: skip
    r.rpush(user_key(user, "seq"), *[orjson.dumps(e) for e in stored])

    async def go() -> list[str]:
        client = make_client(rp.url, False, 1.0, 1.0, 4)
        reader = Reader(client, 4)
        try:
            data = await fetch(reader, user, 10, {})
            return [e["item_id"] for e in data.events]
        finally:
            await reader.aclose()
            await client.aclose()

    assert asyncio.run(go()) == ["old1", "old2", "a", "b", "c", "c2"]


def test_events_are_stored_in_time_order_and_trimmed_by_time(rp: RedisProcess) -> None:
    """The append script keeps the list in time order: a late event goes in at its place,
    the trim drops the oldest by time (training keeps the newest L by time), an event
    older than all of the newest `keep` is not stored, and a retry writes nothing."""
    r = rp.client()
    user = "append-order-user"
    seq, ids = user_key(user, "seq"), user_key(user, "event_ids")
    r.delete(*event_keys(user))
    r.rpush(seq, *[orjson.dumps({"item_id": f"o{k}"}) for k in range(3)])  # `ctr load`

    def stored() -> list[str]:
        return [orjson.loads(x)["item_id"] for x in r.lrange(seq, 0, -1)]

    async def go(events: list[tuple[str, float]], keep: int = 5) -> list[int]:
        client = make_client(rp.url, False, 1.0, 1.0, 4)
        writer = EventWriter(client, window=100)
        try:
            return [
                await writer.append(user, eid, ts, {"item_id": eid, "ts": ts}, keep)
                for eid, ts in events
            ]
        finally:
            await client.aclose()

    assert asyncio.run(go([("e10", 10.0), ("e20", 20.0)])) == [APPENDED, APPENDED]
    assert stored() == ["o0", "o1", "o2", "e10", "e20"]
    # late: goes in before e20; the trim drops the oldest (a behaviour with no time)
    assert asyncio.run(go([("e15", 15.0)])) == [APPENDED]
    assert stored() == ["o1", "o2", "e10", "e15", "e20"]
    # equal timestamps keep arrival order
    assert asyncio.run(go([("e15b", 15.0), ("e30", 30)])) == [APPENDED, APPENDED]
    assert stored() == ["e10", "e15", "e15b", "e20", "e30"]
    # older than everything kept: neither stored nor remembered; a retry is outside again
    assert asyncio.run(go([("e1", 1.0)])) == [OUTSIDE_WINDOW]
    assert stored() == ["e10", "e15", "e15b", "e20", "e30"]
    assert asyncio.run(go([("e1", 1.0), ("e15", 15.0), ("e12", 12.0)])) == [
        OUTSIDE_WINDOW,
        SEEN,
        APPENDED,
    ]
    assert stored() == ["e12", "e15", "e15b", "e20", "e30"]
    assert r.zcard(ids) == 6


def appends(
    rp: RedisProcess, user: str, events: list[str], ts: float = 1.0, keep: int = 5, **writer: Any
) -> list[int]:
    """``events`` appended in turn at time ``ts`` through one fresh client and one
    ``EventWriter(window=100, **writer)``; each behaviour is ``{"item_id": <event_id>}``."""

    async def go() -> list[int]:
        client = make_client(rp.url, False, 1.0, 1.0, 4)
        try:
            w = EventWriter(client, **{"window": 100, **writer})
            return [await w.append(user, e, ts, {"item_id": e, "ts": ts}, keep) for e in events]
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_equal_times_keep_every_kept_events_id(rp: RedisProcess) -> None:
    """The dedup set is ordered by the events' time, and among equal times by ID, not
    by arrival: at the oldest kept time none goes, so a kept event whose ID sorts first
    is not the one dropped. Many events at one time keep it within twice the window."""
    r = rp.client()
    user = "append-ties-user"
    seq, ids = user_key(user, "seq"), user_key(user, "event_ids")
    r.delete(*event_keys(user))

    def go(events: list[str]) -> list[int]:
        return appends(rp, user, events, ts=7.0, keep=3, window=3)

    assert go(["d", "c", "b", "a"]) == [APPENDED] * 4
    assert [orjson.loads(x)["item_id"] for x in r.lrange(seq, 0, -1)] == ["c", "b", "a"]
    assert go(["c", "b", "a"]) == [SEEN] * 3
    assert r.llen(seq) == 3
    assert go([f"x{k:02d}" for k in range(20)]) == [APPENDED] * 20
    assert r.zcard(ids) == 6


def test_a_rolling_deploy_stores_no_retry_twice(rp: RedisProcess) -> None:
    """Workers of the previous release (its script, tests/data/append_event_s26.lua:
    ``{u:<id>}:events`` only) and of this one append for the same user, in both orders:
    a retry that reaches a worker of the other version is a duplicate."""
    from pathlib import Path

    r = rp.client()
    user = "append-mixed-user"
    keys = event_keys(user)
    r.delete(*keys)
    legacy = (Path(__file__).parent / "data" / "append_event_s26.lua").read_text()
    old_script = r.register_script(legacy)

    def old(eid: str, ts: float) -> int:
        args = [eid, ts, orjson.dumps({"item_id": eid, "ts": ts}), 5, 100, 0]
        return int(old_script(keys=[keys[0], keys[2]], args=args))

    def new(eid: str, ts: float) -> int:
        return appends(rp, user, [eid], ts=ts)[0]

    assert new("e1", 1.0) == APPENDED
    assert old("e1", 1.0) == SEEN  # stored by this version, retried on the old one
    assert old("e2", 2.0) == APPENDED
    assert new("e3", 3.0) == APPENDED
    assert new("e2", 2.0) == SEEN  # stored by the old one, retried here
    assert old("e3", 3.0) == SEEN
    assert [orjson.loads(x)["item_id"] for x in r.lrange(keys[0], 0, -1)] == ["e1", "e2", "e3"]


def test_the_legacy_ids_can_be_left_alone(rp: RedisProcess) -> None:
    """CTR_EVENT_LEGACY_IDS=false (once no earlier release runs): ``{u:<id>}:events`` is
    neither checked nor written."""
    r = rp.client()
    user = "append-nolegacy-user"
    keys = event_keys(user)
    r.delete(*keys)
    r.zadd(keys[2], {"e1": 1})

    assert appends(rp, user, ["e1", "e2"], legacy=False) == [APPENDED] * 2
    assert r.zrange(keys[2], 0, -1) == ["e1"] and r.zrange(keys[1], 0, -1) == ["e1", "e2"]
    assert appends(rp, user, ["e3"], legacy=True) == [APPENDED]
    assert r.zrange(keys[2], 0, -1) == ["e1", "e3"]


def test_a_ttl_of_zero_removes_an_earlier_expiry(rp: RedisProcess) -> None:
    """CTR_SEQUENCE_TTL_S set back to 0 ("never"): the next event removes the expiry an
    earlier setting put on the user's keys (the history, newly stored events included,
    would vanish at the old deadline)."""
    r = rp.client()
    user = "append-persist-user"
    keys = event_keys(user)
    r.delete(*keys)

    assert appends(rp, user, ["e1"], ttl_s=3600) == [APPENDED]
    assert all(0 < r.ttl(k) <= 3600 for k in keys)
    assert appends(rp, user, ["e2"], ttl_s=0) == [APPENDED]
    assert [r.ttl(k) for k in keys] == [-1, -1, -1]


def test_a_failed_append_is_not_remembered(rp: RedisProcess) -> None:
    """If the behaviour cannot be written, its event_id is not recorded: the retry stores
    it instead of answering `duplicate`."""
    r = rp.client()
    user = "append-fail-user"
    seq, ids = user_key(user, "seq"), user_key(user, "event_ids")
    r.delete(*event_keys(user))
    r.set(seq, "not a list")

    with pytest.raises(ResponseError):
        appends(rp, user, ["e1"], ts=5.0)
    assert r.zscore(ids, "e1") is None
    r.delete(seq)
    assert appends(rp, user, ["e1"], ts=5.0) == [APPENDED]
    assert [orjson.loads(x)["item_id"] for x in r.lrange(seq, 0, -1)] == ["e1"]


def test_the_sequence_ttl_is_bounded() -> None:
    """Past the bound EXPIRE fails inside the append script, after the behaviour was
    stored: the event would be answered 503 though stored."""
    assert Settings(sequence_ttl_s=MAX_TTL_S).sequence_ttl_s == MAX_TTL_S
    with pytest.raises(ValidationError, match="sequence_ttl_s"):
        Settings(sequence_ttl_s=MAX_TTL_S + 1)


@pytest.mark.parametrize("ttl", [0, 100, MAX_TTL_S])
def test_sequence_ttl_expires_an_idle_users_keys(rp: RedisProcess, ttl: int) -> None:
    """CTR_SEQUENCE_TTL_S: each event (re)sets the expiry of the user's behaviours and
    event IDs, so a user who stops sending events leaves no keys behind; 0: no expiry."""
    r = rp.client()
    user = f"ttl-user-{ttl}"
    seq, ids = user_key(user, "seq"), user_key(user, "event_ids")
    r.delete(*event_keys(user))

    assert appends(rp, user, ["e1"], ttl_s=ttl) == [APPENDED]
    if ttl:
        assert 0 < r.ttl(seq) <= ttl and 0 < r.ttl(ids) <= ttl
        r.expire(seq, 5)
        r.expire(ids, 5)
        assert appends(rp, user, ["e2"], ttl_s=ttl) == [APPENDED]  # a new event renews both
        assert r.ttl(seq) > 5 and r.ttl(ids) > 5
    else:
        assert r.ttl(seq) == -1 and r.ttl(ids) == -1
