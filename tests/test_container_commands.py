"""The commands the containers run, run outside Docker: the init job (train + export +
load), `ctr serve`, and the image's HEALTHCHECK command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.connection import parse_url

from service.store import user_key
from tests.helpers import BASE_REDIS_URL, ROOT, with_database
from tests.redis_proc import free_port
from tests.server_thread import serve_process


def own_database(url: str) -> str:
    """The test Redis of ``url`` (CTR_TEST_REDIS_URL: host, port, credentials) on a
    database of this test's own (it is emptied): 12, or 11 when the tests use 12 (the
    further test workers' databases are never either, tests/helpers.py)."""
    return with_database(url, 11 if parse_url(url).get("db", 0) == 12 else 12)


REDIS_URL = own_database(BASE_REDIS_URL)


def users_in(url: str) -> int:
    """Users with a stored history in the database at ``url``."""
    return sum(1 for _ in Redis.from_url(url).scan_iter(match="{u:*}:seq", count=1000))


def healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert m, "runtime HEALTHCHECK not found"
    return json.loads(m.group(1))


def init_env(tmp_path: Path, train_set: str) -> dict[str, str]:
    """The init job's environment: this venv's ctr first on PATH, a model store in
    ``tmp_path``, the test Redis, ``CTR_INIT_TRAIN_SET``."""
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        CTR_MODELS_DIR=str(tmp_path / "models"),
        CTR_MODEL_NAME="din",
        CTR_REDIS_URL=REDIS_URL,
        CTR_INIT_TRAIN_SET=train_set,
    )


def test_init_job_then_serve_then_healthcheck(tmp_path: Path) -> None:
    Redis.from_url(REDIS_URL).flushdb()
    env = init_env(tmp_path, 'train.epochs=1 data.options={"n_users":200}')
    init = ROOT / "deploy" / "docker" / "init.sh"
    first = subprocess.run(["sh", str(init)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert "exporting" in first.stdout and "init: done" in first.stdout
    assert (tmp_path / "models" / "din" / "1" / "model.onnx").is_file()
    assert Redis.from_url(REDIS_URL).llen(user_key("u0", "seq")) > 0
    # Redis holds the data the bundle was trained on: its 200 users, not the config
    # file's 2,000 (the load used to drop CTR_INIT_TRAIN_SET's overrides)
    assert users_in(REDIS_URL) == 200
    # a version folder, with overrides on top of the manifest's config
    Redis.from_url(REDIS_URL).flushdb()
    version = str(tmp_path / "models" / "din" / "1")
    load = subprocess.run(
        [sys.executable, "-m", "ctr.cli", "load", "--bundle", version,
         "--set", "data.options.n_users=50", "--quiet"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert load.returncode == 0, load.stderr[-2000:]
    assert "loaded 50 users" in load.stdout and users_in(REDIS_URL) == 50
    second = subprocess.run(["sh", str(init)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0 and "not training" in second.stdout
    assert not (tmp_path / "models" / "din" / "2").exists()
    # Redis held other data (50 users): loaded again
    assert "loaded 200 users" in second.stdout and users_in(REDIS_URL) == 200
    # it holds this data now: a third `up` (or a `compose run` of a dependant) keeps
    # what events wrote since; CTR_INIT_LOAD=force loads it again, 0 never
    r = Redis.from_url(REDIS_URL)
    r.rpush(user_key("u0", "seq"), b'{"item_id": "i1", "ts": 1.0}')
    moved_on = r.lrange(user_key("u0", "seq"), 0, -1)
    for load, held in (("1", True), ("0", True), ("force", False)):
        again = subprocess.run(["sh", str(init)], env=dict(env, CTR_INIT_LOAD=load), cwd=ROOT,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stderr[-2000:]
        assert (r.lrange(user_key("u0", "seq"), 0, -1) == moved_on) is held, load
    assert users_in(REDIS_URL) == 200
    bad = subprocess.run(["sh", str(init)], env=dict(env, CTR_INIT_LOAD="yes"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "CTR_INIT_LOAD must be" in bad.stderr

    port = free_port()
    serve_env = dict(env, CTR_PORT=str(port), CTR_HOST="127.0.0.1", CTR_LOG_LEVEL="warning")
    proc = serve_process(port, serve_env)
    try:
        hc = healthcheck_command()
        hc[0] = sys.executable if hc[0] == "python" else hc[0]
        assert subprocess.run(hc, env=serve_env, timeout=30).returncode == 0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/score",
                       json={"user_id": "u0", "candidates": [{"item_id": "i1"}]})  # fmt: skip
        assert r.status_code == 200 and r.json()["cold_start"] is False
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    wrong = dict(serve_env, CTR_PORT=str(free_port()))
    assert subprocess.run(hc, env=wrong, timeout=30, capture_output=True).returncode != 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_the_init_job_passes_sigterm_to_its_step(tmp_path: Path, sig: str) -> None:
    """init.sh is the init container's PID 1, which ignores SIGTERM without a handler:
    `docker stop` never reached `ctr train` or `ctr export` (killed after the grace
    period, their clean-up skipped). The job passes the signal on to the step it runs,
    which cleans up and ends; the job ends with the step's status."""
    import signal
    import time

    env = init_env(tmp_path, "train.epochs=50")
    init = ROOT / "deploy" / "docker" / "init.sh"
    job = subprocess.Popen(["sh", str(init)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert job.stdout is not None
        assert job.stdout.readline().startswith("init: training")
        deadline = time.time() + 60
        step = None
        while step is None and time.time() < deadline:
            kids = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
            step = int(kids.stdout.split()[0]) if kids.stdout.split() else None
            time.sleep(0.1)
        assert step is not None, "no step started"
        time.sleep(3)  # into the training
        # SIGINT (Ctrl-C) is passed on as SIGTERM: a step started with & ignores SIGINT
        job.send_signal(getattr(signal, sig))
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 143, err[-2000:]
    assert "ctr train: terminated" in err
    status = Path(f"/proc/{step}/status")
    assert not status.exists() or "zombie" in status.read_text()  # the step ended too
