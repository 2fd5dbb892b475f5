"""POST /admin/reload reaches every worker of a deployment (service.reloadbus), with a
real Redis: two apps in this process stand for two workers; test_workers.py runs the
same with `ctr serve --workers 2`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from service.app import create_app
from service.reloadbus import ReloadBus
from service.settings import Settings
from tests.helpers import REDIS_URL, Built, build_bundle, until
from tests.redis_proc import free_port, private_redis

KEY = {"X-API-Key": "k"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    built = build_bundle(tmp_path_factory.mktemp("bus"), "din")
    root = built.models_dir / built.config.name
    shutil.copytree(root / "1", root / "2")  # a second version of the same model
    return built


def settings(built: Built, channel: str, models_dir: Path | None = None, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "models_dir": str(models_dir or built.models_dir),
        "model_name": built.config.name,
        "model_version": "1",
        "redis_url": REDIS_URL,
        "api_key": "k",
        "reload_channel": channel,
    }
    return Settings(**(base | kw))


async def until_async(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Await until ``check()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def info(c: TestClient) -> dict[str, Any]:
    return c.get("/v1/models").json()


@pytest.fixture
def channel() -> Iterator[str]:
    name = f"test:reload:{uuid.uuid4().hex[:8]}"
    yield name
    r = Redis.from_url(REDIS_URL)
    for key in r.scan_iter("{" + name + ":*"):  # the bus's keys carry a hash tag
        r.delete(key)
    r.close()


def cut_off(r: Redis, *buses: ReloadBus) -> None:
    """Close these buses' listener connections from the server side (only theirs: the
    connections are named after the bus)."""
    names = {f"ctr-reload-bus:{bus.token[:12]}" for bus in buses}
    for c in r.client_list():
        if c.get("name") in names:
            r.client_kill_filter(_id=c["id"])


def test_reload_reaches_the_other_worker(built: Built, channel: str, tmp_path: Path) -> None:
    # another deployment (a different store) on the same Redis and the same channel setting
    other_store = tmp_path / "other"
    shutil.copytree(built.models_dir, other_store)
    with (
        TestClient(create_app(settings(built, channel))) as a,
        TestClient(create_app(settings(built, channel))) as b,
        TestClient(create_app(settings(built, channel, other_store))) as other,
    ):
        for c in (a, b, other):
            assert until(lambda c=c: info(c)["reload_bus"]["subscribed"]), info(c)
            assert info(c)["version"] == "1"
        r = a.post("/admin/reload", json={}, headers=KEY)  # the newest: 2
        assert r.status_code == 200, r.text
        assert r.json() == {"name": built.config.name, "version": "2", "peers_notified": 1}
        assert until(lambda: info(b)["version"] == "2"), info(b)
        # a pinned version reaches it the same way, from either side
        r = b.post("/admin/reload", json={"version": "1"}, headers=KEY)
        assert r.json()["peers_notified"] == 1
        assert until(lambda: info(a)["version"] == "1"), info(a)
        # a failed load on the first worker is not broadcast: nothing moves. (b could
        # not load 9 either, so b's version alone would not show a broadcast: the
        # channel, the record and the numbers do.)
        bus_a, bus_b = a.app.state.ctr.bus, b.app.state.ctr.bus
        rc = Redis.from_url(REDIS_URL)
        record, seqs = rc.get(bus_a.last_key), (bus_a.applied_seq, bus_b.applied_seq)
        assert record is not None and None not in seqs
        sub = rc.pubsub()
        sub.subscribe(bus_a.channel)
        assert until(lambda: (sub.get_message(timeout=0.1) or {}).get("type") == "subscribe")
        r = a.post("/admin/reload", json={"version": "9"}, headers=KEY)
        assert r.status_code == 409 and r.json()["serving"] == "1"
        # a broadcast is published before the answer: any would be on its way already
        heard = [sub.get_message(timeout=0.1) for _ in range(3)]
        assert heard == [None, None, None], heard
        assert rc.get(bus_a.last_key) == record
        assert (bus_a.applied_seq, bus_b.applied_seq) == seqs
        sub.close()
        rc.close()
        assert info(b)["version"] == "1"
        # the other deployment heard nothing
        assert info(other)["version"] == "1"
        assert other.app.state.ctr.bus.applied == 0
        assert a.app.state.ctr.bus.applied == 1 and b.app.state.ctr.bus.applied == 1


def test_a_redis_stalled_a_moment_still_takes_the_broadcast(built: Built, channel: str) -> None:
    """The bus's commands ran on the scoring client, whose socket timeout is
    CTR_REDIS_TIMEOUT_MS (50 ms): a Redis that stalled 300 ms (a fork for a save, a slow
    command) cut the broadcast short (`peers_notified: null`, the peer late), though the
    bus waits up to 2 s. Its own client now; the scoring reads keep their 50 ms."""
    with private_redis() as proc:
        s = settings(built, channel, redis_url=proc.url, redis_timeout_ms=50)
        with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
            for c in (a, b):
                assert until(lambda c=c: info(c)["reload_bus"]["subscribed"]), info(c)
            pause = proc.client()
            pause.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # its script writes
            started = time.monotonic()
            r = a.post("/admin/reload", json={"version": "2"}, headers=KEY)
            assert r.status_code == 200 and r.json()["peers_notified"] == 1, r.text
            assert time.monotonic() - started >= 0.2  # it waited out the pause
            assert until(lambda: info(b)["version"] == "2"), info(b)
            assert a.app.state.ctr.redis.connection_pool.connection_kwargs[
                "socket_timeout"] == 0.05  # fmt: skip


def test_a_failed_reload_is_shown_until_one_loads(built: Built, channel: str) -> None:
    """A reload that failed while the old version served on showed only in the log and a
    counter; a peer retrying a broadcast it could not load, nowhere at all.
    ``reload_error`` in /readyz and /v1/models says which version, why (to a key
    holder) and when, until a load succeeds."""
    with TestClient(create_app(settings(built, channel))) as a:
        assert a.get("/readyz").json()["reload_error"] is None
        started = time.time()
        r = a.post("/admin/reload", json={"version": "9"}, headers=KEY)
        assert r.status_code == 409
        shown = a.get("/readyz", headers=KEY).json()["reload_error"]
        assert shown["version"] == "9" and "9" in shown["error"]
        assert started <= shown["at"] <= time.time()
        assert a.get("/v1/models", headers=KEY).json()["reload_error"] == shown
        hidden = a.get("/readyz").json()["reload_error"]  # no key: no paths
        assert hidden == {**shown, "error": "hidden: send X-API-Key to read it"}
        assert a.get("/readyz").status_code == 200  # still serving version 1
        r = a.post("/admin/reload", json={"version": "2"}, headers=KEY)
        assert r.status_code == 200
        assert a.get("/readyz", headers=KEY).json()["reload_error"] is None


def test_a_worker_that_missed_the_message_catches_up(built: Built, channel: str) -> None:
    """A listener cut off from Redis reads the last broadcast when it subscribes again,
    and applies it only if its number is above what the worker has seen."""
    with (
        TestClient(create_app(settings(built, channel))) as a,
        TestClient(create_app(settings(built, channel))) as b,
    ):
        for c in (a, b):
            assert until(lambda c=c: info(c)["reload_bus"]["subscribed"])
        bus_a, bus_b = a.app.state.ctr.bus, b.app.state.ctr.bus
        r = Redis.from_url(REDIS_URL)
        # a broadcast b never heard: the record alone, as if b was away when it was sent
        record = {**bus_a.deployment, "version": "2", "origin": bus_a.token,
                  "seq": str(bus_b.applied_seq)}  # fmt: skip
        r.set(bus_a.last_key, orjson.dumps(record))
        seen = bus_b.catch_ups
        cut_off(r, bus_a, bus_b)  # both listeners reconnect and read it
        assert until(lambda: bus_b.catch_ups > seen)
        assert info(b)["version"] == "1"  # not newer than what b has seen: ignored
        record["seq"] = str(bus_b.applied_seq + 1)
        r.set(bus_a.last_key, orjson.dumps(record))
        cut_off(r, bus_a, bus_b)
        assert until(lambda: info(b)["version"] == "2"), info(b)
        assert bus_b.applied == 1
        assert info(a)["version"] == "1"  # its own record (origin): never applied
        r.close()


class Worker:
    """A stand-in worker around a real ReloadBus: its load takes ``load_s`` seconds, and
    fails for the versions in ``missing`` (their files not on this host yet); ``tries``
    counts the loads of each version."""

    def __init__(
        self,
        channel: str,
        load_s: float,
        configured: str = "latest",
        url: str = REDIS_URL,
        disk: dict[str, str] | None = None,
    ) -> None:
        self.version, self.load_s, self.lock = "1", load_s, asyncio.Lock()
        self.missing: set[str] = set()
        self.tries: dict[str, int] = {}
        # disk: {version: its bundle's digest} where given; the bus then knows what this
        # worker serves (version and digest), as the app's does
        self.disk, self.digest = disk, None if disk is None else disk.get("1")
        known = {} if disk is None else {
            "serving": lambda: self.version, "serving_digest": lambda: self.digest
        }  # fmt: skip
        self.redis = AsyncRedis.from_url(url, socket_timeout=1.0, socket_connect_timeout=0.5)
        self.bus = ReloadBus(self.redis, url, channel, "/tmp/bus-test", "din", 1.0,
                             0.5, self.lock, self.load, retry_s=0.1,
                             configured=configured, **known)  # fmt: skip

    async def load(self, version: str, load_s: float | None = None) -> None:
        self.tries[version] = self.tries.get(version, 0) + 1
        if version in self.missing:
            raise RuntimeError(f"version {version} is not on this host yet")
        await asyncio.sleep(self.load_s if load_s is None else load_s)
        self.version = version
        if self.disk is not None:
            self.digest = self.disk[version]

    async def admin(self, version: str, load_s: float) -> int | None:
        """As POST /admin/reload: load and publish under the reload lock."""
        async with self.lock:
            await self.load(version, load_s)
            return await self.bus.publish(version)

    async def close(self) -> None:
        await self.bus.aclose()
        await self.redis.aclose()


async def listening(*workers: Worker) -> None:
    """Baseline and start each worker's bus, and wait until all are subscribed."""
    for w in workers:
        await w.bus.baseline()
        w.bus.start()
    deadline = time.monotonic() + 20
    while not all(w.bus.subscribed for w in workers):
        assert time.monotonic() < deadline, "a listener never subscribed"
        await asyncio.sleep(0.02)


def test_concurrent_reloads_leave_every_worker_on_the_last_published(channel: str) -> None:
    """Two admins at once: w1 loads 5 slowly, w2 loads 6 and publishes first. Every worker
    must end on 5 (published last), including w1, which answered 5."""

    async def scenario() -> dict[str, str]:
        ws = {name: Worker(channel, 0.2) for name in ("w1", "w2", "w3")}
        await listening(*ws.values())
        slow = asyncio.create_task(ws["w1"].admin("5", 1.0))
        await asyncio.sleep(0.2)
        assert await ws["w2"].admin("6", 0.3) == 2
        assert await slow == 2
        # until every worker is on 5 (bounded), then a while longer: nothing moves on
        deadline = time.monotonic() + 20
        while any(w.version != "5" for w in ws.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        out = {name: w.version for name, w in ws.items()}
        for w in ws.values():
            await w.close()
        return out

    assert asyncio.run(scenario()) == {"w1": "5", "w2": "5", "w3": "5"}


def test_a_version_number_whose_bundle_changed_is_loaded_not_agreed_with(channel: str) -> None:
    """A version folder replaced under its number (deleted, then re-exported or copied
    in): the worker that reloads it serves the new bundle, and a peer that served the
    old one under that number took the broadcast for what it serves (no load: the
    deployment split, every status alike). The broadcast carries the bundle's digest;
    a peer serving another loads it. The same digest is still agreed with."""

    async def scenario() -> tuple[int, int, int, str | None]:
        disk = {"1": "d1", "3": "old"}
        a, b = Worker(channel, 0.0, disk=disk), Worker(channel, 0.0, disk=disk)
        await listening(a, b)
        assert await a.admin("3", 0.0) == 1
        await until_async(lambda: b.version == "3", "3 applied")
        first = b.tries["3"]
        disk["3"] = "new"  # the folder replaced
        seq = b.bus.applied_seq
        await a.admin("3", 0.0)
        await until_async(lambda: b.bus.applied_seq != seq, "the second broadcast")
        await until_async(lambda: b.digest == "new", "the new bundle loaded")
        second = b.tries["3"]
        seq = b.bus.applied_seq
        await a.admin("3", 0.0)  # the same bundle again: nothing to load
        await until_async(lambda: b.bus.applied_seq != seq, "the third broadcast")
        out = (first, second, b.tries["3"], b.digest)
        for w in (a, b):
            await w.close()
        return out

    assert asyncio.run(scenario()) == (1, 2, 2, "new")


@pytest.mark.parametrize(
    ("during_start", "configured", "want"),
    [(True, "2", "4"), (False, "2", "1"), (False, "latest", "3")],
    ids=["during-start", "before-start", "before-start-configured-alike"],
)
def test_a_worker_whose_baseline_failed_still_applies_what_came_during_its_start(
    channel: str, during_start: bool, configured: str, want: str
) -> None:
    """Redis could not be read when the worker noted the baseline (it then loads
    CTR_MODEL_VERSION): a rollback broadcast while it starts is applied when it first
    subscribes; one from before it started is not, unless it is the version a start
    would have taken (the broadcasters were configured alike: "latest" here)."""

    async def scenario() -> str:
        admin = Worker(channel, 0.0)
        await admin.bus.baseline()
        await admin.admin("3", 0.0)  # long before the new worker: not for it
        await asyncio.sleep(0.01)
        new = Worker(channel, 0.0, configured)  # baseline read failed: applied_seq unknown
        assert new.bus.applied_seq is None
        if during_start:
            await asyncio.sleep(0.01)
            await admin.admin("4", 0.0)
        new.bus.start()
        deadline = time.monotonic() + 20
        while new.bus.catch_ups == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert new.bus.catch_ups > 0, "the listener never caught up"
        version = new.version
        for w in (admin, new):
            await w.close()
        return version

    assert asyncio.run(scenario()) == want


def test_a_broadcast_that_fails_to_load_here_is_retried_until_it_loads(channel: str) -> None:
    """Another worker loaded version 7; here its files are not there yet, so the load
    fails: it is tried again (backing off) and applied once it loads. A newer broadcast
    meanwhile supersedes the retry."""

    async def scenario() -> tuple[str, int, str, int]:
        admin = Worker(channel, 0.0)
        lagging = Worker(channel, 0.0)
        lagging.bus.load_retry_s = 0.1
        missing, tries = lagging.missing, lagging.tries
        missing |= {"7", "8"}
        await listening(admin, lagging)
        await admin.admin("7", 0.0)
        await until_async(lambda: tries.get("7", 0) >= 3, "a few failed tries of 7")
        failed_tries = tries["7"]
        missing.discard("7")  # the files land
        deadline = time.monotonic() + 10
        while lagging.version != "7" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        got7 = lagging.version
        await admin.admin("8", 0.0)  # fails here too, and is retried...
        await until_async(lambda: tries.get("8", 0) >= 2, "a retry of 8")
        retry8 = lagging.bus.retry_task
        assert retry8 is not None and not retry8.done()
        await admin.admin("9", 0.0)  # ...until 9 supersedes it
        await until_async(lambda: lagging.version == "9", "9 applied")
        tries8 = tries["8"]
        # now 8's files land too: the superseded retry must end without loading 8 (a
        # worker must not roll back from 9 to the older broadcast)
        missing.discard("8")
        await until_async(retry8.done, "the superseded retry of 8 to end")
        out = (got7, failed_tries, lagging.version, tries["8"] - tries8)
        for w in (admin, lagging):
            await w.close()
        return out

    got7, failed_tries, final, later_tries_of_8 = asyncio.run(scenario())
    assert got7 == "7" and failed_tries >= 3
    assert final == "9" and later_tries_of_8 == 0


def test_a_broadcast_redis_refused_is_sent_when_it_answers_unless_superseded(
    channel: str,
) -> None:
    """A reload whose broadcast Redis refused (`peers_notified: null`) reaches the other
    workers once Redis takes it; a newer reload meanwhile supersedes it, and the late
    one is never sent over it."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario() -> tuple[int | None, str, int | None, str, str]:
        w1, w2 = Worker(channel, 0.0), Worker(channel, 0.0)
        await listening(w1, w2)
        real_eval = w1.redis.eval
        down = {"calls": 2}

        async def flaky_eval(*args: Any) -> Any:
            if down["calls"] > 0:
                down["calls"] -= 1
                raise RedisConnectionError("Redis is down")
            return await real_eval(*args)

        w1.redis.eval = flaky_eval  # type: ignore[method-assign]
        first = await w1.admin("5", 0.0)  # refused; retried in the background
        deadline = time.monotonic() + 10
        while w2.version != "5" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        late = w2.version
        down["calls"] = 10**6  # down for good for w1's publishes
        second = await w1.admin("7", 0.0)
        await asyncio.sleep(0.2)
        await w2.admin("8", 0.0)  # newer, and w1 applies it: w1's "7" is superseded
        deadline = time.monotonic() + 10
        while w1.version != "8" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        down["calls"] = 0  # Redis answers w1 again
        await asyncio.sleep(1.0)
        out = (first, late, second, w1.version, w2.version)
        for w in (w1, w2):
            await w.close()
        return out

    first, late, second, v1, v2 = asyncio.run(scenario())
    assert first is None and late == "5"
    assert second is None and v1 == "8" and v2 == "8"


class Gate:
    """A TCP relay in front of the test Redis that can refuse and cut every connection:
    Redis down for one worker only."""

    def __init__(self) -> None:
        self.open = True
        self.writers: list[asyncio.StreamWriter] = []
        target = urlsplit(REDIS_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.db = target.path or "/0"

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.db}"  # the same database: the same channel

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if not self.open:
            cw.close()
            return
        rr, rw = await asyncio.open_connection(*self.target)
        self.writers += [cw, rw]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(cr, rw), pipe(rr, cw))

    def shut(self) -> None:
        self.open = False
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.close()
        self.writers = []

    async def close(self) -> None:
        self.shut()
        self.server.close()


def test_a_reload_made_while_redis_was_down_is_sent_before_the_catch_up(channel: str) -> None:
    """A worker that could not read Redis at start-up reloads while Redis is still down
    (`peers_notified: null`). When Redis answers again, the listener sends that reload
    before it catches up: the record from before (version 3) must not undo it, here or
    on the other workers, whichever of the listener and the re-send gets there first
    (here the listener: the re-send task is cancelled)."""

    async def scenario() -> tuple[Any, ...]:
        admin = Worker(channel, 0.0)
        await listening(admin)
        await admin.admin("3", 0.0)  # an earlier reload, recorded
        gate = Gate()
        url = await gate.start()
        gate.shut()  # Redis down for `new`
        new = Worker(channel, 0.0, url=url)
        baseline = await new.bus.baseline()
        new.version = "4"  # started on its own setting
        new.bus.start()
        peers = await new.admin("2", 0.0)  # POST /admin/reload while Redis is down
        assert new.bus.publish_task is not None
        new.bus.publish_task.cancel()  # the listener's turn
        gate.open = True
        await until_async(lambda: admin.version == "2", "the late broadcast of 2")
        await until_async(lambda: new.bus.catch_ups > 0, "the catch-up")
        record = orjson.loads(Redis.from_url(REDIS_URL).get(new.bus.last_key) or b"{}")
        out = (baseline, peers, new.version, admin.version, record.get("version"),
               record.get("origin") == new.bus.token)  # fmt: skip
        for w in (admin, new):
            await w.close()
        await gate.close()
        return out

    baseline, peers, v_new, v_admin, recorded, ours = asyncio.run(scenario())
    assert baseline is None and peers is None
    assert v_new == "2" and v_admin == "2" and recorded == "2" and ours


def test_a_reload_here_ends_the_retries_of_an_older_broadcast(channel: str) -> None:
    """Version 7 was broadcast but does not load here yet (retried); then this worker is
    reloaded to 8 while Redis refuses its broadcast. 7's files landing later must not
    take it back to 7, and 8 reaches the other worker once Redis answers."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario() -> tuple[Any, ...]:
        admin, here = Worker(channel, 0.0), Worker(channel, 0.0)
        here.bus.load_retry_s = 0.1
        here.missing.add("7")
        await listening(admin, here)
        await admin.admin("7", 0.0)
        await until_async(lambda: here.tries.get("7", 0) >= 2, "a retry of 7")
        real_eval = here.redis.eval
        down = {"on": True}

        async def flaky_eval(*args: Any) -> Any:
            if down["on"]:
                raise RedisConnectionError("Redis is down")
            return await real_eval(*args)

        here.redis.eval = flaky_eval  # type: ignore[method-assign]
        peers = await here.admin("8", 0.0)  # POST /admin/reload while Redis refuses
        retry = here.bus.retry_task
        here.missing.discard("7")  # 7's files land
        await asyncio.sleep(0.6)  # several retry periods
        kept = here.version
        down["on"] = False
        await until_async(lambda: admin.version == "8", "the late broadcast of 8")
        out = (peers, retry, kept, here.version, here.tries["7"])
        for w in (admin, here):
            await w.close()
        return out

    peers, retry, kept, final, tries_of_7 = asyncio.run(scenario())
    assert peers is None and retry is None
    assert kept == "8" and final == "8"
    assert tries_of_7 >= 2  # it was failing before; never loaded after the reload


def test_a_broadcast_of_the_version_a_fallback_serves_ends_the_fallback(
    built: Built, channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CTR_MODEL_VERSION=latest, the newest (2) broken here: the worker falls back to 1
    and keeps trying 2. The deployment then rolls back to 1 (a broadcast of the version
    it serves): the fallback is over, and 2 is not loaded when its files are fixed."""
    models = tmp_path / "models"
    shutil.copytree(built.models_dir, models)
    model = models / built.config.name / "2" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-10])  # corrupt: its sha256 no longer matches

    async def broadcast_1() -> None:
        redis = AsyncRedis.from_url(REDIS_URL)
        peer = ReloadBus(redis, REDIS_URL, channel, str(models), built.config.name, 1.0, 1.0,
                         asyncio.Lock(), lambda version: asyncio.sleep(0))  # fmt: skip
        await peer.baseline()
        await peer.publish("1")
        await peer.aclose()
        await redis.aclose()

    from service import lifecycle

    monkeypatch.setattr(lifecycle, "FALLBACK_RETRY_S", 0.2)  # 30 s in the service
    with TestClient(create_app(settings(built, channel, models, model_version="latest"))) as c:
        assert info(c)["fallback"]["newest"] == "2" and info(c)["version"] == "1"
        asyncio.run(broadcast_1())
        assert until(lambda: info(c)["fallback"] is None), "the fallback did not end"
        model.write_bytes(good)  # 2 would load now: the retries must have stopped
        time.sleep(1.5)  # several retry periods
        assert info(c)["version"] == "1"


def test_a_silently_dead_connection_is_found_and_caught_up(channel: str) -> None:
    """A path that drops traffic without closing (NAT timeout, partition): the unanswered
    PING makes the listener reconnect, and the broadcast it missed is applied."""

    async def scenario() -> tuple[bool, str, int]:
        frozen = asyncio.Event()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if not frozen.is_set():  # frozen: swallowed, nothing closes
                        w.write(data)
                        await w.drain()

        target = urlsplit(REDIS_URL)  # the test Redis, wherever CTR_TEST_REDIS_URL puts it
        assert target.scheme == "redis" and target.hostname, REDIS_URL

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            rr, rw = await asyncio.open_connection(target.hostname, target.port or 6379)
            await asyncio.gather(pipe(cr, rw), pipe(rr, cw))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        userinfo = target.netloc.rpartition("@")[0]
        via_proxy = target._replace(
            netloc=(f"{userinfo}@" if userinfo else "") + f"127.0.0.1:{port}"
        ).geturl()
        w = Worker(channel, 0.0)
        listener = ReloadBus(
            w.redis,
            via_proxy,
            channel,
            "/tmp/bus-test",
            "din",
            1.0,
            1.0,
            w.lock,
            w.load,
            retry_s=0.1,
            ping_s=0.3,
            pong_timeout_s=0.5,
        )
        await w.bus.aclose()  # fmt: skip
        w.bus = listener
        await listener.baseline()
        listener.start()
        while not listener.subscribed:
            await asyncio.sleep(0.05)
        frozen.set()
        other = Worker(channel, 0.0)
        await other.bus.baseline()
        # Redis still counts the dead path's subscription; the listener never gets it
        assert await other.admin("7", 0.0) == 1
        deadline = time.monotonic() + 5
        while listener.subscribed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        found = not listener.subscribed
        # a dead path reconnects and catches up once it carries traffic again
        frozen.clear()
        deadline = time.monotonic() + 10
        while w.version != "7" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        result = (found, w.version, listener.applied)
        await w.close()
        await other.close()
        server.close()
        return result

    assert asyncio.run(scenario()) == (True, "7", 1)


def test_redis_down_reloads_this_worker_only(built: Built, channel: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    s = settings(built, channel, redis_url=dead, redis_connect_timeout_ms=50)
    with TestClient(create_app(s)) as c:
        r = c.post("/admin/reload", json={"version": "2"}, headers=KEY)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2" and r.json()["peers_notified"] is None
        assert info(c)["reload_bus"]["subscribed"] is False


def test_empty_channel_turns_the_broadcast_off(built: Built) -> None:
    with TestClient(create_app(settings(built, ""))) as c:
        assert info(c)["reload_bus"] is None
        r = c.post("/admin/reload", json={}, headers=KEY)
        assert r.json()["peers_notified"] is None and r.json()["version"] == "2"


def test_an_unreachable_cluster_still_starts_and_reloads_locally(
    built: Built, channel: str
) -> None:
    """A Redis Cluster that cannot be reached raises the cluster client's own errors (not
    RedisError): the worker still starts not-ready-for-Redis, and a reload is local."""
    dead = ",".join(f"redis://127.0.0.1:{free_port()}" for _ in range(2))
    s = settings(built, channel, redis_url=dead, redis_cluster=True,
                 redis_connect_timeout_ms=50)  # fmt: skip
    with TestClient(create_app(s)) as c:
        ready = c.get("/readyz").json()
        assert ready["redis"] is False and ready["degraded"] is True, ready
        r = c.post("/admin/reload", json={"version": "2"}, headers=KEY)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2" and r.json()["peers_notified"] is None
        assert info(c)["reload_bus"]["subscribed"] is False


def test_the_channel_is_per_database_however_the_url_names_it() -> None:
    """`?db=N` and a unix socket's `?db=N` select a database as `/N` does: two deployments
    on different databases never share a channel, the same one always does."""

    def channel_of(url: str) -> str:
        bus = ReloadBus(AsyncRedis.from_url(url), url, "c", "/tmp/m", "din", 1.0, 1.0,
                        asyncio.Lock(), lambda v: asyncio.sleep(0))  # fmt: skip
        return bus.channel

    assert channel_of("redis://127.0.0.1:6379?db=3") == channel_of("redis://127.0.0.1:6379/3")
    assert channel_of("redis://127.0.0.1:6379?db=3") != channel_of("redis://127.0.0.1:6379/0")
    assert channel_of("redis://127.0.0.1:6379") == channel_of("redis://127.0.0.1:6379/0")
    assert channel_of("unix:///tmp/r.sock?db=2") == channel_of("redis://127.0.0.1:6379/2")
    assert channel_of("unix:///tmp/r.sock") == channel_of("redis://127.0.0.1:6379/0")


def test_a_worker_starting_later_serves_what_the_deployment_serves(
    built: Built, channel: str, tmp_path: Path
) -> None:
    """A worker that starts after a broadcast (uvicorn replacing a crashed one, a replica
    added) starts on the broadcast version, a rollback included, when its peers were
    configured alike; a new export since, a different CTR_MODEL_VERSION, or a version
    that does not load here start it on its own setting, as without the bus."""
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    latest = settings(built, channel, store, model_version="latest")
    with TestClient(create_app(latest)) as a:
        assert info(a)["version"] == "2"
        r = a.post("/admin/reload", json={"version": "1"}, headers=KEY)  # a rollback
        assert r.status_code == 200, r.text
    with TestClient(create_app(latest)) as b:  # e.g. a worker uvicorn restarted
        assert info(b)["version"] == "1"
    pinned = settings(built, channel, store, model_version="2")
    with TestClient(create_app(pinned)) as c:  # a deploy that pins another version
        assert info(c)["version"] == "2"
        rc = Redis.from_url(REDIS_URL)
        assert rc.get(c.app.state.ctr.bus.last_key) is None  # that record is over
        rc.close()
    with TestClient(create_app(latest)) as back:  # so reverting the deploy does not
        assert info(back)["version"] == "2"  # bring the old rollback back
        r = back.post("/admin/reload", json={"version": "1"}, headers=KEY)  # rolled back
        assert r.status_code == 200, r.text
    shutil.copytree(root / "1", root / "3")  # exported after the rollback
    with TestClient(create_app(latest)) as d:
        assert info(d)["version"] == "3"
        r = d.post("/admin/reload", json={"version": "1"}, headers=KEY)  # rolled back again
        assert r.status_code == 200, r.text


def test_a_deployment_version_that_fails_at_start_is_tried_again(
    built: Built, channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that starts on CTR_MODEL_VERSION because the deployment's version does
    not load here yet (its files still on their way) tries that version again until it
    loads, as it would a broadcast that failed; and a broadcast of the version a worker
    already serves loads nothing again."""
    import service.reloadbus

    monkeypatch.setattr(service.reloadbus, "LOAD_RETRY_S", 0.1)
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    shutil.copytree(root / "1", root / "3")
    latest = settings(built, channel, store, model_version="latest")
    good = (root / "2" / "model.onnx").read_bytes()
    with TestClient(create_app(latest)) as a:
        assert info(a)["version"] == "3"
        r = a.post("/admin/reload", json={"version": "2"}, headers=KEY)  # a rollback
        assert r.status_code == 200, r.text
        (root / "2" / "model.onnx").write_bytes(b"\x00half-copied")
        with TestClient(create_app(latest)) as b:
            assert info(b)["version"] == "3"  # 2 does not load here yet
            (root / "2" / "model.onnx").write_bytes(good)  # the copy lands
            assert until(lambda: info(b)["version"] == "2"), info(b)
            bus_a, bus_b = a.app.state.ctr.bus, b.app.state.ctr.bus
            assert until(lambda: bus_b.subscribed)
            loads = bus_a.applied
            r = b.post("/admin/reload", json={"version": "2"}, headers=KEY)  # a serves 2
            assert r.status_code == 200 and r.json()["peers_notified"] == 1, r.text
            assert until(lambda: bus_a.applied_seq == bus_b.applied_seq)
            assert bus_a.applied == loads and info(a)["version"] == "2"


def test_sighup_reload_is_broadcast_and_recorded(built: Built, channel: str) -> None:
    """SIGHUP's reload of the newest version reaches the other workers and the record,
    as POST /admin/reload does (else a later start would undo it)."""
    from service import lifecycle

    with (
        TestClient(create_app(settings(built, channel))) as a,
        TestClient(create_app(settings(built, channel))) as b,
    ):
        for c in (a, b):
            assert until(lambda c=c: info(c)["reload_bus"]["subscribed"]), info(c)
        a.portal.call(lifecycle.reload_quietly, a.app.state.ctr)  # what SIGHUP runs
        assert info(a)["version"] == "2"
        assert until(lambda: info(b)["version"] == "2"), info(b)
        rc = Redis.from_url(REDIS_URL)
        record = orjson.loads(rc.get(a.app.state.ctr.bus.last_key))
        rc.close()
        assert record["version"] == "2" and record["configured"] == "1"
        assert record["newest"] == 2


def test_a_broken_deployment_version_that_is_also_the_newest_is_loaded_once(
    built: Built, channel: str, tmp_path: Path
) -> None:
    """The deployment's version is the newest, and it is broken here: the start does not
    load it a second time as CTR_MODEL_VERSION=latest, but goes on to the fallback (the
    newest older version that loads)."""
    from service import metrics as m

    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    latest = settings(built, channel, store, model_version="latest")
    with TestClient(create_app(latest)) as a:
        r = a.post("/admin/reload", json={}, headers=KEY)  # the newest: 2, recorded
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
    (root / "2" / "model.onnx").write_bytes(b"\x00garbage")
    failed = m.ERRORS.labels("model_load")
    before = failed._value.get()
    with TestClient(create_app(latest)) as b:
        got = info(b)
        assert got["version"] == "1" and got["fallback"]["newest"] == "2"
    assert failed._value.get() - before == 1  # version 2 tried once, not twice


def test_the_start_up_load_holds_the_reload_lock(
    channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment serves 3, whose files have not reached this host at start-up: the
    worker starts on its own setting (2, a slow load) and tries 3 again later. That retry
    must wait for the start-up load: run beside it, it would load 3 first and then see the
    slower load of 2 swapped in over it, for good."""
    from types import SimpleNamespace

    from ctr.bundle import BundleError
    from service import lifecycle
    from service.state import State

    store = tmp_path / "models"
    for v in ("1", "2", "3"):
        (store / "m" / v).mkdir(parents=True)
        (store / "m" / v / "manifest.json").write_text("{}")
    missing = {"3"}
    tried: list[str] = []

    def load_model(s: Settings, version: str | None = None) -> Any:
        v = s.model_version if version is None else version
        tried.append(v)
        time.sleep(1.0 if v == "2" else 0.01)  # the start-up's own load is the slow one
        if v in missing:
            raise BundleError(f"version {v} is not on this host yet")
        return SimpleNamespace(name="m", version=v, native=None, provider="cpu",
                               graph="standard", precision="fp32",
                               bundle=SimpleNamespace(dense_bounds={}))  # fmt: skip

    monkeypatch.setattr(lifecycle, "load_model", load_model)
    monkeypatch.setattr(lifecycle, "settle_heap", lambda full=True: None)

    async def scenario() -> list[str]:
        s = Settings(models_dir=str(store), model_name="m", model_version="2",
                     redis_url=REDIS_URL, reload_channel=channel)  # fmt: skip
        state = State(s)
        redis = AsyncRedis.from_url(REDIS_URL)
        peer = ReloadBus(redis, REDIS_URL, channel, str(store), "m", 1.0, 1.0, asyncio.Lock(),
                         lambda version: asyncio.sleep(0), configured="2")  # fmt: skip
        await peer.baseline()
        await peer.publish("3")  # another worker moved the deployment to 3
        state.bus = ReloadBus(
            redis, REDIS_URL, channel, str(store), "m", 1.0, 1.0, state.reload_lock,
            lambda version: lifecycle.load(state, version), load_retry_s=0.3,
            configured="2", serving=lambda: state.model.version if state.model else None,
        )  # fmt: skip
        swaps: list[str] = []
        deployed = await state.bus.baseline()
        assert deployed == "3"

        async def files_land() -> None:  # once the start-up's try of 3 has failed
            await until_async(lambda: "2" in tried, "the start-up's load of 2")
            missing.discard("3")

        landing = asyncio.create_task(files_land())
        await lifecycle.start_up(state, deployed)
        swaps.append(state.model.version)
        await until_async(lambda: state.model.version == "3", "the retry of 3", 5.0)
        await asyncio.sleep(1.5)  # nothing may swap 2 back in
        swaps.append(state.model.version)
        await landing
        for bus in (state.bus, peer):
            await bus.aclose()
        await redis.aclose()
        return swaps

    assert asyncio.run(scenario()) == ["2", "3"]


def test_a_start_up_fallback_passes_over_the_versions_the_deployment_rolled_back_from(
    built: Built, channel: str, tmp_path: Path
) -> None:
    """CTR_MODEL_VERSION=latest; the deployment rolled back from 3 (bad) to 2; then 4
    (the fix) arrives, its files not all there yet. A worker starting now cannot take
    the rollback's record (a newer export) and finds 4 broken: its fallback took 3, the
    version the deployment left, while its peers served 2 (review, session 40). It now
    serves 2, and without a rollback recorded still the newest that loads (3)."""
    models = tmp_path / "models"
    root = models / built.config.name
    shutil.copytree(built.models_dir / built.config.name / "1", root / "1")
    for v in ("2", "3"):
        shutil.copytree(root / "1", root / v)
    latest = settings(built, channel, models, model_version="latest")
    with TestClient(create_app(latest)) as a:
        assert info(a)["version"] == "3"
        r = a.post("/admin/reload", json={"version": "2"}, headers=KEY)
        assert r.status_code == 200, r.text
        shutil.copytree(root / "3", root / "4")
        with open(root / "4" / "model.onnx", "r+b") as f:  # still being copied
            f.truncate(1000)
        with TestClient(create_app(latest)) as b:  # a worker (re)starts
            got = info(b)
            assert got["version"] == "2", got  # the fleet's, not the one rolled back from
            assert got["fallback"]["newest"] == "4"
            assert info(a)["version"] == "2"
    # another deployment (no rollback recorded): the newest that loads, as before
    other = settings(built, channel + ":other", models, model_version="latest")
    with TestClient(create_app(other)) as c:
        got = info(c)
        assert got["version"] == "3" and got["fallback"]["newest"] == "4", got


def _three_versions(
    built: Built, channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Settings]:
    """Versions 1 to 3 of the bundle in a store of its own, and the settings serving its
    "latest"; a start-up fallback's retry and the bus's every 0.2 s (30 s and more in
    the service)."""
    from service import lifecycle, reloadbus

    monkeypatch.setattr(lifecycle, "FALLBACK_RETRY_S", 0.2)
    monkeypatch.setattr(reloadbus, "LOAD_RETRY_S", 0.2)
    models = tmp_path / "models"
    root = models / built.config.name
    shutil.copytree(built.models_dir / built.config.name / "1", root / "1")
    for v in ("2", "3"):
        shutil.copytree(root / "1", root / v)
    return root, settings(built, channel, models, model_version="latest")


def _broken(root: Path, version: str, copy: bool = True) -> None:
    """Version ``version`` with a truncated graph (a copy of 3 first, where ``copy``)."""
    if copy:
        shutil.copytree(root / "3", root / version)
    with open(root / version / "model.onnx", "r+b") as f:
        f.truncate(1000)


def test_a_fallback_retry_does_not_take_a_version_the_deployment_rolled_back_from(
    built: Built, channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above: rolled back from 3 to 2, then 4 exported broken; a worker starting now
    falls back to 2 (passing over 3). The broken 4 is then deleted: "latest" is 3 again,
    and a fresh start would serve 2 (the record, adoptable again). The fallback's retry
    of "latest" must not swap in 3, the version the deployment rolled back from, while
    its peers serve 2 (review, session 47: it did, and said "fallback over")."""
    root, latest = _three_versions(built, channel, tmp_path, monkeypatch)
    with TestClient(create_app(latest)) as a:
        assert a.post("/admin/reload", json={"version": "2"}, headers=KEY).status_code == 200
        _broken(root, "4")
        with TestClient(create_app(latest)) as b:
            assert info(b)["version"] == "2" and info(b)["fallback"]["newest"] == "4"
            shutil.rmtree(root / "4")  # the broken export withdrawn
            time.sleep(1.5)  # several retry periods
            got = info(b)
            assert got["version"] == "2", got  # what its peers serve, and a fresh start
            assert got["fallback"] is None, got  # what the deployment chose: no fallback
            assert info(a)["version"] == "2"
        with TestClient(create_app(latest)) as c:  # a fresh start, for comparison
            assert info(c)["version"] == "2"


def test_a_fallback_retry_whose_rollback_version_does_not_load_takes_what_a_start_does(
    built: Built, channel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the rollback's version 2 does not load on this host either: the
    fallback serves 1. Once the broken 4 is withdrawn a fresh start serves 3 (the
    record's 2 fails, then CTR_MODEL_VERSION): the retry took only 2, failing for good
    (serving 1, a reload_error for a version nobody reloaded, fallback naming a 4 gone)."""
    root, latest = _three_versions(built, channel, tmp_path, monkeypatch)
    with TestClient(create_app(latest)) as a:
        assert a.post("/admin/reload", json={"version": "2"}, headers=KEY).status_code == 200
        _broken(root, "4")
        _broken(root, "2", copy=False)
        with TestClient(create_app(latest)) as b:
            assert info(b)["version"] == "1" and info(b)["fallback"]["newest"] == "4"
            shutil.rmtree(root / "4")  # the broken export withdrawn
            time.sleep(1.5)
            got = info(b)
            with TestClient(create_app(latest)) as c:  # a fresh start, for comparison
                fresh = info(c)
            assert fresh["version"] == "3", fresh
            assert got["version"] == fresh["version"] and got["fallback"] is None, got
            # and, as a fresh start, it tries the record's 2 again in the background
            # (the bus): once 2 loads here, it serves the deployment's version
            shutil.copy(root / "1" / "model.onnx", root / "2" / "model.onnx")
            assert until(lambda: info(b)["version"] == "2", 10), info(b)
