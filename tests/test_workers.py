"""Several uvicorn workers (Prometheus multiprocess mode) and provider settings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.model import ProviderError
from service.settings import Settings
from tests.helpers import (
    REDIS_URL,
    ROOT,
    Built,
    build_and_load,
    redis_asleep,
    service_env,
    settings_for,
    wait_for,
)
from tests.redis_proc import free_port
from tests.server_thread import kill_tree, process_running, serve_process


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("workers"), "din")


def metric(text: str, pattern: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_correct_with_two_workers(built: Built, tmp_path: Path) -> None:
    port = free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = service_env(
        built, REDIS_URL, CTR_INTRA_OP_THREADS="1", PROMETHEUS_MULTIPROC_DIR=str(prom_dir)
    )
    proc = serve_process(port, env, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        body = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(7)]}
        n, pids = 0, set()
        # at least 40 requests, and until both workers have scored some (bounded): the
        # totals below are then the sum of two processes' metrics
        while n < 40 or len(pids) < 2:
            assert n < 400, f"only worker(s) {pids} answered {n} requests"
            # a new connection per request spreads them over the workers; /v1/models on
            # the same (kept-alive) connection names the worker that scored
            with httpx.Client(base_url=base, timeout=10) as h:
                assert h.post("/v1/score", json=body).status_code == 200
                pids.add(h.get("/v1/models").json()["worker_pid"])
            n += 1
        assert len(pids) == 2, pids
        text = httpx.get(base + "/metrics", timeout=10).text
        assert metric(text, r"^ctr_candidates_per_request_count ") == n
        assert metric(text, r"^ctr_candidates_per_request_sum ") == 7 * n
        assert metric(text, r'^ctr_request_duration_seconds_count\{.*route="/v1/score"') == n
        assert metric(text, r'^ctr_stage_duration_seconds_count\{stage="inference"\}') == n
        assert metric(text, r"^ctr_model_info\{.*\} ") >= 1
        # each worker's memory, one series per worker (it answered /metrics or not)
        rss = dict(
            re.findall(r'^ctr_worker_resident_memory_bytes\{pid="(\d+)"\} (\S+)$', text, re.M)
        )
        assert sorted(int(p) for p in rss) == sorted(pids), (rss, pids)
        assert all(float(v) > 50e6 for v in rss.values()), rss
        assert metric(text, r"^ctr_worker_cpu_seconds_total ") > 1.0  # both workers' start-up
        # each worker's worst event-loop lag of the last 30 s, one series each
        lag = dict(re.findall(r'^ctr_event_loop_lag_max_seconds\{pid="(\d+)"\} (\S+)$', text, re.M))
        assert sorted(int(p) for p in lag) == sorted(pids), (lag, pids)
        assert all(0 <= float(v) < 30 for v in lag.values()), lag
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("access_log", ["true", "false"])
def test_access_log_setting(built: Built, tmp_path: Path, access_log: str) -> None:
    """CTR_ACCESS_LOG: uvicorn's line per request at `info`, or none; the service's own
    log and the request metrics are there either way."""
    port = free_port()
    env = service_env(built, REDIS_URL, CTR_LOG_LEVEL="info", CTR_ACCESS_LOG=access_log)
    path = tmp_path / "serve.log"
    with path.open("wb") as log:
        proc = serve_process(port, env, log=log)
        base = f"http://127.0.0.1:{port}"
        try:
            body = {"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
            for _ in range(3):
                assert httpx.post(base + "/v1/score", json=body, timeout=10).status_code == 200
            text = httpx.get(base + "/metrics", timeout=10).text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = path.read_text()
    assert "model loaded name=" in out  # the service's own log at info either way
    assert out.count('"POST /v1/score HTTP/1.1" 200') == (3 if access_log == "true" else 0)
    assert metric(text, r'^ctr_request_duration_seconds_count\{.*route="/v1/score"') == 3


@pytest.mark.parametrize("fmt,workers", [("text", "1"), ("json", "2")])
def test_log_lines_name_their_request(built: Built, tmp_path: Path, fmt: str, workers: str) -> None:
    """CTR_LOG_FORMAT under `ctr serve`: the access line of a request (uvicorn's) names
    its X-Request-ID, as the service's own lines do; with `json` every line of every
    worker is one JSON object."""
    port = free_port()
    env = service_env(built, REDIS_URL, CTR_LOG_LEVEL="info", CTR_LOG_FORMAT=fmt,
                      CTR_INTRA_OP_THREADS="1")  # fmt: skip
    path = tmp_path / "serve.log"
    body = {"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
    with path.open("wb") as log:
        proc = serve_process(port, env, "--workers", workers, log=log)
        try:
            for k in range(4):
                r = httpx.post(f"http://127.0.0.1:{port}/v1/score", json=body, timeout=10,
                               headers={"X-Request-ID": f"{fmt}-{k}"})  # fmt: skip
                assert r.status_code == 200 and r.headers["x-request-id"] == f"{fmt}-{k}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if fmt == "text":
        access = [line for line in lines if '"POST /v1/score HTTP/1.1" 200' in line]
        assert [line.rsplit(" ", 1)[1] for line in access] == [
            f"request_id=text-{k}" for k in range(4)
        ]
        assert any("model loaded name=" in line for line in lines)
        return
    docs = [json.loads(line) for line in lines]  # every line: one object
    assert all({"time", "level", "logger", "message", "request_id"} <= d.keys() for d in docs)
    access = [d for d in docs if d["logger"] == "uvicorn.access" and d["method"] == "POST"]
    assert [(d["request_id"], d["method"], d["path"], d["status"]) for d in access] == [
        (f"json-{k}", "POST", "/v1/score", 200) for k in range(4)
    ]
    loaded = [d for d in docs if d["message"].startswith("model loaded name=")]
    assert len(loaded) == int(workers) and all(d["request_id"] is None for d in loaded)
    assert any(d["logger"].startswith("uvicorn.error") for d in docs)  # uvicorn's own too


def test_admin_reload_reaches_every_worker(built: Built, tmp_path: Path) -> None:
    """`POST /admin/reload` lands on one worker; the others load the same version."""
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    port = free_port()
    env = service_env(
        built, REDIS_URL, CTR_MODELS_DIR=str(store), CTR_INTRA_OP_THREADS="1",
        CTR_API_KEY="k", CTR_RELOAD_CHANNEL=f"test:workers:{port}",
    )  # fmt: skip
    proc = serve_process(port, env, "--workers", "2")
    base = f"http://127.0.0.1:{port}"

    def seen(into: dict[int, tuple[str, bool]]) -> dict[int, tuple[str, bool]]:
        """worker pid -> (version served, listening for reloads), over fresh connections
        (spread over the workers); each answer updates ``into``."""
        for _ in range(20):
            with httpx.Client(base_url=base, timeout=10) as h:
                body = h.get("/v1/models").json()
                into[body["worker_pid"]] = (body["version"], body["reload_bus"]["subscribed"])
        return into

    try:
        workers: dict[int, tuple[str, bool]] = {}
        deadline = time.monotonic() + 60
        while not (len(seen(workers)) == 2 and all(sub for _, sub in workers.values())):
            assert time.monotonic() < deadline, workers  # both up and listening
        assert {v for v, _ in workers.values()} == {"1"}
        shutil.copytree(root / "1", root / "2")
        r = httpx.post(base + "/admin/reload", json={}, headers={"X-API-Key": "k"}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
        assert r.json()["peers_notified"] == 1
        deadline = time.monotonic() + 20
        after: dict[int, tuple[str, bool]] = {}
        while not (len(seen(after)) == 2 and {v for v, _ in after.values()} == {"2"}):
            assert time.monotonic() < deadline, after
            time.sleep(0.2)
        assert set(after) == set(workers)  # the same two workers, both on version 2
        # and Prometheus sees it so: one `ctr_model_info` 1 per worker, on version 2
        text = httpx.get(base + "/metrics", timeout=10).text
        on = [ln for ln in text.splitlines()
              if ln.startswith("ctr_model_info{") and ln.endswith(" 1.0")]  # fmt: skip
        assert len(on) == 2 and all('version="2"' in ln for ln in on), on
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_require_gpu_refuses_cpu(built: Built) -> None:
    s = Settings(
        models_dir=str(built.models_dir),
        model_name=built.config.name,
        redis_url=REDIS_URL,
        require_gpu=True,
    )
    before = set(threading.enumerate())
    with pytest.raises(ProviderError, match="CTR_REQUIRE_GPU"), TestClient(create_app(s)):
        pass
    # what the start-up had opened is closed: its graph threads (ort_0) outlived it, for
    # the rest of the process (a review, session 46)
    wait_for(lambda: not [t for t in set(threading.enumerate()) - before
                          if t.name.startswith("ort")], "the graph threads ended", 5)  # fmt: skip


def test_a_redis_that_refuses_the_service_ends_its_start(built: Built) -> None:
    """A Redis that answers and refuses the service (no password, a wrong one, a
    database it does not have) ended nothing: the worker started ready and served every
    request degraded, cold-start scores (an earlier review). Now the start-up fails
    naming CTR_REDIS_URL, its password hidden, and ``ctr serve`` exits 3; the right
    password starts, and a Redis that does not answer still serves degraded."""
    from service.store import RedisRefused
    from tests.redis_proc import private_redis

    with private_redis() as rp:
        rp.client().config_set("requirepass", "s3cret")
        admin = redis.Redis(port=rp.port, password="s3cret")
        admin.acl_setuser("pingonly", enabled=True, passwords=["+pw"], commands=["+ping"],
                          keys=["*"])  # fmt: skip
        # may read users, not items (HMGET ctr:item:*): every score degraded as well
        admin.acl_setuser("nohmget", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+ping", "+lrange", "+hgetall", "+select"])  # fmt: skip
        admin.acl_setuser("userkeys", enabled=True, passwords=["+pw"], keys=["{u:*"],
                          commands=["+@all"])  # fmt: skip
        for url, said in (
            # may PING, not read: every request degraded (diff review)
            (f"redis://pingonly:pw@127.0.0.1:{rp.port}/0", "credentials or commands"),
            (f"redis://nohmget:pw@127.0.0.1:{rp.port}/0", "credentials or commands"),
            (f"redis://userkeys:pw@127.0.0.1:{rp.port}/0", "credentials or commands"),
            (f"redis://127.0.0.1:{rp.port}/0", "refused the service's credentials"),
            (f"redis://:wrong@127.0.0.1:{rp.port}/0", "refused the service's credentials"),
            (f"redis://:s3cret@127.0.0.1:{rp.port}/99", "has no such database"),
        ):
            s = settings_for(built, redis_url=url)
            with pytest.raises(RedisRefused) as info, TestClient(create_app(s)):
                pass
            text = str(info.value)
            assert text.startswith("CTR_REDIS_URL: the Redis at ") and said in text, text
            assert "wrong" not in text and "s3cret" not in text
        body = {"user_id": "u1", "candidates": [{"item_id": "i1"}]}
        for url, degraded in ((f"redis://:s3cret@127.0.0.1:{rp.port}/0", False),
                              ("redis://127.0.0.1:1/0", True)):  # fmt: skip
            with TestClient(create_app(settings_for(built, redis_url=url))) as c:
                assert c.get("/readyz").json()["ready"] is True
                r = c.post("/v1/score", json=body)
                assert r.status_code == 200 and r.json()["degraded"] is degraded, r.text
        # a user that may read and not run the events' script: the events answer a 500
        # naming Redis's refusal, without Retry-After (a 503 "retry" that no retry
        # outlasts: diff review)
        admin.acl_setuser("noscript", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+@all", "-@scripting"])  # fmt: skip
        admin.close()
        url = f"redis://noscript:pw@127.0.0.1:{rp.port}/0"
        with TestClient(create_app(settings_for(built, redis_url=url))) as c:
            ev = {"user_id": "u1", "event_id": "acl-1", "item_id": "i1", "timestamp": 1.0}
            r = c.post("/v1/events", json=ev)
            assert r.status_code == 500 and "retry-after" not in r.headers, r.text
            assert r.json()["error"] == "store_refused"
            assert "(Redis refused it: NOPERM); not retryable" in r.json()["detail"]
        env = service_env(built, f"redis://:wrong@127.0.0.1:{rp.port}/0", CTR_LOG_LEVEL="error")
        cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1",
               "--port", str(free_port())]  # fmt: skip
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "start-up failed: RedisRefused: CTR_REDIS_URL: the Redis at redis://:***@" in done.stderr
    assert "wrong" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_that_fails_to_start_fails_ctr_serve(built: Built, workers: str) -> None:
    """With several workers, uvicorn's supervisor stopped and returned normally when a
    worker failed to start: ``ctr serve`` exited 0, which a unit restarting on failure
    takes for a clean stop. It exits 3 (uvicorn's own status with one worker)."""
    env = service_env(built, REDIS_URL, CTR_REQUIRE_GPU="1", CTR_LOG_LEVEL="error")
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1",
           "--port", str(free_port()), "--workers", workers]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    # the error in one line: Starlette's 30-line traceback of it is cut (CTR_TRACEBACK)
    assert "start-up failed: ProviderError: CTR_REQUIRE_GPU=1" in done.stderr
    assert "Traceback" not in done.stderr
    if workers == "2":
        assert "ctr serve: error: a worker failed to start" in done.stderr


def test_only_the_projects_own_start_up_errors_lose_their_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn logs the traceback Starlette sends of a failed start-up: the project's own
    error is cut to its last line; another exception (a bug) keeps it, as does every one
    with CTR_TRACEBACK=1 (the filter is not installed)."""
    import logging

    from service.logs import StartupErrorFilter, uvicorn_log_config

    def logged(text: str) -> str:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, "f", 1, text, None, None)
        StartupErrorFilter().filter(record)
        return record.getMessage()

    frames = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
    own = logged(frames + "service.model.ProviderError: CTR_REQUIRE_GPU=1 but CPU\n")
    assert own == ("start-up failed: ProviderError: CTR_REQUIRE_GPU=1 but CPU "
                   "(CTR_TRACEBACK=1 for the traceback)")  # fmt: skip
    bug = frames + "AttributeError: 'NoneType' object has no attribute 'run'\n"
    assert logged(bug) == bug
    assert logged("Exception in ASGI application\n") == "Exception in ASGI application\n"
    monkeypatch.setenv("CTR_TRACEBACK", "0")
    assert uvicorn_log_config("text")["handlers"]["default"]["filters"] == ["startup"]
    monkeypatch.setenv("CTR_TRACEBACK", "1")
    assert "filters" not in uvicorn_log_config("text")["handlers"]["default"]


def test_cuda_provider_without_cuda_is_an_error(built: Built) -> None:
    s = Settings(
        models_dir=str(built.models_dir),
        model_name=built.config.name,
        redis_url=REDIS_URL,
        provider="cuda",
    )
    with TestClient(create_app(s)) as c:  # not required: runs not-ready, says why
        r = c.get("/readyz")
        assert r.status_code == 503 and "CTR_PROVIDER=cuda" in r.json()["model_error"]


CRASHED_WORKER = """
import os
from service import metrics as m
m.IN_FLIGHT.inc()  # dies serving a request
m.set_model_info("din", "1", "cpu", "fused", "fp32")
os._exit(9)  # no clean-up: as a worker that crashed
"""

NEW_WORKER = """
import json, os
from service import metrics as m
m.IN_FLIGHT.inc()
m.set_model_info("din", "1", "cpu", "fused", "fp32")
before = m.render()[0].decode()
dropped = m.forget_dead_workers()
print(json.dumps({"pid": os.getpid(), "dropped": dropped, "before": before,
                  "after": m.render()[0].decode()}))
"""


RELOADING_WORKER = """
import json
from service import metrics as m
m.set_model_info("din", "1", "cpu", "fused", "fp32")
m.set_model_info("din", "2", "cpu", "fused", "fp32")
m.set_model_info("din", "3", "cpu", "fused", "fp32")
print(json.dumps(m.render()[0].decode()))
"""


@pytest.mark.parametrize("pooled", [True, False], ids=["workers", "one"])
def test_a_replaced_version_leaves_model_info(tmp_path: Path, pooled: bool) -> None:
    """After reloads ``/metrics`` shows one ``ctr_model_info`` series per worker, the
    serving version's: each replaced version's stayed at 0 for good, one series more per
    worker with every reload (a soak review)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if pooled:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", RELOADING_WORKER], env=env, cwd=root,
                         capture_output=True, text=True, check=True)  # fmt: skip
    text = json.loads(out.stdout)
    infos = re.findall(r"^ctr_model_info\{(.*)\} (\S+)$", text, re.M)
    assert len(infos) == 1 and 'version="3"' in infos[0][0] and infos[0][1] == "1.0", infos
    assert "ctr_model_info" in text.split("# TYPE ctr_model_info")[0]  # its HELP still said


def test_a_new_worker_drops_the_live_gauges_of_a_dead_one(tmp_path: Path) -> None:
    """Several workers: a worker that died (here with a request in flight) leaves its
    gauge files behind; the worker that replaces it drops them at start, so
    ``ctr_requests_in_flight`` and ``ctr_model_info`` count only live workers."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    crashed = subprocess.run([sys.executable, "-c", CRASHED_WORKER], env=env, cwd=root)
    assert crashed.returncode == 9
    dead = {int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob("gauge_live*_*.db")}
    assert len(dead) == 1
    out = subprocess.run([sys.executable, "-c", NEW_WORKER], env=env, cwd=root,
                         capture_output=True, text=True, check=True)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["dropped"] == sorted(dead)
    assert metric(got["before"], r"^ctr_requests_in_flight ") == 2
    assert metric(got["after"], r"^ctr_requests_in_flight ") == 1
    infos = re.findall(r'^ctr_model_info\{.*pid="(\d+)".*\} 1\.0$', got["after"], re.M)
    assert infos == [str(got["pid"])]


def _spawned_workers(parent: int) -> list[int]:
    """The pids of the uvicorn workers (multiprocessing spawns) ``parent`` has started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker pids from /proc")
def test_a_sighup_to_a_worker_still_importing_is_a_reload_not_an_exit(
    built: Built, tmp_path: Path
) -> None:
    """Each worker is a new interpreter: until it had imported the app, SIGHUP's default
    action ended it (uvicorn then started another, on the old version). Spawned with the
    signal blocked, it notes it once it takes it over, and reloads the newest version
    after its first load, broadcasting it to the other worker."""
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    shutil.copytree(root / "1", root / "2")
    port = free_port()
    env = service_env(
        built, REDIS_URL, CTR_MODELS_DIR=str(store), CTR_MODEL_VERSION="1",
        CTR_INTRA_OP_THREADS="1", CTR_RELOAD_CHANNEL=f"test:early-hup:{port}",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not (early := _spawned_workers(proc.pid)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.002)
        os.kill(early[0], signal.SIGHUP)  # as soon as it exists, long before its imports end
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 90
        while not (len(seen) == 2 and set(seen.values()) == {"2"}):
            assert time.monotonic() < deadline, seen
            try:
                for _ in range(10):  # fresh connections spread over the workers
                    with httpx.Client(base_url=base, timeout=10) as h:
                        body = h.get("/v1/models").json()
                    if body.get("worker_pid"):
                        seen[body["worker_pid"]] = body["version"]
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert early[0] in seen  # the worker signalled lived on
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_restart_leaves_no_series_of_the_workers_it_replaced(
    built: Built, tmp_path: Path
) -> None:
    """SIGHUP to the parent restarts the workers, each replacement started before the
    worker it replaces stops: that one, still alive then, escaped the sweep at start, and
    ``/metrics`` kept its model, memory and tracking series for good. A worker drops its
    own as it exits."""
    port = free_port()
    env = service_env(built, REDIS_URL, CTR_INTRA_OP_THREADS="1",
                      CTR_RELOAD_CHANNEL=f"test:restart:{port}")  # fmt: skip
    proc = serve_process(port, env, "--workers", "2")
    base = f"http://127.0.0.1:{port}"

    def workers() -> set[int]:
        pids = set()
        for _ in range(20):
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=10) as h:
                pids.add(h.get(base + "/v1/models").json()["worker_pid"])
        return pids

    def series() -> set[int]:
        text = httpx.get(base + "/metrics", timeout=10).text
        return {int(p) for p in re.findall(r'^ctr_model_info\{.*pid="(\d+)"', text, re.M)}

    try:
        deadline = time.monotonic() + 60
        while len(before := workers()) < 2:
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not (len(after := workers()) == 2 and not after & before and series() == after):
            assert time.monotonic() < deadline, (before, after, series())
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


SLOW_START = '''
import sys
import threading
if "--multiprocessing-fork" in sys.argv:  # a worker uvicorn spawned
    import asyncio
    from service import lifecycle
    _start_up = lifecycle.start_up
    import os
    async def start_up(state, deployed):  # a model that takes 7 s (or more) longer to load
        marker = os.environ.get("SLOW_AFTER")  # only once this file exists, where named
        if not marker or os.path.exists(marker):
            await asyncio.sleep(float(os.environ.get("SLOW_START_S", "7")))
        await _start_up(state, deployed)
    lifecycle.start_up = start_up
'''


def _worker_pids(base: str, n: int = 12) -> set[int]:
    seen = set()
    for _ in range(n):  # a new connection each: either worker may answer
        with httpx.Client(base_url=base, timeout=5) as h:
            seen.add(h.get("/v1/models").json()["worker_pid"])
    return seen


def _gauge_pids(base: str) -> set[int]:
    text = httpx.get(base + "/metrics", timeout=5).text
    found = re.findall(r'^ctr_worker_resident_memory_bytes\{pid="(\d+)"\}', text, re.M)
    return set(map(int, found))


@pytest.mark.parametrize("timeout_s", ["60", "2", "stop"])
def test_a_sighup_restart_waits_for_workers_that_load_slowly(
    built: Built, tmp_path: Path, timeout_s: str
) -> None:
    """SIGHUP to the parent restarts the workers one by one, each new one in service
    before the old one goes; uvicorn waited 5 s for a new one to be ready, then gave
    the restart up (every worker left on the old model) for any model that took longer
    to load. It waits CTR_WORKER_START_TIMEOUT_S; a restart given up anyway leaves no
    series of the worker it killed in /metrics (it showed a third worker, 0 bytes)."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_START)
    env = service_env(built, REDIS_URL, CTR_LOG_LEVEL="info", PYTHONPATH=f"{ROOT}:{tmp_path}",
                      CTR_WORKER_START_TIMEOUT_S=timeout_s)  # fmt: skip
    marker = tmp_path / "slow-now"
    if timeout_s == "stop":  # new workers that take 40 s: a restart the stop must not await
        env |= {"CTR_WORKER_START_TIMEOUT_S": "60", "SLOW_START_S": "40",
                "SLOW_AFTER": str(marker)}  # fmt: skip
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = serve_process(port, env, "--workers", "2", log=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while len(before := _worker_pids(base)) < 2 and time.time() < deadline:
                time.sleep(0.5)  # the second worker may still be loading
            assert len(before) == 2
            marker.touch()
            proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 60
            if timeout_s == "stop":
                # a SIGTERM during the restart (docker stop mid-reload) waited in the
                # queue for the whole restart: up to the timeout per worker
                time.sleep(1)
                stopped = time.time()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
                assert time.time() - stopped < 30, time.time() - stopped  # not 40 s and on
            elif timeout_s == "60":
                after = _worker_pids(base)
                while (before & after or len(after) < 2) and time.time() < deadline:
                    time.sleep(0.5)  # both replaced, and both seen answering
                    after = _worker_pids(base)
                assert not before & after and len(after) == 2, (before, after)
                assert "aborting the restart" not in log_path.read_text()
                assert _gauge_pids(base) == after
            else:
                while "aborting the restart" not in log_path.read_text():
                    assert time.time() < deadline, log_path.read_text()[-2000:]
                    time.sleep(0.5)
                # the old two answer on (a busy machine may hand one a dozen new
                # connections in a row: sampled until both are seen, or a stranger)
                seen, deadline = _worker_pids(base), time.time() + 30
                while len(seen) < 2 and time.time() < deadline:
                    seen |= _worker_pids(base)
                assert seen == before
                assert _gauge_pids(base) == before  # the killed new worker's are gone
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_a_request_cut_by_the_shutdown_gets_the_apps_503(built: Built) -> None:
    """A request still in flight when the graceful shutdown's wait ran out was answered
    by uvicorn's plain-text 500, without the request's ID, and logged as a traceback.
    It is the app's 503 `shutting_down` with its X-Request-ID (a retry goes elsewhere),
    on the fast route (scoring) and through the stack (events) alike."""
    import threading

    from tests.redis_proc import private_redis

    bodies = {
        "/v1/score": {"user_id": "u1", "candidates": [{"item_id": "i1"}]},
        "/v1/events": {"user_id": "u1", "event_id": "e1", "item_id": "i1", "type": "click",
                       "timestamp": time.time()},
    }  # fmt: skip
    got: dict[str, httpx.Response] = {}
    with private_redis() as redis_proc:
        env = service_env(built, redis_proc.url, CTR_REQUEST_TIMEOUT_MS="30000",
                          CTR_REDIS_TIMEOUT_MS="30000", CTR_USER_TRACKING="false",
                          CTR_RELOAD_CHANNEL="")  # fmt: skip
        port = free_port()
        proc = serve_process(port, env)
        base = f"http://127.0.0.1:{port}"

        def post(route: str) -> None:
            rid = {"X-Request-ID": f"cut{route.replace('/', '-')}"}
            got[route] = httpx.post(base + route, json=bodies[route], timeout=60, headers=rid)

        # Redis answers nothing for 13 s (a redis-py Redis(host=...) re-sent its DEBUG
        # SLEEP on each 5 s socket timeout: Redis slept until the test stopped it, 30 s on)
        stall = redis_asleep(redis_proc.url, 13)
        clients = [threading.Thread(target=post, args=(route,)) for route in bodies]
        for c in clients:
            c.start()
        time.sleep(1.0)  # the requests wait on Redis
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(60)
        proc.wait(60)
        stall.join(30)
    for route in bodies:
        r = got[route]
        assert r.status_code == 503, (route, r.text)
        assert r.json()["error"] == "shutting_down"
        want = f"cut{route.replace('/', '-')}"
        assert r.headers["x-request-id"] == want == r.json()["request_id"]
        assert "retry-after" in r.headers


@pytest.mark.parametrize(("workers", "status"), [("1", -signal.SIGTERM), ("2", 0)])
def test_sigterm_exit_status_is_the_documented_one(
    built: Built, tmp_path: Path, workers: str, status: int
) -> None:
    """README: a SIGTERM drains `ctr serve` as uvicorn does, which ends one worker by the
    signal again (143 in a shell) and the supervisor of several with 0."""
    (tmp_path / "prom").mkdir()
    env = service_env(built, REDIS_URL, CTR_WORKERS=workers,
                      PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))  # fmt: skip
    proc = serve_process(free_port(), env)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == status
    readme = (ROOT / "README.md").read_text()
    assert "143 with one worker, 0 from the supervisor of several" in " ".join(readme.split())


def test_the_supervisor_refuses_new_connections_while_the_workers_drain(
    built: Built, tmp_path: Path
) -> None:
    """With several workers the supervisor holds the listening socket too: after a
    SIGTERM, while the workers drained, new connections went into its queue, accepted
    by no one, and were reset when it exited, each request sent on one lost (a workers
    review). They are refused from a moment after the signal."""
    with _two_workers(built, tmp_path) as (proc, port):
        _refused_while_draining(proc, port, 1.5)


@contextlib.contextmanager
def _two_workers(built: Built, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """``ctr serve`` with two workers (an 8 s read timeout), and its port; killed after
    if still running."""
    (tmp_path / "prom").mkdir()
    env = service_env(built, REDIS_URL, CTR_WORKERS="2", CTR_READ_TIMEOUT_MS="8000",
                      PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))  # fmt: skip
    port = free_port()
    proc = serve_process(port, env)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def _refused_while_draining(proc: subprocess.Popen, port: int, after_s: float) -> None:
    """SIGTERM to ``ctr serve`` while a request whose body never comes holds a worker's
    drain (until the read timeout): ``after_s`` later, still draining, a new connection
    is refused; then the supervisor exits 0."""
    import socket

    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(after_s)
    assert proc.poll() is None  # still draining
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    held.close()
    assert proc.wait(timeout=60) == 0


def test_workers_stop_once_their_supervisor_is_killed(built: Built, tmp_path: Path) -> None:
    """A SIGKILL of ``ctr serve --workers 2``'s supervisor alone left both workers
    serving for good, holding the port and writing their tracking probe key into Redis
    (a review, session 46: the leak that fresh-clone CI saw). Each worker now sees its
    supervisor gone within about a second and stops as on a SIGTERM."""
    with _two_workers(built, tmp_path) as (proc, port):
        deadline = time.time() + 60
        while len(workers := _workers_of(proc.pid)) < 2:
            assert time.time() < deadline
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        wait_for(lambda: not any(process_running(w) for w in workers),
                 "the workers to stop after their supervisor's SIGKILL", 20)  # fmt: skip


def _workers_of(pid: int) -> list[int]:
    """The uvicorn worker processes under the supervisor ``pid``."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = []
    for kid in (int(p) for p in out.split()):
        try:  # a worker just killed may be gone (reaped) between pgrep and the read
            if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                found.append(kid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def test_a_worker_starting_at_sigterm_does_not_reopen_the_socket(
    built: Built, tmp_path: Path
) -> None:
    """A worker restarted (its predecessor died) still in its start-up at SIGTERM: the
    first fix shut the shared socket 0.3 s after the signal, and the worker's server then
    listen()ed on it again, taking new connections into the queue for the rest of the
    drain, to be reset (a review). The supervisor closes its own copy instead."""
    with _two_workers(built, tmp_path) as (proc, port):
        deadline = time.time() + 60
        while len(_workers_of(proc.pid)) < 2:
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(3)
        dead = _workers_of(proc.pid)[0]
        os.kill(dead, signal.SIGKILL)
        while dead in _workers_of(proc.pid) or len(_workers_of(proc.pid)) < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        # the other worker's drain held; 5 s: the new worker's start-up has ended
        _refused_while_draining(proc, port, 5.0)
