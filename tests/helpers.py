"""Shared helpers for service tests: a real bundle trained and exported by the training
code, and a real Redis database loaded by ``ctr load``'s code path."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from redis import Redis
from redis.connection import parse_url
from redis.exceptions import TimeoutError as RedisTimeoutError

from ctr.spec import FeatureConfig, load_config
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# databases the tests' Redis lends to pytest-xdist's further workers (gw1, gw2, ...):
# never 0 (tests assert nothing landed there), 11 or 12 (test_container_commands' own);
# 14 (the benchmark commands' default, ctr.cli_args.BENCH_REDIS) and 15 (the scripts'
# examples) only to an eleventh worker and on
SPARE_DATABASES = (10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 14, 15, 13)


def with_database(url: str, db: int) -> str:
    """Redis URL ``url`` (host, port, credentials, options) naming database ``db``."""
    parts = urlsplit(url)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("db="))
    return parts._replace(path=f"/{db}", query=query).geturl()


def worker_redis_url(url: str, worker: str | None) -> str:
    """``url`` for the pytest-xdist worker named ``worker`` ("gw0", "gw1", ...; None
    without xdist): worker gw0 and a plain run use ``url`` itself, each further worker a
    database of its own on the same server, since every test empties its database."""
    if not worker or worker == "gw0":
        return url
    index = int(worker.removeprefix("gw"))
    base = int(parse_url(url).get("db", 0))
    spare = [db for db in SPARE_DATABASES if db != base]
    if index > len(spare):
        raise RuntimeError(f"pytest-xdist worker {worker}: no spare Redis database left")
    return with_database(url, spare[index - 1])


# CTR_TEST_REDIS_URL: the database of a run in one process, and of worker gw0
BASE_REDIS_URL = os.environ.get("CTR_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_URL = worker_redis_url(BASE_REDIS_URL, os.environ.get("PYTEST_XDIST_WORKER"))
# a database no worker of this run serves from: the spare after the workers' own, for a
# test that counts a database's keys (a service of an earlier test in the same worker,
# its tracking heartbeat's probe key, landed in the worker's database: fresh-clone CI)
UNSERVED_REDIS_URL = worker_redis_url(
    BASE_REDIS_URL, f"gw{int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))}"
)


@dataclass
class Built:
    config: FeatureConfig
    frame: pd.DataFrame
    models_dir: Path
    run_dir: Path
    version: int


def small_config(model_type: str = "din", name: str | None = None, **data: Any) -> FeatureConfig:
    cfg = "synthetic_dien.yaml" if model_type == "dien" else "synthetic_din.yaml"
    options = {"n_users": 300, "samples_per_user": 4, **data}
    return load_config(
        ROOT / "configs" / cfg,
        {
            "name": name or model_type,
            "model.type": model_type,
            "max_seq_len": 20,
            "train.epochs": 1,
            "data.options": options,
        },
    )


def build_bundle(
    tmp: Path,
    model_type: str = "din",
    name: str | None = None,
    config: FeatureConfig | None = None,
    edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> Built:
    """Train for one epoch and export into ``tmp/models`` (parity gate included):
    ``config`` (default :func:`small_config`'s) on its data, changed by ``edit``."""
    from training.data import load_frame
    from training.dataset import prepare
    from training.export import export_bundle
    from training.train import load_run, train

    config = config or small_config(model_type, name)
    frame = load_frame(config)
    if edit is not None:
        frame = edit(frame)
    run = tmp / f"run-{config.name}"
    train(config, run, prep=prepare(config, frame), progress=False)
    _, mapper, model, metrics = load_run(run)
    version, _, _ = export_bundle(model, config, mapper, metrics, tmp / "models")
    return Built(config, frame, tmp / "models", run, version)


def build_and_load(tmp: Path, model_type: str = "din") -> Built:
    """A bundle (:func:`build_bundle`) and its synthetic users in a freshly emptied test
    Redis database."""
    built = build_bundle(tmp, model_type)
    loaded_redis(built)
    return built


def loaded_redis(built: Built) -> Redis:
    """The test Redis database, emptied, then loaded with ``built``'s users by ``ctr
    load``'s code path; a client of it (strings decoded)."""
    from service.loader import load_into_redis

    client = fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    return client


def fresh_redis(url: str = REDIS_URL) -> Redis:
    client = Redis.from_url(url, decode_responses=True)
    client.flushdb()
    return client


def service_env(built: Built, redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a ``ctr serve`` subprocess on ``built``'s bundle."""
    env = dict(
        os.environ,
        CTR_MODELS_DIR=str(built.models_dir),
        CTR_MODEL_NAME=built.config.name,
        CTR_REDIS_URL=redis_url,
        CTR_LOG_LEVEL="warning",
    )
    return env | extra  # extra settings win


def settings_for(built: Built, **kw: object) -> Settings:
    """Service settings on ``built``'s bundle and the test Redis; ``kw`` overrides."""
    base: dict = {
        "models_dir": str(built.models_dir),
        "model_name": built.config.name,
        "redis_url": REDIS_URL,
        "redis_timeout_ms": 500,
    }
    return Settings(**{**base, **kw})


def assert_same_attention(got: list[dict], want: list[dict], atol: float = 1e-6) -> None:
    """Two ``explain`` lists (``{"item_id", "weight"}``, by |weight| descending) hold the
    same weights within ``atol``, each on the same history item. Entries whose weights
    tie (the same item twice in a history, or two items with the same embedding) may come
    in either order; ask for every step (a large ``CTR_EXPLAIN_TOP``) so that no tie can
    straddle the cut."""
    assert want and len(got) == len(want)
    np.testing.assert_allclose(
        sorted(x["weight"] for x in got), sorted(x["weight"] for x in want), rtol=0, atol=atol
    )
    for x in want:
        assert any(
            y["item_id"] == x["item_id"] and abs(y["weight"] - x["weight"]) <= atol for y in got
        ), x


def offline_rows(
    user: str,
    profile: dict[str, Any],
    items: list[str],
    item_values: dict[str, dict[str, Any]],
    hist: list[dict[str, Any]],
) -> pd.DataFrame:
    """One raw training row per candidate of the synthetic configs: ``user`` with the raw
    ``profile`` values, the item's stored features (``item_records``) and the stored
    behaviours ``hist`` (oldest first), for ``encode_frame``."""
    return pd.DataFrame(
        [
            {
                "user_id": user,
                **profile,
                "item_id": iid,
                "cate_id": item_values["cate_id"].get(iid),
                "item_price": item_values["item_price"].get(iid),
                "hist_item_id": [e["item_id"] for e in hist],
                "hist_cate_id": [e["cate_id"] for e in hist],
            }
            for iid in items
        ]
    )


def torch_inputs(enc: Any) -> dict[str, Any]:
    """The torch model's inputs (tensors) for rows encoded by ``encode_frame``, each row
    its own user (``user_idx`` = row)."""
    import torch

    names = ("user_sparse", "user_dense", "hist", "hist_len", "item_sparse", "item_dense")
    x = {k: torch.from_numpy(getattr(enc, k)) for k in names}
    x["user_idx"] = torch.arange(len(enc.hist_len))
    return x


class ShiftedClock:
    """A ``time.monotonic()`` that stands still unless the test moves it on
    (:meth:`advance`), put in place of the ``time`` module of the given service modules
    (:meth:`install`): TTLs expire without sleeping, and no check races the machine's
    speed. It starts at the real clock's reading."""

    def __init__(self) -> None:
        self.offset = time.monotonic()

    def monotonic(self) -> float:
        return self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch, *modules: Any) -> ShiftedClock:
        clock = self

        class Time:  # the real time module, but for monotonic()
            def __getattr__(self, name: str) -> Any:
                return clock.monotonic if name == "monotonic" else getattr(time, name)

        for module in modules:
            monkeypatch.setattr(module, "time", Time())
        return self


def missing(reason: str) -> NoReturn:
    """Skip a test whose tool or package is not installed here; fail it instead under
    ``CTR_TEST_STRICT=1`` (set by ``scripts/test.sh``, which installs all of them), so a
    broken install in CI shows as a failure, not as a quiet skip."""
    if os.environ.get("CTR_TEST_STRICT") == "1":
        pytest.fail(f"{reason} (CTR_TEST_STRICT=1: scripts/setup.sh should have installed it)")
    pytest.skip(reason)


def promtool_or_skip() -> str:
    """The path of Prometheus's ``promtool`` (on the PATH, or in the venv's bin, where
    scripts/test.sh unpacks it from Debian's ``prometheus``), or the test is skipped."""
    import shutil
    import sys

    promtool = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent)
    )
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/test.sh fetches it; or apt-get "
                    "install prometheus)")  # fmt: skip
    return promtool


def redis_asleep(url: str, seconds: float) -> threading.Thread:
    """Start ``DEBUG SLEEP seconds`` on the Redis at ``url`` (a private test server) in a
    thread, and return that thread once Redis is really asleep: a PING on another
    connection goes unanswered (bounded wait). Join the thread when done."""
    # redis-py 8's default socket timeout is 5 s (where a client is made with
    # Redis(host=...), it then sends the command again, up to 10 times)
    sleeper = Redis.from_url(url, socket_timeout=float(seconds) + 30)
    blocker = threading.Thread(target=lambda: sleeper.execute_command("DEBUG", "SLEEP", seconds))
    blocker.start()
    probe = Redis.from_url(url, socket_timeout=min(0.05, seconds / 10))
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except RedisTimeoutError:
                return blocker
            time.sleep(0.005)
    finally:
        probe.close()
    blocker.join()
    raise AssertionError("Redis never went to sleep")


def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    assert until(check, timeout), f"timed out waiting for {what}"


@contextlib.contextmanager
def child_answers() -> Iterator[list[Any]]:
    """Every ``ctr.manifest_proc.read`` meanwhile must get the child's answer, not fall
    back to the in-process read (which would make a comparison of the two pass whatever
    the child did); yields the answers."""
    from ctr import manifest_proc

    real = manifest_proc.read
    answers: list[Any] = []

    def checked(path: Path, *args: Any, **kwargs: Any) -> Any:
        got = real(path, *args, **kwargs)
        assert got is not None, f"the child did not answer for {path}"
        answers.append(got)
        return got

    manifest_proc.read = checked  # type: ignore[assignment]
    try:
        yield answers
    finally:
        manifest_proc.read = real  # type: ignore[assignment]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``256k``, ``8m``) mounted on ``folder`` (made here) while
    inside, unmounted after; the test is skipped where this process may not mount one."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:100]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
