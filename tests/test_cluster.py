"""Redis Cluster: a real local 3-master cluster this test creates with redis-server
``--cluster-enabled yes`` and ``redis-cli --cluster create``."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ctr.spec import FeatureConfig
from service.app import create_app
from service.loader import load_into_redis
from service.settings import Settings
from service.store import item_key, ping, redact, user_key
from tests.helpers import Built, build_bundle, missing, small_config
from tests.redis_proc import RedisProcess, free_cluster_port

NODE_ARGS = (
    "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
    # the surviving masters keep serving their slots when one master is lost
    "--cluster-require-full-coverage", "no",
    "--appendonly", "yes", "--appendfsync", "always",  # a restarted master keeps its data
)  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisProcess]]:
    if shutil.which("redis-cli") is None:
        missing("redis-cli is not installed (scripts/setup.sh installs redis-server)")
    nodes = []
    for _ in range(3):
        port = free_cluster_port()
        conf = ("--cluster-config-file", f"nodes-{port}.conf")
        nodes.append(RedisProcess(port, *NODE_ARGS, *conf).start())
    try:
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.time() + 30
        while time.time() < deadline:
            infos = [Redis(port=n.port).cluster("info") for n in nodes]
            if all(i["cluster_state"] == "ok" for i in infos):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("cluster did not reach state ok")
        yield nodes
    finally:
        for n in nodes:
            n.stop()
            shutil.rmtree(n.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("cluster"), "din")


def cluster_url(nodes: list[RedisProcess]) -> str:
    """The comma-separated URL list of ``nodes`` (CTR_REDIS_URL with CTR_REDIS_CLUSTER)."""
    return ",".join(f"redis://127.0.0.1:{n.port}" for n in nodes)


def node_of(nodes: list[RedisProcess], key: str) -> RedisProcess:
    slot = Redis(port=nodes[0].port).cluster("keyslot", key)
    for n in nodes:
        for lo, hi, *_ in Redis(port=n.port).cluster("slots"):
            if lo <= slot <= hi:
                owners = [r for r in Redis(port=n.port).cluster("slots") if r[0] <= slot <= r[1]]
                port = owners[0][2][1]
                return next(x for x in nodes if x.port == port)
    raise LookupError(key)


def total_reads(probes: list[Redis]) -> int:
    """Socket reads served by every node (each probe's INFO counts one on its node),
    less the reads spent on the client's topology refreshes (CLUSTER * / COMMAND), which
    redis-py's cluster client may send at any time and which are not the request's."""
    total = 0
    for p in probes:
        info = p.info("everything")  # stats and commandstats in one read
        topology = sum(
            int(v["calls"])
            for k, v in info.items()
            if k.startswith(("cmdstat_cluster", "cmdstat_command")) and isinstance(v, dict)
        )
        total += int(info["total_reads_processed"]) - topology
    return total


def test_reload_reaches_the_other_worker_on_a_cluster(
    built: Built, cluster: list[RedisProcess], tmp_path: Path
) -> None:
    """The broadcast's script and record go through the cluster client (one hash tag);
    the listener subscribes on a node, and a PUBLISH reaches every node's subscribers."""
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    shutil.copytree(root / "1", root / "2")
    # the nodes in a different order for each worker: they subscribe on different nodes
    urls = [f"redis://127.0.0.1:{n.port}" for n in cluster]
    kw = {"models_dir": str(store), "model_name": built.config.name, "model_version": "1",
          "redis_cluster": True, "redis_timeout_ms": 1000, "api_key": "k"}  # fmt: skip
    a_settings = Settings(redis_url=",".join(urls), **kw)  # type: ignore[arg-type]
    b_settings = Settings(redis_url=",".join(urls[::-1]), **kw)  # type: ignore[arg-type]
    with TestClient(create_app(a_settings)) as a, TestClient(create_app(b_settings)) as b:
        for c in (a, b):
            deadline = time.time() + 20
            while not c.get("/v1/models").json()["reload_bus"]["subscribed"]:
                assert time.time() < deadline
                time.sleep(0.05)
        r = a.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2" and r.json()["peers_notified"] == 1
        deadline = time.time() + 10
        while b.get("/v1/models").json()["version"] != "2":
            assert time.time() < deadline, b.get("/v1/models").json()
            time.sleep(0.05)


def test_cluster_load_score_round_trip_and_master_loss(
    built: Built, cluster: list[RedisProcess]
) -> None:
    url = cluster_url(cluster)
    counts = load_into_redis(built.config, built.frame, url, progress=False, cluster=True)
    assert counts["users"] == built.frame["user_id"].nunique()
    rc = RedisCluster.from_url(f"redis://127.0.0.1:{cluster[0].port}")
    assert rc.llen(user_key("u3", "seq")) > 0
    s = Settings(
        models_dir=str(built.models_dir),
        model_name=built.config.name,
        redis_url=url,
        redis_cluster=True,
        redis_timeout_ms=1000,
        request_timeout_ms=3000,
        reload_channel="",  # its listener's PINGs would count as reads below
    )
    cands = [{"item_id": f"i{k}"} for k in range(25)]
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/score", json={"user_id": "u3", "candidates": cands})
        assert r.status_code == 200
        assert r.json()["degraded"] is False and r.json()["cold_start"] is False
        # one round trip per request (warm item cache): summed over every node
        probes = [Redis(port=n.port) for n in cluster]
        total_reads(probes)  # connect the probes
        deltas = []
        for _ in range(3):
            before = total_reads(probes)
            c.post("/v1/score", json={"user_id": "u3", "candidates": cands})
            deltas.append(total_reads(probes) - before - len(probes))
        assert deltas == [1, 1, 1]
        ev = {"user_id": "u3", "event_id": "c-1", "item_id": "i5", "timestamp": 1.0}
        assert c.post("/v1/events", json=ev).json()["appended"] is True
        assert c.post("/v1/events", json=ev).json()["duplicate"] is True
        # kill the master that holds one user's slot; pick a user living elsewhere
        victim = node_of(cluster, user_key("u3", "seq"))
        other_user = next(
            f"u{k}" for k in range(300) if node_of(cluster, user_key(f"u{k}", "seq")) is not victim
        )
        c.post("/v1/score", json={"user_id": other_user, "candidates": cands})  # warm
        victim.stop()
        lost = c.post("/v1/score", json={"user_id": "u3", "candidates": cands})
        assert lost.status_code == 200 and lost.json()["degraded"] is True
        assert len(lost.json()["items"]) == len(cands)
        other = c.post("/v1/score", json={"user_id": other_user, "candidates": cands})
        assert other.status_code == 200  # degraded or not, never an error (see docs/api.md)
        ev = {"user_id": "u3", "event_id": "c-2", "item_id": "i6", "timestamp": 2.0}
        assert c.post("/v1/events", json=ev).status_code == 503
        victim.start()  # same port and node config: the master rejoins with its data
        deadline = time.time() + 30
        while time.time() < deadline:
            r1 = c.post("/v1/score", json={"user_id": "u3", "candidates": cands}).json()
            r2 = c.post("/v1/score", json={"user_id": other_user, "candidates": cands}).json()
            if not r1["degraded"] and not r2["degraded"]:
                break
            time.sleep(0.2)
        assert r1["degraded"] is False and r1["cold_start"] is False
        assert r2["degraded"] is False and r2["cold_start"] is False


def test_a_cluster_load_of_another_data_set_drops_its_item_features_on_every_node(
    built: Built, cluster: list[RedisProcess]
) -> None:
    """The item hashes of a data set the load replaces that the new one lacks are
    deleted on whichever node holds each (they kept the old values, the warning saying
    they were gone)."""
    url = cluster_url(cluster)
    load_into_redis(built.config, built.frame, url, progress=False, cluster=True)
    rc = RedisCluster.from_url(f"redis://127.0.0.1:{cluster[0].port}")
    stray = [item_key(f"old_{k}") for k in range(12)]
    for key in stray:
        rc.hset(key, "i1", "x")
    assert len({node_of(cluster, k).port for k in stray}) == 3  # on every node
    data = built.config.data.model_copy(update={"options": {**built.config.data.options,
                                                            "seed": 99}})  # fmt: skip
    other = built.config.model_copy(update={"data": data})
    counts = load_into_redis(other, built.frame, url, progress=False, cluster=True)
    assert counts["replaced"] is not None and "'seed': 99" in counts["replaced_differs"]
    assert not any(rc.exists(k) for k in stray)
    assert rc.exists(item_key("cate_id")) and rc.exists(item_key("item_price"))
    rc.close()


def test_a_cluster_url_with_an_encoded_password_and_no_scheme(built: Built, tmp_path: Path) -> None:
    """A password holding ``@ : /`` must be percent-encoded in a URL: the service's
    cluster client decodes it as ``ctr load`` does (it used to send it encoded, and never
    connect), a node list without a scheme works everywhere, and messages hide it."""
    port = free_cluster_port()
    conf = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
    node = RedisProcess(port, *conf).start()
    try:
        admin = Redis(port=port, decode_responses=True)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.time() + 30
        while admin.cluster("info")["cluster_state"] != "ok":
            assert time.time() < deadline, "one-node cluster did not reach state ok"
            time.sleep(0.1)
        admin.config_set("requirepass", "p@ss:w/rd")
        url = f":p%40ss%3Aw%2Frd@127.0.0.1:{port}"  # no scheme: node_urls adds redis://
        assert "p%40ss" not in redact(url) and ":***@" in redact(url)
        ping(url, cluster=True)
        load_into_redis(built.config, built.frame, url, progress=False, cluster=True)
        s = Settings(
            models_dir=str(built.models_dir), model_name=built.config.name, redis_url=url,
            redis_cluster=True, redis_timeout_ms=1000, reload_channel="",
        )  # fmt: skip
        cands = [{"item_id": f"i{k}"} for k in range(5)]
        with TestClient(create_app(s)) as c:
            assert c.get("/readyz").status_code == 200, c.get("/readyz").text
            r = c.post("/v1/score", json={"user_id": "u3", "candidates": cands})
            assert r.status_code == 200
            assert r.json()["degraded"] is False and r.json()["cold_start"] is False
            ev = {"user_id": "u3", "event_id": "pw-1", "item_id": "i5", "timestamp": 1e9}
            assert c.post("/v1/events", json=ev).json()["appended"] is True
        wrong = url.replace("w%2Frd", "x")
        with pytest.raises(RedisError, match=r"needs a password \(or another one\)") as info:
            ping(wrong, cluster=True)
        assert "p%40ss" not in str(info.value)
        # the service's start-up refuses it too: the cluster client's error holds the
        # node's refusal as its cause (it started, every request degraded: diff review)
        from service.store import RedisRefused

        for bad in (wrong, url.split("@", 1)[1]):  # a wrong password, none
            with pytest.raises(RedisRefused, match="refused the service's credentials"), \
                    TestClient(create_app(s.model_copy(update={"redis_url": bad}))):
                pass  # fmt: skip
    finally:
        node.stop()
        shutil.rmtree(node.dir, ignore_errors=True)


def test_the_impression_log_on_a_cluster(
    built: Built, cluster: list[RedisProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """The writer's pipelines and the reader's (stream pages, then the users' histories
    in one pipeline across every master's slots) go through the cluster client: each
    user's click labels its own served item. ``ctr impressions --cluster`` reads it
    too (Redis's clock for what is pending, the stream's info, the histories)."""
    import json

    from ctr.cli import main
    from service.impression_read import ImpressionReader
    from service.loader import sync_client

    url = cluster_url(cluster)
    stream = "test:cluster-impressions"
    users = [f"c{k}" for k in range(12)]
    masters = {node_of(cluster, user_key(u, "seq")).port for u in users}
    assert len(masters) > 1  # the histories live on more than one master
    s = Settings(models_dir=str(built.models_dir), model_name=built.config.name, redis_url=url,
                 redis_cluster=True, redis_timeout_ms=1000, request_timeout_ms=3000,
                 reload_channel="", impression_stream=stream)  # type: ignore[arg-type]  # fmt: skip
    cands = [{"item_id": f"i{k}"} for k in range(8)]
    with TestClient(create_app(s)) as c:
        for user in users:
            r = c.post("/v1/score", json={"user_id": user, "candidates": cands})
            assert r.status_code == 200
        now = time.time()
        for k, user in enumerate(users):
            ev = {"user_id": user, "event_id": f"ci-{user}", "item_id": f"i{k % 8}",
                  "type": "click", "timestamp": now + 1}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202
    client = sync_client(url, cluster=True)
    try:
        deadline = time.time() + 10
        while client.xlen(stream) < len(users):
            assert time.time() < deadline, "the impressions written"
            time.sleep(0.05)
        reader = ImpressionReader(client, stream, window_s=60.0, page=5)
        rows = list(reader)
        args = ["impressions", "--redis-url", url, "--cluster", "--stream", stream]
        assert main([*args, "--window-s", "60"]) == 0  # scored just now: all pending
        assert json.loads(capsys.readouterr().out)["pending"] == len(users) * len(cands)
        assert main([*args, "--window-s", "0.001"]) == 0  # closed: every history read
        got = json.loads(capsys.readouterr().out)
        assert (got["rows"], got["pending"], got["behaviours"]["counted"]) == (96, 0, 12)
        client.delete(stream)
    finally:
        client.close()
    assert reader.entries == len(users) and len(rows) == len(users) * len(cands)
    assert {(r.user_id, r.item_id) for r in rows if r.label} == {
        (u, f"i{k % 8}") for k, u in enumerate(users)
    }


@pytest.fixture(scope="module")
def small() -> tuple[FeatureConfig, pd.DataFrame]:
    from training.data import load_frame

    config = small_config("din", n_users=40)
    return config, load_frame(config)


def _stat(node: RedisProcess, section: str, name: str, field: str) -> int:
    """``INFO section``'s ``name`` ``field`` on ``node`` (0 before the first)."""
    return int(Redis.from_url(node.url).info(section).get(name, {}).get(field, 0))


def _evalsha_calls(node: RedisProcess) -> int:
    return _stat(node, "commandstats", "cmdstat_evalsha", "calls")


def _moved(node: RedisProcess) -> int:
    """The MOVED replies ``node`` has sent."""
    return _stat(node, "errorstats", "errorstat_MOVED", "count")


def _first_batch(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[RedisCluster, str], None]
) -> dict[str, Any]:
    """Run ``then(client, key)`` once, as the load's first batch of user replaces is
    about to be sent (its script loaded): ``key`` is the first call's (a user's seq).
    Returns what it saw: the user and the master that holds it."""
    import service.loader as loader

    real = loader._replace_users
    seen: dict[str, Any] = {}

    def replace(client: Any, calls: list[list[Any]]) -> None:
        if calls and not seen:
            key = str(calls[0][1])
            seen["user"] = key[len("{u:") : key.index("}")]
            real_load = client.script_load

            def load_then(script: str) -> str:
                sha = real_load(script)
                if "done" not in seen:
                    seen["done"] = True
                    then(client, key)
                return str(sha)

            monkeypatch.setattr(client, "script_load", load_then)
        real(client, calls)

    monkeypatch.setattr(loader, "_replace_users", replace)
    return seen


def test_a_cluster_load_never_replaces_a_user_twice_after_a_timeout(
    small: tuple[FeatureConfig, pd.DataFrame],
    cluster: list[RedisProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A master asleep past the client's timeout while the users' replaces are in
    flight: the load fails (one line), and no replace runs twice once it wakes. redis-py's
    cluster pipeline sent the node's calls again (10 retries by default), and each of
    its users was replaced twice, losing whatever was appended between the two."""
    import service.loader as loader
    from tests.helpers import redis_asleep

    config, frame = small
    real_client = loader.sync_client  # a short timeout: the sleep outlasts it
    monkeypatch.setattr(loader, "sync_client", lambda u, c, timeout_s=10: real_client(u, c, 0.3))
    for n in cluster:
        Redis.from_url(n.url).config_resetstat()
    asleep: list[threading.Thread] = []
    seen = _first_batch(
        monkeypatch,
        lambda client, key: asleep.append(redis_asleep(node_of(cluster, key).url, 0.8)),
    )
    try:
        with pytest.raises(RedisTimeoutError, match="not sent again"):
            load_into_redis(config, frame, cluster_url(cluster), progress=False, cluster=True)
    finally:
        for t in asleep:
            t.join()
    victim = node_of(cluster, user_key(seen["user"], "seq"))
    users = {str(u) for u in frame[config.data.user_key].astype(str)}
    held = sum(node_of(cluster, user_key(u, "seq")) is victim for u in users)
    assert 0 < _evalsha_calls(victim) <= held  # each at most once (it was twice each)


def test_a_cluster_load_keeps_an_event_appended_after_its_users_replace(
    small: tuple[FeatureConfig, pd.DataFrame],
    cluster: list[RedisProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection to a master drops once it has run a user's replace, and an event
    appended to that user meanwhile (POST /v1/events' script) stays: the load fails
    instead of sending the replace again, which wiped the event and its ID."""
    import orjson
    import redis.connection

    from service.store import APPEND_EVENT, event_keys

    config, frame = small
    real_read = redis.connection.Connection.read_response
    drop: dict[str, int] = {}

    def read_response(self: Any, *a: Any, **kw: Any) -> Any:
        reply = real_read(self, *a, **kw)
        if drop.pop("port", None) == self.port:  # the batch's first reply: its user's ran
            ev = orjson.dumps({"item_id": "meanwhile", "ts": 1.0})
            args = ("ev-meanwhile", 1.0, ev, 20, 20, 0, 1)
            keys = event_keys(seen["user"])
            with Redis.from_url(f"redis://127.0.0.1:{self.port}") as node:
                assert node.eval(APPEND_EVENT, 3, *keys, *args) == 1  # appended
            self.disconnect()
            raise RedisConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(redis.connection.Connection, "read_response", read_response)
    seen = _first_batch(monkeypatch, lambda _, key: drop.update(port=node_of(cluster, key).port))
    with pytest.raises(RedisConnectionError, match="not sent again"):
        load_into_redis(config, frame, cluster_url(cluster), progress=False, cluster=True)
    rc = RedisCluster.from_url(cluster[0].url)
    try:
        seq = [orjson.loads(e) for e in rc.lrange(user_key(seen["user"], "seq"), 0, -1)]
        assert {"item_id": "meanwhile", "ts": 1.0} in seq  # it was replaced away
        assert rc.zscore(user_key(seen["user"], "event_ids"), "ev-meanwhile") == 1.0
    finally:
        rc.close()


def test_a_cluster_load_follows_a_slot_that_moved_meanwhile(
    small: tuple[FeatureConfig, pd.DataFrame],
    cluster: list[RedisProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user's slot moves to another master once the load has read the slot map: the
    old master refuses the user's replace (MOVED, nothing run), which goes again to the
    new one; the load completes."""
    from service.store import event_keys

    config, frame = small

    def move(_: Any, key: str) -> None:
        source = node_of(cluster, key)
        target = next(n for n in cluster if n is not source)
        admin = Redis.from_url(source.url)
        user = seen["user"]  # _first_batch's, before it calls this
        admin.delete(user_key(user, "profile"), *event_keys(user))  # an empty slot moves
        slot = admin.cluster("keyslot", key)
        assert admin.cluster("countkeysinslot", slot) == 0
        target_id = Redis.from_url(target.url).execute_command("CLUSTER MYID")
        for n in [target, source, *(n for n in cluster if n not in (source, target))]:
            Redis.from_url(n.url).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        seen["from"], seen["to"], seen["moved"] = source, target, _moved(source)

    seen = _first_batch(monkeypatch, move)
    url = cluster_url(cluster)
    counts = load_into_redis(config, frame, url, progress=False, cluster=True)
    assert counts["users"] == frame[config.data.user_key].nunique()
    seq = user_key(seen["user"], "seq")
    assert node_of(cluster, seq) is seen["to"]
    assert Redis.from_url(seen["to"].url).llen(seq) > 0
    assert _moved(seen["from"]) > seen["moved"]  # the old master refused it


def test_a_read_follows_an_ask_redirect_while_its_slot_migrates(
    built: Built, cluster: list[RedisProcess]
) -> None:
    """A user whose slot is being resharded, one of its keys already on the importing
    node: redis-py 8.2's async cluster client follows the ASK redirect by sending
    ``ASKING`` and then the read as two pooled calls on that node, whose pool hands out
    its oldest free connection: with two or more free, the read went out on another
    connection than its ``ASKING``, the node answered MOVED back, the source ASK again,
    until ``TTL exhausted``: a degraded answer (a cluster review). ``service.store``
    makes the node's pool hand out its newest free connection: the one just used."""
    import asyncio

    url = cluster_url(cluster)
    load_into_redis(built.config, built.frame, url, progress=False, cluster=True)
    s = Settings(
        models_dir=str(built.models_dir), model_name=built.config.name, redis_url=url,
        redis_cluster=True, redis_timeout_ms=2000, request_timeout_ms=5000, reload_channel="",
    )  # fmt: skip
    user = "u7"
    seq = user_key(user, "seq")
    owner = node_of(cluster, seq)
    target = next(n for n in cluster if n is not owner)
    body = {"user_id": user, "candidates": [{"item_id": f"i{k}"} for k in range(12)]}
    src, dst = Redis(port=owner.port), Redis(port=target.port)
    slot = src.cluster("keyslot", seq)
    with TestClient(create_app(s)) as c:
        base = c.post("/v1/score", json=body).json()
        assert base["degraded"] is False and base["cold_start"] is False
        redis = c.app.state.ctr.redis  # type: ignore[attr-defined]

        async def warm() -> int:
            """Several connections to the importing node, as a worker under load has."""
            node = redis.get_node(host="127.0.0.1", port=target.port)
            await asyncio.gather(
                *[redis.execute_command("PING", target_nodes=node) for _ in range(4)]
            )
            return len(node._free)

        assert c.portal.call(warm) >= 2  # type: ignore[union-attr]
        dst.cluster("setslot", slot, "importing", src.cluster("myid"))
        src.cluster("setslot", slot, "migrating", dst.cluster("myid"))
        try:
            src.migrate("127.0.0.1", target.port, seq, 0, 5000)  # the profile stays
            got = c.post("/v1/score", json=body).json()
            assert got["degraded"] is False and got["cold_start"] is False
            assert got["items"] == base["items"]
        finally:  # the migration finished: the slot's other keys moved, then owned there
            for key in src.cluster("getkeysinslot", slot, 1000):
                src.migrate("127.0.0.1", target.port, key, 0, 5000)
            for n in cluster:
                Redis(port=n.port).cluster("setslot", slot, "node", dst.cluster("myid"))
        after = c.post("/v1/score", json=body).json()
        assert after["degraded"] is False and after["items"] == base["items"]
