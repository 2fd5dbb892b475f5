"""Faults: Redis down / slow / back, model lifecycle and hot reload, overload, deadlines,
graceful shutdown, API keys. Every Redis fault is a real redis-server this test starts,
stops and restarts on its own port."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.loader import load_into_redis
from service.schemas import ReadyBody
from service.settings import Settings
from tests.helpers import Built, build_bundle, redis_asleep, service_env, wait_for
from tests.redis_proc import RedisProcess, free_port, private_redis
from tests.server_thread import ServerThread, serve_process

BODY = {"user_id": "u3", "candidates": [{"item_id": f"i{k}"} for k in range(30)]}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("rel"), "din")


@pytest.fixture()
def rp(built: Built) -> Iterator[RedisProcess]:
    with private_redis("--appendonly", "yes", "--appendfsync", "always") as proc:
        load_into_redis(built.config, built.frame, proc.url, progress=False)
        yield proc


def settings_for(built: Built, url: str, **kw: object) -> Settings:
    base: dict = {
        "models_dir": str(built.models_dir),
        "model_name": built.config.name,
        "redis_url": url,
        "redis_timeout_ms": 150,
        "redis_connect_timeout_ms": 150,
    }
    base.update(kw)
    return Settings(**base)


def degraded_count(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ctr_degraded_responses_total "):
            return float(line.split()[-1])
    return 0.0


def test_redis_down_mid_traffic_then_back(built: Built, rp: RedisProcess) -> None:
    with TestClient(create_app(settings_for(built, rp.url))) as c:
        ok = c.post("/v1/score", json=BODY).json()
        assert ok["degraded"] is False and ok["cold_start"] is False
        before = degraded_count(c)
        rp.stop()
        r = c.post("/v1/score", json=BODY)
        assert r.status_code == 200
        body = r.json()
        assert body["degraded"] is True and len(body["items"]) == 30
        assert degraded_count(c) == before + 1
        ready = c.get("/readyz")  # it still serves (degraded): still ready
        assert ready.status_code == 200 and ready.json()["redis"] is False, ready.text
        assert ready.json()["degraded"] is True
        ev = c.post(
            "/v1/events",
            json={"user_id": "u3", "event_id": "x1", "item_id": "i1", "timestamp": 5.0},
        )
        assert ev.status_code == 503 and ev.headers["retry-after"] == "1"
        assert ev.json()["error"] == "store_unavailable"
        rp.start()  # same port, same AOF: the data is still there
        back = c.post("/v1/score", json=BODY).json()
        assert back["degraded"] is False and back["cold_start"] is False
        assert back["items"] == ok["items"]
        assert c.get("/readyz").json()["degraded"] is False
        ev = c.post(
            "/v1/events",
            json={"user_id": "u3", "event_id": "x1", "item_id": "i1", "timestamp": 5.0},
        )
        assert ev.status_code == 202 and ev.json()["appended"] is True


def test_a_key_of_the_wrong_type_is_not_a_store_outage(
    built: Built, rp: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A user key of another type than the service writes (WRONGTYPE) is no outage that
    a retry outlasts: an event for that user was a 503 with ``Retry-After: 1`` for good
    (a client following the contract retried forever) and the log named only
    ``ResponseError``. Now the event is a 500 ``store_data_error`` quoting Redis, without
    Retry-After, counted once as ``store_data_error``; scoring still serves degraded,
    counted as ``redis_data``; both log Redis's message."""
    from service.store import user_key

    event = {"user_id": "u3", "event_id": "w1", "item_id": "i1", "timestamp": 5.0}
    with TestClient(create_app(settings_for(built, rp.url, user_tracking=False))) as c:
        assert c.post("/v1/score", json=BODY).json()["degraded"] is False
        seq = user_key("u3", "seq")
        kept = rp.client().dump(seq)
        rp.client().delete(seq)
        rp.client().set(seq, "not a list")

        def data_errors() -> tuple[float, float]:
            """(degraded scores, refused events): each counted once."""
            got = {"redis_data": 0.0, "store_data_error": 0.0}
            for line in c.get("/metrics").text.splitlines():
                for kind in got:
                    if line.startswith(f'ctr_errors_total{{kind="{kind}"}}'):
                        got[kind] = float(line.split()[-1])
            return got["redis_data"], got["store_data_error"]

        # the counters are the process's: an earlier test file's (test_store_reader's)
        # made them 1 before this one ran
        scored, refused = data_errors()
        with caplog.at_level("WARNING", logger="ctr"):
            r = c.post("/v1/score", json=BODY)
            assert r.status_code == 200 and r.json()["degraded"] is True
            ev = c.post("/v1/events", json=event)
        assert ev.status_code == 500, ev.text
        assert ev.json()["error"] == "store_data_error" and "WRONGTYPE" in ev.json()["detail"]
        assert "retry-after" not in ev.headers
        assert data_errors() == (scored + 1, refused + 1)
        assert sum("WRONGTYPE" in rec.getMessage() for rec in caplog.records) == 2
        assert c.get("/readyz").json()["degraded"] is False  # the store is up
        rp.client().delete(seq)
        rp.client().restore(seq, 0, kept)  # fixed: both work again
        assert c.post("/v1/score", json=BODY).json()["degraded"] is False
        assert c.post("/v1/events", json=event).status_code == 202


def test_readiness_that_requires_redis(built: Built) -> None:
    """``CTR_READY_REQUIRES_REDIS=true``: /readyz is 503 while Redis does not answer (the
    default keeps a worker that serves degraded in the load balancer)."""
    port = free_port()
    proc = RedisProcess(port)
    s = settings_for(built, proc.url).model_copy(update={"ready_requires_redis": True})
    with TestClient(create_app(s)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False, ready.text
        # the body the schema declares for the 503 (service.schemas.ReadyBody)
        assert ReadyBody.model_validate(ready.json()).ready is False
        assert c.post("/v1/score", json=BODY).json()["degraded"] is True
        proc.start()
        try:
            assert c.get("/readyz").status_code == 200
        finally:
            proc.stop()
    with TestClient(create_app(settings_for(built, proc.url))) as c:  # the default
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["degraded"] is True, ready.text


@pytest.mark.parametrize("warm", [6, 0])
def test_a_fresh_worker_opens_its_read_connections_at_start_up(
    built: Built, rp: RedisProcess, warm: int
) -> None:
    """A burst on a fresh worker opened one connection per request inside the reads'
    50 ms budget, and some of it degraded (0-12 of 64 at once, `scripts/burst_fresh.py`).
    The worker opens ``CTR_REDIS_WARM_CONNECTIONS`` at start-up, which its first requests
    use: no connection is made for them."""
    from redis import Redis

    probe = Redis.from_url(rp.url)
    made = lambda: int(probe.info("stats")["total_connections_received"])  # noqa: E731
    # nothing else connects meanwhile (the tracking heartbeat's writes, the reload bus)
    s = settings_for(built, rp.url, redis_warm_connections=warm, user_tracking=False,
                     reload_channel="")  # fmt: skip
    with TestClient(create_app(s)) as c:
        reader = c.app.state.ctr.reader  # type: ignore[attr-defined]
        assert len(reader.idle) == warm
        before = made()
        r = c.post("/v1/score", json=BODY).json()
        assert r["degraded"] is False and r["cold_start"] is False
        assert made() - before == (0 if warm else 1)
        assert len(reader.idle) == max(warm, 1)
        # Redis closes them while idle (a restart, its timeout): the next request drops
        # every one it sees closed, with no write to learn it, and reads on a new one
        probe.client_kill_filter(_type="normal", skipme=True)
        time.sleep(0.2)
        r = c.post("/v1/score", json=BODY).json()
        assert r["degraded"] is False and r["cold_start"] is False
        assert len(reader.idle) == 1


def test_redis_down_at_start_up(built: Built) -> None:
    port = free_port()
    proc = RedisProcess(port)
    with TestClient(create_app(settings_for(built, proc.url))) as c:
        assert len(c.app.state.ctr.reader.idle) == 0  # type: ignore[attr-defined]
        ready = c.get("/readyz").json()
        assert ready["model"] is True and ready["redis"] is False
        assert c.post("/v1/score", json=BODY).json()["degraded"] is True
        proc.start()
        try:
            load_into_redis(built.config, built.frame, proc.url, progress=False)
            r = c.post("/v1/score", json=BODY).json()
            assert r["degraded"] is False and r["cold_start"] is False
            assert c.get("/readyz").status_code == 200
        finally:
            proc.stop()


@pytest.mark.parametrize("tracking", [True, False], ids=["tracking", "no-tracking"])
def test_redis_slow_degrades_within_deadline(
    built: Built, rp: RedisProcess, tracking: bool
) -> None:
    """A request that must read a sleeping Redis degrades within the deadline. With
    CTR_USER_TRACKING, a user whose kept rows no write has touched needs no read, so
    is answered in full meanwhile (nothing can be written while Redis sleeps)."""
    s = settings_for(built, rp.url, redis_timeout_ms=100, user_tracking=tracking)
    other = {**BODY, "user_id": "u7"}  # not scored before the sleep: nothing kept
    with TestClient(create_app(s)) as c:
        first = c.post("/v1/score", json=BODY).json()
        assert first["degraded"] is False
        blocker = redis_asleep(rp.url, 1)
        r = c.post("/v1/score", json=other)
        kept = c.post("/v1/score", json=BODY).json()
        blocker.join()
        assert r.status_code == 200 and r.json()["degraded"] is True
        if tracking:
            assert kept["degraded"] is False and kept["items"] == first["items"]
        else:
            assert kept["degraded"] is True
        back = c.post("/v1/score", json=other).json()
        assert back["degraded"] is False  # recovers
        assert back["cold_start"] is False, back  # u7's real rows, not the degraded read's


def test_reload_under_traffic_zero_failures(built: Built, rp: RedisProcess) -> None:
    from training.export import export_bundle
    from training.train import load_run

    s = settings_for(built, rp.url, redis_timeout_ms=1000, api_key="adm1n-key")
    results: list[tuple[int, str | None]] = []
    errors: list[BaseException] = []  # a traffic thread that died: its requests are missing
    stop = threading.Event()
    with ServerThread(create_app(s)) as srv:

        def traffic() -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=10) as h:
                    while not stop.is_set():
                        r = h.post("/v1/score", json=BODY)
                        status = r.status_code  # first: an error answer has no "model"
                        try:
                            version = r.json()["model"]["version"]
                        except (ValueError, KeyError, TypeError):
                            version = None
                        results.append((status, version))
            except BaseException as exc:  # the assertion below reports it
                errors.append(exc)

        threads = [threading.Thread(target=traffic) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        config, mapper, model, metrics = load_run(built.run_dir)
        v_new, _, _ = export_bundle(model, config, mapper, metrics, built.models_dir)
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            denied = h.post("/admin/reload", json={})
            assert denied.status_code == 401
            r = h.post("/admin/reload", json={}, headers={"X-API-Key": "adm1n-key"})
            assert r.status_code == 200 and r.json()["version"] == str(v_new)
            time.sleep(0.5)
            # a corrupt newer version is refused and the current one keeps serving
            bad = built.models_dir / built.config.name / str(v_new + 1)
            shutil.copytree(built.models_dir / built.config.name / str(v_new), bad)
            (bad / "model.onnx").write_bytes(b"not an onnx graph")
            r = h.post("/admin/reload", json={}, headers={"X-API-Key": "adm1n-key"})
            assert r.status_code == 409 and r.json()["serving"] == str(v_new)
            assert "corrupt" in r.json()["detail"]
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        shutil.rmtree(bad)
    assert not errors, f"a traffic thread failed: {errors!r}"
    statuses = {code for code, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, f"failed requests during reload: {statuses}"
    assert str(v_new - 1) in versions and str(v_new) in versions
    assert versions[-1] == str(v_new)


def test_overload_answers_fast_503(built: Built, rp: RedisProcess) -> None:
    s = settings_for(built, rp.url, max_in_flight=1, redis_timeout_ms=3000)
    app = create_app(s)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as h:
        assert h.post("/v1/score", json=BODY).status_code == 200
        first: list[httpx.Response] = []
        # another user: a user already scored may need no read (CTR_USER_TRACKING)
        other = {**BODY, "user_id": "u7"}
        slow = threading.Thread(target=lambda: first.append(h.post("/v1/score", json=other)))
        blocker = redis_asleep(rp.url, 1)
        slow.start()
        # the slow request holds the one slot (it waits on the sleeping Redis)
        wait_for(lambda: app.state.ctr.in_flight == 1, "the first request in flight", 5)
        r = h.post("/v1/score", json=BODY)
        assert r.status_code == 503 and r.json()["error"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        # shed before its body is parsed: even a body that would be a 422 costs no parse
        r = h.post("/v1/score", json={"user_id": "u1", "candidates": "not a list"})
        assert r.status_code == 503 and r.json()["error"] == "overloaded"
        slow.join()
        blocker.join()
        assert first[0].status_code == 200


def test_deadline_exceeded(built: Built, rp: RedisProcess) -> None:
    s = settings_for(built, rp.url, redis_timeout_ms=3000, request_timeout_ms=200)
    with TestClient(create_app(s)) as c:
        blocker = redis_asleep(rp.url, 1)
        r = c.post("/v1/score", json=BODY)
        blocker.join()
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded"


def test_the_deadline_counts_the_parse(
    built: Built, rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline starts once the body is read: a parse that takes longer than it
    (here made slow on purpose) is a 503, though the scoring after it is fast."""
    import service.routes as routes_mod

    real = routes_mod.score_input

    def slow_parse(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return real(*args, **kwargs)

    s = settings_for(built, rp.url, request_timeout_ms=200)
    with TestClient(create_app(s)) as c:
        assert c.post("/v1/score", json=BODY).status_code == 200
        monkeypatch.setattr(routes_mod, "score_input", slow_parse)
        r = c.post("/v1/score", json=BODY)
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded"
        monkeypatch.setattr(routes_mod, "score_input", real)
        assert c.post("/v1/score", json=BODY).status_code == 200


def test_events_wait_for_a_slow_store_up_to_the_request_deadline(
    built: Built, rp: RedisProcess
) -> None:
    """Writes are bounded by CTR_REQUEST_TIMEOUT_MS, not the scoring reads' 50 ms socket
    timeout: a store 300 ms slow still takes the event (item lookup included). Past the
    deadline the answer is a 503, and the retry stores the behaviour once in all."""
    import orjson

    from service.store import event_keys, user_key

    user = "slow-store-user"
    seq = user_key(user, "seq")
    r = rp.client()
    r.delete(*event_keys(user))
    ev = {"user_id": user, "event_id": "s1", "item_id": "i3", "timestamp": 10.0}

    def while_blocked(c: TestClient, seconds: float, body: dict) -> object:
        blocker = redis_asleep(rp.url, seconds)
        try:
            return c.post("/v1/events", json=body)
        finally:
            blocker.join()

    s = settings_for(built, rp.url, redis_timeout_ms=50, request_timeout_ms=3000)
    with TestClient(create_app(s)) as c:
        res = while_blocked(c, 0.3, ev)
        assert res.status_code == 202 and res.json()["appended"] is True, res.text
    stored = [orjson.loads(x) for x in r.lrange(seq, 0, -1)]
    assert [e["item_id"] for e in stored] == ["i3"] and "cate_id" in stored[0]

    s = settings_for(built, rp.url, redis_timeout_ms=50, request_timeout_ms=150)
    with TestClient(create_app(s)) as c:
        late = {**ev, "event_id": "s2", "item_id": "i4", "timestamp": 11.0}
        res = while_blocked(c, 0.5, late)
        assert res.status_code == 503 and res.json()["error"] == "store_unavailable"
        again = c.post("/v1/events", json=late)
        assert again.status_code == 202
        assert again.json()["appended"] or again.json()["duplicate"]
    assert [orjson.loads(x)["item_id"] for x in r.lrange(seq, 0, -1)] == ["i3", "i4"]


def test_an_event_refused_by_a_read_only_replica_says_so(
    built: Built, rp: RedisProcess
) -> None:
    """A service pointed at a replica answered every event "the behaviour store is
    unavailable; retry", which no retry outlasts, like a moment's outage (a writes
    review, session 46): the 503 now names Redis's refusal (its code only), and nothing
    is stored; scoring still reads the replica."""
    with private_redis("--replicaof", "127.0.0.1", str(rp.port)) as replica:
        wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up",
                 "the replica in sync", 10)  # fmt: skip
        with TestClient(create_app(settings_for(built, replica.url))) as c:
            ev = {"user_id": "on-replica", "event_id": "r1", "item_id": "i3", "timestamp": 1.0}
            res = c.post("/v1/events", json=ev)
            assert res.status_code == 503 and res.headers["retry-after"], res.text
            body = res.json()
            assert body["error"] == "store_unavailable"
            assert body["detail"] == ("the behaviour store is unavailable (Redis refused it: "
                                      "READONLY); retry"), body  # fmt: skip
            assert c.post("/v1/score", json=BODY).status_code == 200
    assert rp.client().exists("{u:on-replica}:seq") == 0


def test_a_bug_is_a_json_500_without_internals(
    built: Built, rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (here: the model's run raises) answers the documented JSON
    error body with status 500, on the ASGI fast path and on FastAPI's routes alike, and
    the message names no internals."""
    from service import metrics as m

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    s = settings_for(built, rp.url, native_runner=False)  # the Python runner's run raises
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        before = m.ERRORS.labels("internal")._value.get()
        monkeypatch.setattr(c.app.state.ctr.model, "run", boom)
        r = c.post("/v1/score", json=BODY)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "internal" and "RuntimeError" in r.json()["detail"]
        assert "secret" not in r.text
        monkeypatch.setattr(c.app.state.ctr, "require_model", boom)
        ev = {"user_id": "u1", "event_id": "x1", "item_id": "i1", "timestamp": 1.0}
        r = c.post("/v1/events", json=ev)
        assert r.status_code == 500 and r.json()["error"] == "internal"
        assert "secret" not in r.text
        assert m.ERRORS.labels("internal")._value.get() == before + 2


def _serve(built: Built, url: str, port: int) -> subprocess.Popen:
    return serve_process(port, service_env(built, url, CTR_REDIS_TIMEOUT_MS="3000"))


def _in_flight(base: str) -> float:
    """The service's ``ctr_requests_in_flight`` gauge."""
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("ctr_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("ctr_requests_in_flight not in /metrics")


def test_sighup_reloads_and_sigterm_drains(built: Built, rp: RedisProcess) -> None:
    from training.export import export_bundle
    from training.train import load_run

    port = free_port()
    proc = _serve(built, rp.url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        v_old = httpx.post(base + "/v1/score", json=BODY).json()["model"]["version"]
        config, mapper, model, metrics = load_run(built.run_dir)
        v_new, _, _ = export_bundle(model, config, mapper, metrics, built.models_dir)
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 30
        version = v_old
        while version != str(v_new) and time.time() < deadline:
            time.sleep(0.1)
            version = httpx.post(base + "/v1/score", json=BODY).json()["model"]["version"]
        assert version == str(v_new)
        # SIGTERM while a request is in flight: it completes, then the process exits
        inflight: list[httpx.Response] = []
        other = {**BODY, "user_id": "u7"}  # not scored yet: it must read the sleeping Redis
        req = threading.Thread(
            target=lambda: inflight.append(httpx.post(base + "/v1/score", json=other, timeout=10))
        )
        blocker = redis_asleep(rp.url, 1)
        req.start()
        wait_for(lambda: _in_flight(base) == 1, "the request in flight", timeout=5)
        proc.send_signal(signal.SIGTERM)
        req.join()
        blocker.join()
        assert inflight[0].status_code == 200 and inflight[0].json()["degraded"] is False
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sighup_while_connections_drain_at_shutdown_is_ignored(
    built: Built, rp: RedisProcess, tmp_path: Path
) -> None:
    """Shutdown begins at SIGTERM: uvicorn then waits (up to 10 s) for open connections
    before the lifespan's end. A SIGHUP meanwhile reloaded the model (and broadcast it to
    the deployment) from a process on its way out; it is ignored from SIGTERM on."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        env = service_env(built, rp.url, CTR_LOG_LEVEL="info", CTR_ACCESS_LOG="false")
        proc = serve_process(port, env, log=log)
        try:
            held = socket.create_connection(("127.0.0.1", port))
            held.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: b"Shutting down" in log_path.read_bytes(), "the shutdown")
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: b"SIGHUP during shutdown: ignored" in log_path.read_bytes(),
                     "the SIGHUP noted as ignored")  # fmt: skip
            held.close()
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert "model loaded" not in text.split("Shutting down", 1)[1], text


def test_sighup_during_start_up_reloads_once_started(built: Built, tmp_path: Path) -> None:
    """SIGHUP while the lifespan is still starting (here: the reload bus's first Redis
    read hangs on a server that never answers, for its 2 s bound) must not end the
    process: the reload runs once the first load is done."""
    import socket
    import sys

    import httpx

    from training.export import export_bundle
    from training.train import load_run

    models = tmp_path / "models"
    shutil.copytree(built.models_dir / built.config.name / "1", models / built.config.name / "1")
    config, mapper, model, metrics = load_run(built.run_dir)
    v2, _, _ = export_bundle(model, config, mapper, metrics, models)
    silent = socket.socket()  # accepts connections (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = free_port()
    env = service_env(built, f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                      CTR_MODELS_DIR=str(models), CTR_MODEL_VERSION="1",
                      CTR_REDIS_TIMEOUT_MS="3000", CTR_LOG_LEVEL="info")  # fmt: skip
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        starting = threading.Event()

        def drain(stream: Any) -> None:  # read stderr to its end: the pipe never fills
            for line in stream:
                if "Waiting for application startup" in line:
                    starting.set()

        threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
        assert starting.wait(60), "the lifespan never started"
        time.sleep(0.3)  # inside the lifespan, before the first load is done
        proc.send_signal(signal.SIGHUP)
        version = None
        deadline = time.time() + 60
        while version != str(v2) and time.time() < deadline and proc.poll() is None:
            try:
                version = httpx.get(f"http://127.0.0.1:{port}/v1/models").json().get("version")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, f"the process ended: {proc.returncode}"
        assert version == str(v2)
    finally:
        proc.kill()
        proc.wait()
        silent.close()


def test_a_sighup_before_the_lifespan_is_a_reload_after_the_first_load(
    built: Built, tmp_path: Path
) -> None:
    """`ctr serve` notes a SIGHUP that arrives during its imports (service.hup) instead of
    dying; the lifespan turns it into a reload of the newest version once it has loaded
    CTR_MODEL_VERSION."""
    import os

    from service import hup
    from training.export import export_bundle
    from training.train import load_run

    models = tmp_path / "models"
    shutil.copytree(built.models_dir / built.config.name / "1", models / built.config.name / "1")
    config, mapper, model, metrics = load_run(built.run_dir)
    v2, _, _ = export_bundle(model, config, mapper, metrics, models)
    before = signal.getsignal(signal.SIGHUP)
    try:
        hup.install()
        os.kill(os.getpid(), signal.SIGHUP)  # the process lives on: the signal is noted
        assert hup.pending
        s = Settings(models_dir=str(models), model_name=built.config.name, model_version="1",
                     redis_url="redis://127.0.0.1:1/0")  # fmt: skip
        with TestClient(create_app(s)) as c:
            deadline = time.time() + 30
            while c.get("/v1/models").json()["version"] != str(v2) and time.time() < deadline:
                time.sleep(0.1)
            assert c.get("/v1/models").json()["version"] == str(v2)
        assert not hup.pending  # taken by that app's lifespan, once
    finally:
        signal.signal(signal.SIGHUP, before)
        hup.pending = False


def test_corrupt_bundle_keeps_service_not_ready(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    shutil.copytree(built.models_dir / built.config.name / "1", models / "broken" / "1")
    (models / "broken" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    s = Settings(models_dir=str(models), model_name="broken", redis_url="redis://127.0.0.1:1/0")
    with caplog.at_level(logging.ERROR), TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "corrupt" in r.json()["model_error"]
    assert any("not-ready" in rec.getMessage() and "corrupt" in rec.getMessage()
               for rec in caplog.records)  # fmt: skip


KEY = {"X-API-Key": "k"}


def assert_no_model(c: TestClient, newest: str) -> None:
    """No model is loaded (no fallback either), and the error is the newest's: Redis is
    unreachable in these settings, so a 503 from /readyz alone would say nothing."""
    ready = c.get("/readyz", headers=KEY)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["model"] is False and body["fallback"] is None, body
    assert newest in body["model_error"], body
    models = c.get("/v1/models")
    assert models.status_code == 503 and models.json()["error"] == "model_not_ready", models.text


def test_a_broken_newest_version_falls_back_at_start_up(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CTR_MODEL_VERSION=latest, a worker that starts (or restarts) while the newest
    version is broken serves the newest one that loads, as the rest of a fleet does after
    a rejected reload, and says so; it keeps trying the newest (the failure may pass),
    and a good load clears the note. A pinned version never falls back, at most
    FALLBACK_VERSIONS older ones are tried, and when none loads the service stays
    not-ready."""
    import service.lifecycle

    monkeypatch.setattr(service.lifecycle, "FALLBACK_RETRY_S", 0.2)
    good = built.models_dir / built.config.name / "1"
    models = tmp_path / "models"
    for v in ("1", "2", "3"):
        shutil.copytree(good, models / "m" / v)
    for v in ("2", "3"):
        (models / "m" / v / "model.onnx").write_bytes(b"\x00garbage")
    s = Settings(models_dir=str(models), model_name="m", redis_url="redis://127.0.0.1:1/0",
                 api_key="k")  # fmt: skip
    with caplog.at_level(logging.ERROR), TestClient(create_app(s)) as c:
        info = c.get("/v1/models", headers=KEY).json()
        assert info["version"] == "1"
        assert info["fallback"]["newest"] == "3" and "corrupt" in info["fallback"]["error"]
        assert c.get("/readyz", headers=KEY).json()["fallback"] == info["fallback"]
        # the error's text (paths in the store) only to a key holder: health routes are open
        for path in ("/readyz", "/v1/models"):
            hidden = c.get(path).json()["fallback"]
            assert hidden == {"newest": "3", "error": "hidden: send X-API-Key to read it"}
            assert c.get(path, headers={"X-API-Key": "wrong"}).json()["fallback"] == hidden
        assert b"\nctr_model_fallback 1.0\n" in c.get("/metrics").content  # to alert on
        shutil.rmtree(models / "m" / "3")
        shutil.copytree(good, models / "m" / "3")  # the copy has landed: retried, loads
        deadline = time.time() + 30
        while c.get("/v1/models").json()["version"] != "3" and time.time() < deadline:
            time.sleep(0.1)
        info = c.get("/v1/models").json()
        assert info["version"] == "3" and info["fallback"] is None
        assert b"\nctr_model_fallback 0.0\n" in c.get("/metrics").content
    assert any("does not load; serving version 1" in rec.getMessage() for rec in caplog.records)
    for v in ("4", "5"):  # v1 good, v2..v5 broken: v1 is beyond the 3 tried
        shutil.copytree(models / "m" / "2", models / "m" / v)
    (models / "m" / "3" / "model.onnx").write_bytes(b"\x00garbage")
    with TestClient(create_app(s)) as c:
        assert_no_model(c, "/5/")
    shutil.rmtree(models / "m" / "5")
    shutil.rmtree(models / "m" / "4")

    (models / "m" / "3" / "model.onnx").write_bytes(b"\x00garbage")
    pinned = s.model_copy(update={"model_version": "3"})
    with TestClient(create_app(pinned)) as c:
        assert_no_model(c, "/3/")  # v1 would load, but a pinned version never falls back
    (models / "m" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz", headers=KEY)
        assert r.status_code == 503 and "/3/" in r.json()["model_error"]
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["model_error"].startswith("hidden"), r.text


def test_api_key_guards_writes_and_is_never_logged(
    built: Built, rp: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-key-value"
    ev = {"user_id": "u1", "event_id": "k1", "item_id": "i1", "timestamp": 1.0}
    with caplog.at_level(logging.DEBUG):
        s = settings_for(built, rp.url, api_key=secret)
        assert secret not in repr(s) and secret not in str(s.model_dump())
        with TestClient(create_app(s)) as c:
            assert c.post("/v1/events", json=ev).status_code == 401
            bad = c.post("/v1/events", json=ev, headers={"X-API-Key": "wrong"})
            assert bad.status_code == 401 and bad.json()["field"] == "X-API-Key"
            good = c.post("/v1/events", json=ev, headers={"X-API-Key": secret})
            assert good.status_code == 202
            assert c.post("/v1/score", json=BODY).status_code == 200  # scoring open
        s2 = settings_for(built, rp.url, api_key=secret, protect_scoring=True)
        with TestClient(create_app(s2)) as c:
            assert c.post("/v1/score", json=BODY).status_code == 401
            ok = c.post("/v1/score", json=BODY, headers={"X-API-Key": secret})
            assert ok.status_code == 200
    assert all(secret not in rec.getMessage() for rec in caplog.records)
