"""``POST /v1/events`` under its settings, through the real app, a real exported bundle
and a real Redis: ``CTR_SEQUENCE_EVENT_TYPES``, ``CTR_SEQUENCE_KEEP``,
``CTR_EVENT_DEDUP_WINDOW`` and ``CTR_SEQUENCE_TTL_S``, and what a behaviour is stored as
(its event type, ``null`` features filled from the item table, feature keys the model
does not read). Each test asserts the exact response bodies and the exact stored keys:
the user's ``seq`` LIST, ``events`` ZSET and their TTLs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.store import event_keys, item_key, user_key
from tests.helpers import REDIS_URL, Built, build_bundle, settings_for

PREFIX = "evset-"  # every user and item this module writes
APPENDED = {"appended": True, "duplicate": False}
DUPLICATE = {"appended": False, "duplicate": True}
IGNORED = {"appended": False, "duplicate": False, "ignored": True}
OUTSIDE = {"appended": False, "duplicate": False, "outside_window": True}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("evset"), "din")


@pytest.fixture(scope="module")
def redis_db() -> Iterator[Redis]:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    for key in client.scan_iter(match="{u:" + PREFIX + "*"):
        client.delete(key)
    for feature in ("cate_id", "item_price"):
        for item in client.hkeys(item_key(feature)):
            if item.startswith(PREFIX):
                client.hdel(item_key(feature), item)
    client.close()


@contextmanager
def app_client(built: Built, **overrides: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(built, **overrides))) as client:
        yield client


def fresh_user(redis_db: Redis, name: str) -> str:
    user = PREFIX + name
    redis_db.delete(*event_keys(user))
    return user


def event(user: str, event_id: str, item: str, ts: float, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "event_id": event_id, "item_id": item, "timestamp": ts, **extra}


def post(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/events", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def stored(redis_db: Redis, user: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in redis_db.lrange(user_key(user, "seq"), 0, -1)]


def remembered(redis_db: Redis, user: str) -> list[str]:
    """The event IDs of the user's dedup window, oldest first (by the event's time)."""
    return redis_db.zrange(user_key(user, "event_ids"), 0, -1)


def behaviour(item: str, cate: str, ts: float, etype: str = "click") -> dict[str, Any]:
    return {"item_id": item, "cate_id": cate, "type": etype, "ts": ts}


def test_only_the_listed_event_types_enter_the_sequence(built: Built, redis_db: Redis) -> None:
    user = fresh_user(redis_db, "types")
    feats = {"features": {"cate_id": "c1"}}
    with app_client(built, sequence_event_types=" click, purchase ,") as client:
        view = event(user, "v1", PREFIX + "i1", 10.0, type="view", **feats)
        assert post(client, view) == IGNORED
        # nothing written, not even the event ID: the user has no keys at all
        assert redis_db.exists(*event_keys(user)) == 0
        assert post(client, view) == IGNORED  # not remembered: never a duplicate
        assert post(client, event(user, "c1", PREFIX + "i2", 11.0, **feats)) == APPENDED
        buy = event(user, "p1", PREFIX + "i3", 12.0, type="purchase", **feats)
        assert post(client, buy) == APPENDED
        assert post(client, event(user, "v2", PREFIX + "i4", 13.0, type="View", **feats)) == (
            IGNORED  # the listed types match exactly
        )
    assert stored(redis_db, user) == [
        behaviour(PREFIX + "i2", "c1", 11.0),  # no `type` in the event: a click
        behaviour(PREFIX + "i3", "c1", 12.0, "purchase"),
    ]
    assert remembered(redis_db, user) == ["c1", "p1"]


@pytest.mark.parametrize("keep", [3, 25, 0], ids=["below-L", "above-L", "zero-is-L"])
def test_sequence_keep_trims_to_the_newest(built: Built, redis_db: Redis, keep: int) -> None:
    length = built.config.max_seq_len
    assert length == 20 and keep != length  # each case differs from the model's L or is 0
    kept = keep or length
    user = fresh_user(redis_db, f"keep-{keep}")
    sent = kept + 4
    with app_client(built, sequence_keep=keep) as client:
        for k in range(sent):
            body = event(user, f"k{k:02d}", f"{PREFIX}i{k}", 100.0 + k, features={"cate_id": "c"})
            assert post(client, body) == APPENDED
        want = [behaviour(f"{PREFIX}i{k}", "c", 100.0 + k) for k in range(4, sent)]
        assert stored(redis_db, user) == want
        # older than the oldest kept behaviour: trimmed at once, so not stored
        late = event(user, "late", PREFIX + "late", 103.5, features={"cate_id": "c"})
        assert post(client, late) == OUTSIDE
        assert stored(redis_db, user) == want
    # the window (1000) holds every stored event's ID; the late one is not stored
    assert len(remembered(redis_db, user)) == sent


@pytest.mark.parametrize(("window", "keep"), [(7, 5), (3, 5)], ids=["window", "keep"])
def test_dedup_window_remembers_the_newest_stored_event_ids(
    built: Built, redis_db: Redis, window: int, keep: int
) -> None:
    """The window holds the IDs of the newest stored events, never fewer than the list
    keeps: a retry of any event the list holds appends nothing, whatever the setting (a
    window of 3 under a list of 5 used to forget kept events and store them twice)."""
    user = fresh_user(redis_db, f"dedup-{window}")
    sent, held = 9, max(window, keep)

    def ev(k: int, ts: float | None = None) -> dict[str, Any]:
        at = 100.0 + k if ts is None else ts
        return event(user, f"d{k:02d}", f"{PREFIX}i{k}", at, features={"cate_id": "c"})

    with app_client(built, event_dedup_window=window, sequence_keep=keep) as client:
        for k in range(sent):
            assert post(client, ev(k)) == APPENDED
        kept = [behaviour(f"{PREFIX}i{k}", "c", 100.0 + k) for k in range(sent - keep, sent)]
        assert stored(redis_db, user) == kept
        ids = [f"d{k:02d}" for k in range(sent - held, sent)]
        assert remembered(redis_db, user) == ids
        for k in range(sent - keep, sent):  # every kept event: a duplicate
            assert post(client, ev(k)) == DUPLICATE
        # forgotten, and older than every kept behaviour: not stored, nor remembered (it
        # would push a kept event's ID out); a retry is outside again
        for _ in range(2):
            assert post(client, ev(sent - held - 1)) == OUTSIDE
        assert stored(redis_db, user) == kept and remembered(redis_db, user) == ids
        # a new event pushes the oldest ID out, as its behaviour pushes the oldest out
        assert post(client, ev(sent)) == APPENDED
        assert remembered(redis_db, user) == [*ids[1:], f"d{sent:02d}"]
        assert stored(redis_db, user) == [
            *kept[1:],
            behaviour(f"{PREFIX}i{sent}", "c", 100.0 + sent),
        ]


def test_a_kept_event_is_remembered_whatever_was_stored_after_it(
    built: Built, redis_db: Redis
) -> None:
    """The window drops the oldest IDs by the events' time, never one whose behaviour
    is still kept: late events stored after an event (older than it, newer than the
    oldest kept) used to push its ID out while its behaviour stayed, and its retry was
    stored twice once more than ``window - keep`` of them came."""
    user = fresh_user(redis_db, "late-many")
    keep, window = 5, 7

    def ev(eid: str, ts: float) -> dict[str, Any]:
        return event(user, eid, f"{PREFIX}{eid}", ts, features={"cate_id": "c"})

    with app_client(built, event_dedup_window=window, sequence_keep=keep) as client:
        for k in range(keep):
            assert post(client, ev(f"a{k}", 100.0 + k)) == APPENDED
        assert post(client, ev("newest", 200.0)) == APPENDED
        late = [f"late{k}" for k in range(window + 1)]  # more than window - keep
        for k, eid in enumerate(late):
            assert post(client, ev(eid, 150.0 + k)) == APPENDED
        kept = [behaviour(f"{PREFIX}{e}", "c", 150.0 + k) for k, e in enumerate(late)][-4:]
        kept.append(behaviour(f"{PREFIX}newest", "c", 200.0))
        assert stored(redis_db, user) == kept
        assert post(client, ev("newest", 200.0)) == DUPLICATE
        assert stored(redis_db, user) == kept
        # the newest `window` by time
        assert remembered(redis_db, user) == [*late[-(window - 1) :], "newest"]


def test_event_ids_an_earlier_version_recorded_are_known(built: Built, redis_db: Redis) -> None:
    """Versions before session 27 keep the IDs in ``{u:<id>}:events``, scored by arrival
    time: that set is checked (a retry of an event one of them stored is a duplicate)
    and written too (so is a retry that reaches one of them, mid-deploy or after a
    rollback), within the same window."""
    user = fresh_user(redis_db, "upgrade")
    legacy = user_key(user, "events")
    olds = [behaviour(f"{PREFIX}o{k}", "c", 100.0 + k) for k in range(2)]
    redis_db.rpush(user_key(user, "seq"), *[orjson.dumps(b) for b in olds])
    redis_db.zadd(legacy, {"o0": 1, "o1": 2})  # arrival times, older than any now

    def ev(eid: str, ts: float) -> dict[str, Any]:
        return event(user, eid, f"{PREFIX}{eid}", ts, features={"cate_id": "c"})

    with app_client(built, event_dedup_window=3, sequence_keep=3) as client:
        assert post(client, ev("o0", 100.0)) == DUPLICATE
        assert post(client, ev("o1", 101.0)) == DUPLICATE
        assert post(client, ev("n0", 102.0)) == APPENDED
        assert stored(redis_db, user) == [*olds, behaviour(f"{PREFIX}n0", "c", 102.0)]
        assert redis_db.zrange(legacy, 0, -1) == ["o0", "o1", "n0"]
        assert post(client, ev("n1", 103.0)) == APPENDED
        assert redis_db.zrange(legacy, 0, -1) == ["o1", "n0", "n1"]  # the newest 3
        assert remembered(redis_db, user) == ["n0", "n1"]


def ttls(redis_db: Redis, user: str) -> tuple[int, int]:
    return redis_db.ttl(user_key(user, "seq")), redis_db.ttl(user_key(user, "event_ids"))


def expire_both(redis_db: Redis, user: str, seconds: int) -> None:
    for suffix in ("seq", "event_ids"):
        assert redis_db.expire(user_key(user, suffix), seconds)


def test_sequence_ttl_renewed_by_each_event(built: Built, redis_db: Redis) -> None:
    user = fresh_user(redis_db, "ttl")
    feats = {"features": {"cate_id": "c"}}
    with app_client(built, sequence_ttl_s=1000) as client:
        assert post(client, event(user, "t1", PREFIX + "i1", 10.0, **feats)) == APPENDED
        seq_ttl, events_ttl = ttls(redis_db, user)
        assert 900 < seq_ttl <= 1000 and 900 < events_ttl <= 1000
        expire_both(redis_db, user, 100)
        assert post(client, event(user, "t2", PREFIX + "i2", 11.0, **feats)) == APPENDED
        seq_ttl, events_ttl = ttls(redis_db, user)
        assert 900 < seq_ttl <= 1000 and 900 < events_ttl <= 1000  # renewed
        expire_both(redis_db, user, 100)
        # a retry writes nothing, its expiry included
        assert post(client, event(user, "t2", PREFIX + "i2", 11.0, **feats)) == DUPLICATE
        seq_ttl, events_ttl = ttls(redis_db, user)
        assert 0 < seq_ttl <= 100 and 0 < events_ttl <= 100
    assert stored(redis_db, user) == [
        behaviour(PREFIX + "i1", "c", 10.0),
        behaviour(PREFIX + "i2", "c", 11.0),
    ]


def test_sequence_ttl_zero_never_expires(built: Built, redis_db: Redis) -> None:
    user = fresh_user(redis_db, "ttl-0")
    feats = {"features": {"cate_id": "c"}}
    with app_client(built, sequence_ttl_s=0) as client:
        for k in range(2):
            body = event(user, f"n{k}", f"{PREFIX}i{k}", 10.0 + k, **feats)
            assert post(client, body) == APPENDED
    assert ttls(redis_db, user) == (-1, -1)  # both keys exist, with no expiry
    assert len(stored(redis_db, user)) == 2 and remembered(redis_db, user) == ["n0", "n1"]


def test_a_type_other_than_click_is_stored_with_its_type(built: Built, redis_db: Redis) -> None:
    """With no CTR_SEQUENCE_EVENT_TYPES every type is stored, as sent; a `type` or `ts`
    among the features does not override the event's (no sequence reads them here)."""
    user = fresh_user(redis_db, "other-type")
    feats = {"cate_id": "c5", "type": "bundle-offer", "ts": 1.0}
    with app_client(built) as client:
        body = event(user, "a1", PREFIX + "i1", 7.0, type="add_to_cart", features=feats)
        assert post(client, body) == APPENDED
    assert stored(redis_db, user) == [behaviour(PREFIX + "i1", "c5", 7.0, "add_to_cart")]


def test_null_features_are_filled_from_the_item_table(built: Built, redis_db: Redis) -> None:
    """A `null` feature counts as absent: an item feature a sequence reads (`cate_id`) is
    then read from `ctr:item:<feature>`; one no sequence reads (`item_price`) is left out
    of the behaviour, even though the item table has it."""
    user = fresh_user(redis_db, "nulls")
    item, bare = PREFIX + "known", PREFIX + "unknown"
    redis_db.hset(item_key("cate_id"), item, "c77")
    redis_db.hset(item_key("item_price"), item, "9.5")
    redis_db.hdel(item_key("cate_id"), bare)
    nulls = {"cate_id": None, "item_price": None}
    with app_client(built) as client:
        assert post(client, event(user, "n1", item, 20.0, features=nulls)) == APPENDED
        assert post(client, event(user, "n2", bare, 21.0, features=nulls)) == APPENDED
    assert stored(redis_db, user) == [
        behaviour(item, "c77", 20.0),
        {"item_id": bare, "type": "click", "ts": 21.0},  # nothing to fill it from
    ]


def test_feature_keys_the_model_does_not_read_are_stored(built: Built, redis_db: Redis) -> None:
    """Every non-null feature an event sends is stored in the behaviour as sent, read by
    this model or not (another model version may read it); scoring ignores the rest."""
    user = fresh_user(redis_db, "extra-keys")
    feats = {"cate_id": "c3", "item_price": 4.5, "colour": "red", "promo": 2, "flag": True,
             "gone": None}  # fmt: skip
    with app_client(built) as client:
        assert post(client, event(user, "x1", PREFIX + "i1", 30.0, features=feats)) == APPENDED
        r = client.post(
            "/v1/score", json={"user_id": user, "candidates": [{"item_id": PREFIX + "i2"}]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["cold_start"] is False
    assert stored(redis_db, user) == [
        {
            "item_id": PREFIX + "i1",
            "cate_id": "c3",
            "item_price": 4.5,
            "colour": "red",
            "promo": 2,
            "flag": True,
            "type": "click",
            "ts": 30.0,
        }
    ]


def test_counts_redis_refuses_and_blank_text_are_refused_or_empty_at_start() -> None:
    """A settings review: CTR_SEQUENCE_KEEP=1e20 started, then every /v1/events was a
    503 (the append script's LTRIM took no such number); CTR_IMPRESSION_MAXLEN alike
    lost every impression; CTR_INFERENCE_CONCURRENCY=2000 started 2000 threads (a
    traceback where they ran out); CTR_OPS_LIBRARY=" " turned the native code off and
    CTR_IMPRESSION_STREAM=" " logged to a key named " "."""
    from pydantic import ValidationError

    from service.settings import MAX_REDIS_COUNT, Settings

    for name in ("sequence_keep", "event_dedup_window", "impression_maxlen"):
        with pytest.raises(ValidationError, match="less than or equal to 100000000000000"):
            Settings(**{name: 10**20})
        assert getattr(Settings(**{name: MAX_REDIS_COUNT}), name) == MAX_REDIS_COUNT
    with pytest.raises(ValidationError, match="less than or equal to 256"):
        Settings(inference_concurrency=2000)
    blank = Settings(ops_library=" ", impression_stream="  ", reload_channel=" ",
                     models_dir=" models ")  # fmt: skip
    assert blank.ops_library == blank.impression_stream == blank.reload_channel == ""
    assert blank.models_dir == "models"
