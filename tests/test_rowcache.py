"""The encoded-row cache's own behaviour. Through the real app (a cached row scores like
a fresh one, never shadows request features, is not kept from a store outage, expires
with the TTL) it is tested in test_service.py, on that module's bundle."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service import rowcache
from service.rowcache import ItemRowCache
from tests.helpers import ShiftedClock


def rows(ids: list[str], base: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(ids)
    sparse = np.arange(base, base + 2 * k, dtype=np.int64).reshape(k, 2)
    return sparse, (sparse[:, :1] / 10).astype(np.float32)


def test_lookup_store_and_gather() -> None:
    cache = ItemRowCache(60, 8, 2, 1)
    assert cache.lookup(["a", "b"]).tolist() == [-1, -1]
    assert cache.lookup([]).shape == (0,)
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
    assert cache.lookup([]).shape == (0,)  # also with rows cached


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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ShiftedClock:
    """The caches' clock, moved on by the tests instead of sleeping."""
    import service.itemcache
    import service.rowcache

    return ShiftedClock().install(monkeypatch, service.rowcache, service.itemcache)


def test_expiry_and_disabled(clock: ShiftedClock) -> None:
    cache = ItemRowCache(5, 4, 2, 1)
    cache.store(["a"], *rows(["a"], 1))
    clock.advance(4.9)
    assert cache.lookup(["a"])[0] >= 0
    clock.advance(0.2)
    assert cache.lookup(["a"])[0] == -1
    # every ID cached, one of them stale: only that one misses
    mixed = ItemRowCache(40, 4, 2, 1)
    mixed.store(["b"], *rows(["b"], 5))
    clock.advance(25)
    mixed.store(["c"], *rows(["c"], 7))
    fresh = mixed.lookup(["c"])[0]
    clock.advance(20)  # b is 45 s old now, c 20 s
    assert mixed.lookup(["c", "b"]).tolist() == [fresh, -1]
    assert mixed.lookup(["c"]).tolist() == [fresh]
    off = ItemRowCache(0, 4, 2, 1)
    off.store(["a"], *rows(["a"], 1))
    assert off.lookup(["a"]).tolist() == [-1] and len(off) == 0


def test_a_row_never_outlives_the_item_values_it_was_encoded_from(clock: ShiftedClock) -> None:
    """A row encoded from item-cache values that are already old expires with those
    values, not a full TTL later (staleness stays within CTR_ITEM_CACHE_TTL_S); a row
    of the same request whose values were fetched fresh keeps the whole TTL."""
    from service.features import ItemColumns
    from service.itemcache import ItemCache

    ttl = 60.0
    items = ItemCache(ttl, 100)
    put_at = clock.monotonic()
    items.put("cate_id", ["z"], ["c9"], put_at)
    clock.advance(30)
    cols = ItemColumns({"item_id": ["z", "y"], "cate_id": [None, None]}, {"cate_id": [0, 1]})
    assert cols.take_cached(items) == {"cate_id": ["y"]}  # z from the cache, y to fetch
    assert cols.values["cate_id"][0] == "c9"
    assert cols.expires.tolist() == [put_at + ttl, np.inf]  # y used no cached value
    cache = ItemRowCache(ttl, 4, 2, 1)
    cache.store(["z", "y"], *rows(["z", "y"], 1), np.array([cols.expires[0], np.inf]))
    assert (cache.lookup(["z", "y"]) >= 0).all()
    clock.advance(45)  # 75 s after z's value was cached, 45 s after the rows
    assert cache.lookup(["z", "y"])[0] == -1  # z's value has expired: so has its row
    assert cache.lookup(["y"])[0] >= 0  # y's row: within its TTL


def test_the_item_cache_keeps_the_newer_read_and_dates_it_from_the_read() -> None:
    """Two requests read the same item while it changes; their reads finish in either
    order. The value of the read that started later stays, and a value expires a TTL
    after its read began, not after it was put (staleness stays within the TTL)."""
    from service.itemcache import ItemCache

    ttl = 60.0
    cache = ItemCache(ttl, 100)
    t0 = time.monotonic()
    cache.put("cate_id", ["x"], ["new"], t0 + 0.002)  # the later read finished first
    cache.put("cate_id", ["x"], ["old"], t0)  # the earlier read's reply came last
    values, missed, expiries = cache.get_many("cate_id", ["x"])
    assert values == ["new"] and missed == [] and expiries == [t0 + 0.002 + ttl]
    cache.put("cate_id", ["x"], ["newer"], t0 + 0.005)
    assert cache.get_many("cate_id", ["x"])[0] == ["newer"]
    stale = ItemCache(0.2, 100)
    stale.put("cate_id", ["y"], ["v"], time.monotonic() - 0.3)  # a read 0.3 s ago
    assert stale.get_many("cate_id", ["y"])[1] == [0]  # already past its TTL: a miss


def test_a_row_from_an_earlier_read_never_replaces_one_from_a_later_read() -> None:
    """Two requests encode the same item from reads that finish in either order: the
    row of the read that started later stays (it expires later), as in the item cache;
    a row from a still later read replaces it."""
    ttl = 60.0
    cache = ItemRowCache(ttl, 4, 2, 1)
    t0 = time.monotonic() - 1.0  # the reads began a second ago
    later = rows(["x"], 50)
    cache.store(["x"], *later, np.array([t0 + 0.002 + ttl]))  # the later read finished first
    # the earlier read's rows come last: x's is dropped, w's (new) kept
    cache.store(["x", "w"], *rows(["x", "w"], 10), np.array([t0 + ttl, t0 + ttl]))
    slot = cache.lookup(["x"])[0]
    np.testing.assert_array_equal(cache.sparse[slot], later[0][0])
    np.testing.assert_array_equal(cache.dense[slot], later[1][0])
    assert cache.expiry[slot] == t0 + 0.002 + ttl
    assert cache.sparse[cache.lookup(["w"])[0], 0] == 12  # the other row of that call is kept
    cache.store(["x"], *rows(["x"], 90), np.array([t0 + 0.005 + ttl]))
    assert cache.sparse[cache.lookup(["x"])[0], 0] == 90


def test_an_id_given_twice_in_one_store_is_judged_by_its_last_row_only() -> None:
    """An ID twice in one store is written once, its last row, and that row alone is
    checked against the cached row's expiry: an earlier row of it in the batch, from a
    read newer than the cached one, is no way around the check."""
    ttl = 60.0
    cache = ItemRowCache(ttl, 4, 2, 1)
    t0 = time.monotonic()
    kept = rows(["x"], 50)
    cache.store(["x"], *kept, np.array([t0 + 30]))
    sparse, dense = rows(["x", "x"], 10)
    cache.store(["x", "x"], sparse, dense, np.array([t0 + 40, t0 + 20]))  # the last: older
    slot = cache.lookup(["x"])[0]
    np.testing.assert_array_equal(cache.sparse[slot], kept[0][0])
    assert cache.expiry[slot] == t0 + 30
    cache.store(["x", "x"], sparse, dense, np.array([t0 + 20, t0 + 45]))  # the last: newer
    np.testing.assert_array_equal(cache.sparse[cache.lookup(["x"])[0]], sparse[1])


def test_a_full_item_cache_drops_its_oldest_entries_first() -> None:
    """``CTR_ITEM_CACHE_SIZE`` bounds the raw item cache: a put that would overflow it
    first drops the oldest (by insertion) 1/32 of the size and room for the new values
    (here the size's 1/32 is 0: room only)."""
    from service.itemcache import ItemCache

    cache = ItemCache(60, 10)
    now = time.monotonic()
    a, b, c = ([f"{p}{k}" for k in range(n)] for p, n in (("a", 6), ("b", 3), ("c", 3)))
    cache.put("cate_id", a, [f"v-{i}" for i in a], now)
    cache.put("cate_id", b, [f"v-{i}" for i in b], now)
    assert len(cache) == 9  # within the size: nothing dropped
    cache.put("cate_id", c, [f"v-{i}" for i in c], now)
    assert len(cache) <= 10
    values, missed, _ = cache.get_many("cate_id", [*a, *b, *c])
    kept = [i for i, v in zip([*a, *b, *c], values, strict=True) if v is not None]
    assert kept == ["a3", "a4", "a5", "b0", "b1", "b2", "c0", "c1", "c2"]  # 3 oldest went
    assert values[-1] == "v-c2" and len(missed) == 3


def test_a_full_item_cache_drops_a_thirty_second_at_a_time() -> None:
    """Half at a time, as before, deleted 100,000 entries in one put at the default size
    (18 ms of the event loop every ~100 requests of 500 new items:
    scripts/bench_item_cache.py); a 32nd of the size at a time spreads the same work."""
    from service.itemcache import EVICT_DIVISOR, ItemCache

    cache = ItemCache(60, 320)
    now = time.monotonic()
    for k in range(32):
        ids = [f"i{k}-{j}" for j in range(10)]
        cache.put("cate_id", ids, ids, now)
    assert len(cache) == 320
    new = [f"n{j}" for j in range(10)]
    cache.put("cate_id", new, new, now)
    assert EVICT_DIVISOR == 32 and len(cache) == 320 - 320 // 32 - 10 + 10
    values, missed, _ = cache.get_many("cate_id", ["i0-0", "i1-9", "i2-0", "n9"])
    assert missed == [0, 1] and values[2:] == ["i2-0", "n9"]  # the 20 oldest went


class OneByOne(ItemRowCache):
    """The reference: every store slot by slot (what ``store`` does where some IDs are
    cached), including for batches of new IDs."""

    def _new_slots(self, ids: list[str]) -> np.ndarray:
        return self._slots_one_by_one(ids, np.full(len(ids), np.inf))[0]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 7),
    st.lists(
        st.one_of(
            st.lists(st.sampled_from("abcdefghijkl"), max_size=9, unique=True),
            st.lists(st.sampled_from("abcd"), max_size=5),  # an ID twice in a batch
            st.just(None),  # forget every slot (a map cleared behind the ring's back)
        ),
        max_size=12,
    ),
)
# "a" moves to slot 1 after the map is cleared; slot 0's reuse must not take it away
@example(4, [["a"], None, ["a"], ["b", "c"], ["d"]])
def test_batches_of_new_ids_take_ring_slots_as_one_by_one(size: int, batches: list) -> None:
    """The batch path for all-new IDs leaves the ring, its owners and the ID -> slot map
    exactly as storing them one by one does, wrapping around and evicting included."""
    fast, ref = ItemRowCache(60, size, 2, 1), OneByOne(60, size, 2, 1)
    for n, batch in enumerate(batches):
        if batch is None:
            fast.slot_of.clear()
            ref.slot_of.clear()
            continue
        for cache in (fast, ref):
            cache.store(batch, *rows(batch, 10 * n))
        assert fast.slot_of == ref.slot_of and fast.owner == ref.owner and fast.next == ref.next
        np.testing.assert_array_equal(fast.sparse, ref.sparse)
        everything = list("abcdefghijkl")
        assert fast.lookup(everything).tolist() == ref.lookup(everything).tolist()


def test_clear_forgets_every_row_and_value() -> None:
    """``clear`` (what ``ctr bench-path``'s unseen-items run does before each request)
    leaves both caches as new: every lookup misses, and storing starts over."""
    from service.itemcache import ItemCache

    rows_cache = ItemRowCache(60, 3, 2, 1)
    rows_cache.store(["a", "b"], *rows(["a", "b"], 10))
    rows_cache.clear()
    assert len(rows_cache) == 0 and rows_cache.lookup(["a", "b"]).tolist() == [-1, -1]
    rows_cache.store(["c"], *rows(["c"], 50))
    assert rows_cache.lookup(["c", "a"]).tolist() == [0, -1]
    items = ItemCache(60, 10)
    items.put("cate_id", ["a"], ["c1"], time.monotonic())
    items.clear()
    assert len(items) == 0 and items.get_many("cate_id", ["a"])[1] == [0]


def test_a_reported_item_write_ends_that_features_values_and_every_row() -> None:
    """``ItemCache.changed`` (Redis reported ``ctr:item:<feature>`` written): that
    feature's values go, the others stay; every model's encoded rows go at their next
    ``follow``; and a read sent before the report stores nothing, while one sent after it
    does (its values may predate the write otherwise)."""
    from service.itemcache import ItemCache

    items = ItemCache(60, 100)
    now = time.monotonic()
    items.put("cate_id", ["a", "b"], ["c1", "c2"], now)
    items.put("brand", ["a"], ["b1"], now)
    rows_cache = ItemRowCache(60, 8, 2, 1)
    rows_cache.follow(items.generation)
    rows_cache.store(["a", "b"], *rows(["a", "b"], 10))
    before = items.generation  # a read is sent
    items.changed("cate_id")
    assert items.get_many("cate_id", ["a", "b"])[1] == [0, 1]
    assert items.get_many("brand", ["a"])[0] == ["b1"]
    items.put("cate_id", ["a"], ["old"], now, before)  # that read's reply: not kept
    assert items.get_many("cate_id", ["a"])[1] == [0]
    items.put("cate_id", ["a"], ["new"], time.monotonic(), items.generation)
    assert items.get_many("cate_id", ["a"])[0] == ["new"]
    assert rows_cache.lookup(["a", "b"]).tolist() != [-1, -1]  # until it follows
    rows_cache.follow(items.generation)
    assert len(rows_cache) == 0 and rows_cache.lookup(["a", "b"]).tolist() == [-1, -1]
    rows_cache.store(["b"], *rows(["b"], 30))
    rows_cache.follow(items.generation)  # no report since: the rows stay
    assert rows_cache.lookup(["b"]).tolist() == [0]
    items.changed(None)  # any hash may have changed (a flush, a reconnection)
    assert len(items) == 0
    rows_cache.follow(items.generation)
    assert rows_cache.lookup(["b"]).tolist() == [-1]


def test_reports_within_the_hold_are_applied_together_at_its_end() -> None:
    """``ItemCache.reported`` (``CTR_ITEM_TRACKING_HOLD_MS``): the first report after a
    quiet hold is applied at once; the next ones wait for the hold's end and are applied
    there together (a writer changing items many times a second empties the caches about
    once a hold, not at every write); None (a flush, a reconnection, a catch-up) is
    applied at once, with whatever was held."""
    from service.itemcache import ItemCache

    async def main() -> None:
        items = ItemCache(60, 100, hold_s=0.3)
        now = time.monotonic()

        def fill() -> None:
            for feature in ("cate_id", "brand", "price"):
                items.put(feature, ["a"], ["v"], time.monotonic(), items.generation)

        def cached(feature: str) -> bool:
            return items.get_many(feature, ["a"])[1] == []

        fill()
        g = items.generation
        items.reported("cate_id")  # quiet before: at once
        assert items.generation == g + 1 and not cached("cate_id") and cached("brand")
        fill()
        items.reported("brand")  # within the hold: held
        items.reported("price")
        items.reported("brand")
        assert items.generation == g + 1 and cached("brand") and cached("price")
        await asyncio.sleep(0.2)
        assert cached("brand")  # still within the hold
        await asyncio.sleep(0.2)  # past its end: both applied, once each
        assert items.generation == g + 3 and not cached("brand") and not cached("price")
        assert cached("cate_id")
        assert time.monotonic() - now < 1.0
        fill()
        items.reported("price")  # within the new hold (it began at the held ones)
        assert cached("price")
        items.reported(None)  # at once, with what was held
        assert len(items) == 0 and items._timer is None
        fill()
        await asyncio.sleep(0.4)
        assert len(items) == 3  # the held report was not applied again later
        items.reported("brand")
        assert not cached("brand")
        items.close()
        zero = ItemCache(60, 100)  # CTR_ITEM_TRACKING_HOLD_MS=0: every report at once
        for _ in range(3):
            zero.put("cate_id", ["a"], ["v"], time.monotonic())
            zero.reported("cate_id")
            assert zero.get_many("cate_id", ["a"])[1] == [0]
        assert zero.generation == 3

    asyncio.run(main())


def test_the_first_write_after_the_tracker_connects_is_applied_at_once() -> None:
    """A report of None (the tracker's (re)connection, a flush, a catch-up) is no write:
    it starts no hold, so an item write reported just after a worker's tracking
    connection comes up is applied at once (held, a request in flight meanwhile kept
    the old value for up to ``CTR_ITEM_TRACKING_HOLD_MS``, and
    test_item_values_read_before_a_reported_write_are_not_kept failed whenever its write
    came within half a second of the connection)."""
    from service.itemcache import ItemCache

    async def main() -> None:
        items = ItemCache(60, 100, hold_s=5.0)
        items.reported(None)  # connected
        items.put("cate_id", ["a"], ["old"], time.monotonic(), items.generation)
        g = items.generation
        items.reported("cate_id")  # the first write: at once
        assert items.generation == g + 1 and items.get_many("cate_id", ["a"])[1] == [0]
        items.reported("brand")  # the next within the hold: held, as ever
        assert items.generation == g + 1 and items._pending == {"brand"}
        items.reported(None)  # applies it; the hold from cate_id's write still runs
        items.reported("price")
        assert items._pending == {"price"}
        items.close()

    asyncio.run(main())


def test_a_report_held_at_shutdown_does_not_hold_the_next_runs_first() -> None:
    """``ItemCache.close`` (the lifespan's end) with a report held: the same cache's
    next run (an app's lifespan entered again, a TestClient re-entered) applies its
    first report after a quiet hold at once, as ever, not a loop turn later (after the
    request whose poll heard it has read the old value from the cache)."""
    from service.itemcache import ItemCache

    items = ItemCache(60, 100, hold_s=0.2)

    async def first() -> None:
        items.reported("cate_id")  # at once
        items.reported("brand")  # held
        items.close()  # the worker stops with it held

    async def second() -> None:
        items.reported(None)  # the tracker's connection
        await asyncio.sleep(0.3)  # a quiet hold
        items.put("price", ["a"], ["old"], time.monotonic(), items.generation)
        g = items.generation
        items.reported("price")
        assert items.generation == g + 1 and items.get_many("price", ["a"])[1] == [0]
        assert items._timer is None and not items._pending

    asyncio.run(first())
    asyncio.run(second())


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 25)), max_size=12),
)
def test_a_full_item_cache_stays_within_its_size(size: int, puts: list) -> None:
    """Over several features, a put that would overflow ``CTR_ITEM_CACHE_SIZE`` first
    makes room: the cache never holds more than the size or the one batch being put."""
    from service.itemcache import ItemCache

    cache = ItemCache(60, size)
    now = time.monotonic()
    for n, (feature, k) in enumerate(puts):
        ids = [f"{feature}{n}-{j}" for j in range(k)]
        cache.put(feature, ids, ids, now)
        assert len(cache) <= max(size, k)
        assert cache.get_many(feature, ids)[0] == ids  # the batch just put is all there


def _item_cache() -> tuple[Any, list[str], Any, float]:
    """A small DIN config, its item features other than the item key, an empty item
    cache (60 s, 100 entries) and the time now."""
    from service.itemcache import ItemCache
    from tests.helpers import small_config

    config = small_config("din")
    sources = [f.source for f in config.item_sparse + config.item_dense]
    other = [x for x in sources if x != config.item_id_feature.source]
    return config, other, ItemCache(60, 100), time.monotonic()


def test_item_cache_paths_fill_holes_as_value_by_value() -> None:
    """take_cached with every value cached, none, and some (the three paths), and a put
    whose values do not match its IDs (a refused write, not a partial one)."""
    from service.features import ItemColumns, item_columns

    config, other, cache, now = _item_cache()
    for source in other:
        cache.put(source, ["a", "b"], [f"{source}-a", None], now)  # b: cached as absent
    every = item_columns(config, ["a", "b"], [None, None])
    assert every.take_cached(cache) == {} and every.missing == {}
    assert all(every.values[x] == [f"{x}-a", None] for x in other)
    assert every.expires.tolist() == [now + 60, now + 60]
    none = item_columns(config, ["x", "y"], [None, None])
    assert none.take_cached(cache) == {x: ["x", "y"] for x in other}
    assert none.missing == {x: [0, 1] for x in other} and none.expires.tolist() == [np.inf] * 2
    some = item_columns(config, ["y", "a"], [None, {other[0]: "given"}])
    lookups = some.take_cached(cache)
    assert lookups == {x: ["y"] for x in other}  # a: from the request or the cache
    assert some.values[other[0]] == [None, "given"]
    some.fill({x: [f"{x}-y"] for x in other}, now + 30)
    assert all(some.values[x][0] == f"{x}-y" for x in other)
    assert some.expires.tolist() == [now + 30, now + 60 if other[1:] else np.inf]
    empty = ItemColumns({}, {})
    assert empty.expires.size == 0
    with pytest.raises(ValueError, match="1 values for 2 item IDs"):
        cache.put(other[0], ["p", "q"], ["1"], now)
    assert cache.get_many(other[0], ["p"])[1] == [0]  # nothing of it was kept


def test_a_partly_cached_request_fills_each_missed_item_with_its_own_values() -> None:
    """Where some candidates' values come from the item cache and two or more do not,
    each missed candidate gets the values read for its own ID (the holes, the lookups
    and the values fetched for them stay in one order), and its row's expiry is its
    own read's."""
    from service.features import item_columns

    config, other, cache, now = _item_cache()
    for source in other:
        cache.put(source, ["b", "d"], [f"{source}-b", f"{source}-d"], now)
    cols = item_columns(config, ["a", "b", "c", "d", "e"], [None] * 5)
    lookups = cols.take_cached(cache)
    assert lookups == {x: ["a", "c", "e"] for x in other}
    cols.fill({x: [f"{x}-{i}" for i in lookups[x]] for x in other}, now + 30)
    for x in other:
        assert cols.values[x] == [f"{x}-{i}" for i in "abcde"]
    assert cols.expires.tolist() == [now + 30, now + 60, now + 30, now + 60, now + 30]


class FakeTime:
    """``time`` for :mod:`service.rowcache` alone: a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


STORE_IDS = st.lists(st.sampled_from("abcdefghij"), min_size=1, max_size=10)
EXPIRES = st.one_of(st.none(), st.lists(st.sampled_from([1.0, 3.0, 100.0, math.inf]),
                                        min_size=10, max_size=10))  # fmt: skip
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("store"), STORE_IDS, EXPIRES),
        st.tuples(st.just("lookup"), STORE_IDS),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 4.0, 60.0])),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 8), st.sampled_from([5.0, 50.0]), OPS)
# X's newer row (until 1060) sits in the slot the ring hands out next: a store of
# [Y, X] with X's older row (until 1030) gave Y that slot, then wrote X's older row
@example(2, 60.0, [("store", ["X"], [60.0] * 10), ("store", ["o"], None),
                   ("store", ["Y", "X"], [30.0] * 10), ("lookup", ["X"])])  # fmt: skip
def test_a_served_row_is_the_newest_accepted_row_of_its_id(
    size: int, ttl: float, ops: list
) -> None:
    """Against a reference applying the documented rule ID by ID (a row replaces its
    ID's cached row unless that one expires later; of an ID given twice the last row
    counts): whatever the ring does, a lookup serves the looked-up ID's own row,
    unexpired, and the newest accepted one."""
    clock = FakeTime()
    cache = ItemRowCache(ttl, size, 2, 1)
    ref: dict[str, tuple[int, float]] = {}  # id -> (version, until) held for it
    version = 0
    with mock.patch.object(rowcache, "time", clock):
        for op in ops:
            if op[0] == "store":
                ids, expires = op[1], op[2]
                versions = list(range(version + 1, version + 1 + len(ids)))
                version += len(ids)
                pairs = zip(map(ord, ids), versions, strict=True)
                sparse = np.array([list(pair) for pair in pairs], np.int64)
                dense = np.array([[float(v)] for v in versions], np.float32)
                exp = None if expires is None else clock.now + np.array(expires[: len(ids)])
                cache.store(ids, sparse, dense, exp)
                kept = ids[-size:]
                last = {i: j for j, i in enumerate(kept)}
                for j, i in enumerate(kept):
                    if last[i] != j:
                        continue
                    until = clock.now + ttl
                    if exp is not None:
                        until = min(until, exp[len(ids) - len(kept) + j])
                    if i not in ref or ref[i][1] <= until:
                        ref[i] = (versions[len(ids) - len(kept) + j], until)
                for i in [i for i in ref if i not in cache.slot_of]:  # evicted
                    del ref[i]
            elif op[0] == "lookup":
                for i, slot in zip(op[1], cache.lookup(op[1]).tolist(), strict=True):
                    if slot < 0:
                        continue
                    got_id, got_version = cache.sparse[slot].tolist()
                    assert chr(got_id) == i  # the looked-up ID's own row
                    assert cache.expiry[slot] > clock.now
                    assert got_version == ref[i][0], (i, got_version, ref[i])
                assert all(cache.owner[s] == i for i, s in cache.slot_of.items())
            elif op[0] == "tick":
                clock.now += op[1]
            else:
                cache.clear()
                ref.clear()
