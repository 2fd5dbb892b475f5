"""POST /admin/reload reaches every worker of a deployment (service.reloadbus), with a
real Redis: two apps in this process stand for two workers; test_workers.py runs the
same with `ctr serve --workers 2`."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.settings import Settings
from tests.helpers import REDIS_URL, Built, build_bundle
from tests.redis_proc import free_port

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


def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def info(c: TestClient) -> dict[str, Any]:
    return c.get("/v1/models").json()


@pytest.fixture
def channel() -> Iterator[str]:
    name = f"test:reload:{uuid.uuid4().hex[:8]}"
    yield name
    r = Redis.from_url(REDIS_URL)
    for key in r.scan_iter(f"{name}:*"):
        r.delete(key)
    r.close()


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
        # a failed load on the first worker is not broadcast: nothing moves
        r = a.post("/admin/reload", json={"version": "9"}, headers=KEY)
        assert r.status_code == 409 and r.json()["serving"] == "1"
        time.sleep(0.3)
        assert info(b)["version"] == "1"
        # the other deployment heard nothing
        assert info(other)["version"] == "1"
        assert other.app.state.ctr.bus.applied == 0
        assert a.app.state.ctr.bus.applied == 1 and b.app.state.ctr.bus.applied == 1


def test_a_worker_that_missed_the_message_catches_up(built: Built, channel: str) -> None:
    """A listener cut off from Redis reads the last broadcast when it subscribes again,
    and applies it only if it is newer than its own last load."""
    with TestClient(create_app(settings(built, channel))) as b:
        assert until(lambda: info(b)["reload_bus"]["subscribed"])
        bus = b.app.state.ctr.bus
        r = Redis.from_url(REDIS_URL)
        stale = {**bus.deployment, "version": "2", "origin": "gone", "at": time.time() - 60}
        r.set(bus.last_key, orjson.dumps(stale))
        r.client_kill_filter(_type="pubsub")  # the listener reconnects, reads the record
        time.sleep(1.5)
        assert info(b)["version"] == "1"  # older than its load: ignored
        fresh = {**stale, "at": time.time()}
        r.set(bus.last_key, orjson.dumps(fresh))
        r.client_kill_filter(_type="pubsub")
        assert until(lambda: info(b)["version"] == "2"), info(b)
        assert bus.applied == 1
        r.close()


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
