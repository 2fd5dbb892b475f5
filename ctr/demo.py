"""``ctr demo``: the whole job on one machine, start to finish.

Train a small model (synthetic data unless a config for the shared data is given),
export it, make sure Redis answers (starting a private ``redis-server`` if none
does), load users, start the service, score a sample request and print the ranked
result. Everything it started is stopped at the end unless ``--keep-serving``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ctr.spec import load_config


def _redis_ok(url: str) -> bool:
    """Whether the Redis at ``url`` answers; False where it does not. One that answers
    and refuses (a password, an ACL user, protected mode, a database it lacks), or a
    URL that is none, raises :class:`RedisUnavailable` with ping's message: a private
    redis-server started on its port then only "did not come up" (diff review)."""
    from redis.exceptions import RedisError

    from service.store import ping, refused_as

    try:
        ping(url, timeout_s=1.0)
        return True
    except RedisError as exc:
        cause = exc.__cause__
        if isinstance(cause, ValueError | TypeError) or (
            cause is not None and refused_as(cause) is not None
        ):
            raise RedisUnavailable(str(exc)) from exc
        return False


def ensure_redis(url: str) -> subprocess.Popen | None:
    """Return a private redis-server process if one had to be started, else None."""
    if _redis_ok(url):
        from service.store import redact

        print(f"[demo] Redis answers at {redact(url)}")
        return None
    from service.store import redact

    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "") or parsed.hostname not in ("127.0.0.1", "localhost"):
        raise RedisUnavailable(
            f"the Redis at CTR_REDIS_URL={redact(url)} does not answer, and the demo starts "
            "one only for a redis:// URL on 127.0.0.1 or localhost: start it, or unset "
            "CTR_REDIS_URL"
        )
    binary = shutil.which("redis-server")
    if binary is None and os.geteuid() == 0 and shutil.which("apt-get"):
        # as scripts/setup.sh's apt_install: refresh the package lists first (a fresh
        # image has none), then install without prompts
        print("[demo] installing redis-server (apt-get update, apt-get install)")
        apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        updated = subprocess.run(
            ["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, env=apt_env, check=False
        )
        if updated.returncode == 0:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "redis-server"],
                stdout=subprocess.DEVNULL,
                env=apt_env,
                check=False,
            )
        binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable(
            f"no Redis answers at {redact(url)} and there is no redis-server binary to start "
            "one: install redis-server (bash scripts/setup.sh does)"
        )
    port = str(parsed.port or 6379)
    print(f"[demo] starting a private redis-server on port {port}")
    proc = subprocess.Popen(
        [binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            if _redis_ok(url):  # raises where the started one refuses (a database it lacks)
                return proc
            time.sleep(0.1)
    except BaseException:
        proc.terminate()  # not left running on the port once the demo has given up
        proc.wait(timeout=10)
        raise
    proc.terminate()
    proc.wait(timeout=10)
    raise RedisUnavailable(f"the redis-server started for {redact(url)} did not come up")


def _context_of(config: Any, row: Any) -> dict[str, Any]:
    """The context features (e.g. the hour) of one example row, as a request sends
    them: a request without them would score with their out-of-vocabulary row."""
    from ctr.mapping import normalize

    out: dict[str, Any] = {}
    for f in config.features:
        if f.side != "context" or f.kind == "sequence" or f.source not in row:
            continue
        value = normalize(row[f.source])
        if value is not None:
            out[f.source] = value if f.kind == "sparse" else float(value)
    return out


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    # the service the demo starts has the environment's key: `explain` (and, with
    # CTR_PROTECT_SCORING, every score) needs it sent
    if key := os.environ.get("CTR_API_KEY", "").strip():
        headers["X-API-Key"] = key
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def bind_error(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound (bound as uvicorn binds, with ``SO_REUSEADDR``):
    something holds it (``EADDRINUSE``), a host name that does not resolve, an address
    this machine does not have; None where it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def port_taken(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound because something holds it; any other bind
    error is left to the server. Port 0 (any free one) is never taken."""
    if port == 0:
        return False
    exc = bind_error(host, port)
    return exc is not None and exc.errno == errno.EADDRINUSE


def _wait_ready(base: str, proc: subprocess.Popen, version: int, timeout: float = 60.0) -> None:
    """Until the service started as ``proc`` serves ``version``. Another process on the
    port would answer too: the answer counts only from ``proc`` (``worker_pid``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServiceFailed("the service exited during start-up (its log is above)")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=1) as resp:
                info = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            info = None  # not listening yet, or 503 while the model loads
        if isinstance(info, dict):
            if info.get("worker_pid") != proc.pid:
                raise ServiceFailed(f"another process answers on {base}: stop it, or --port")
            if info.get("version") == str(version):
                return
        time.sleep(0.2)
    raise ServiceFailed(f"the service did not serve version {version}: {_readiness(base)}")


def _readiness(base: str) -> str:
    """The service's ``/readyz`` body (it names a model that failed to load), or why
    there is none."""
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:  # 503: not ready, the body says why
        return exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer ({exc})"


class PortInUse(OSError):
    """The demo's (or ``ctr serve``'s) port is taken: wrong input, not a bug."""


class ServiceFailed(OSError):
    """The service the demo starts did not come to serve its model (``ctr`` prints it as
    one line and exits with status 2)."""


class RedisUnavailable(OSError):
    """No Redis the demo can use: wrong input or a missing tool, not a bug (``ctr``
    prints it as one line and exits with status 2)."""


def run_demo(args: argparse.Namespace) -> int:
    # before minutes of training: the service (CTR_HOST, all interfaces by default)
    # could not bind
    if port_taken(os.environ.get("CTR_HOST", "0.0.0.0"), args.port):
        # an OSError: `ctr` prints it as one line and exits with status 2, as wrong input
        raise PortInUse(
            f"port {args.port} is in use (an earlier `--keep-serving` demo, `ctr serve` "
            "or `docker compose up`?): stop it or pass --port"
        )
    if args.data_root:
        os.environ["CTR_DATA_ROOT"] = str(Path(args.data_root).resolve())
    from training.data import load_catalog, load_frame
    from training.export import export_bundle
    from training.train import train

    overrides: dict[str, Any] = {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    config = load_config(args.config, overrides)
    redis_url = os.environ.get("CTR_REDIS_URL", "redis://127.0.0.1:6379/0")
    # what the demo's service runs with over the environment (its version once exported)
    serve = {
        "CTR_MODELS_DIR": str(Path(args.models_dir).resolve()),
        "CTR_MODEL_NAME": config.name,
        "CTR_MODEL_VERSION": "latest",
        "CTR_REDIS_URL": redis_url,
        "CTR_LOG_LEVEL": "warning",
        "CTR_WORKERS": "1",  # the answer _wait_ready waits for comes from this process
    }
    # its settings checked as it will start, before minutes of training: a bad CTR_*
    # value failed its start at the demo's last step (one line, status 2 now)
    from service.settings import Settings

    Settings(port=args.port, **{k.removeprefix("CTR_").lower(): v for k, v in serve.items()})
    # Redis first: one that does not answer is found before minutes of training
    redis_proc = ensure_redis(redis_url)
    service: subprocess.Popen | None = None
    try:
        run_dir = Path("runs") / f"demo-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[demo] 1/5 training {config.model.type} on {config.data.source} data -> {run_dir}")
        from training.dataset import prepare

        frame = load_frame(config)
        prep = prepare(config, frame)
        metrics = train(config, run_dir, prep=prep)
        t = metrics["test"]
        print(
            f"[demo]     test AUC {t['auc']:.4f}  GAUC {t['gauc']:.4f}  logloss {t['logloss']:.4f}"
        )
        from training.train import load_run

        _, mapper, model, metrics = load_run(run_dir)
        version, path, report = export_bundle(model, config, mapper, metrics, args.models_dir)
        print(f"[demo] 2/5 exported {path} (parity {report.max_abs_diff:.1e})")
        from service.loader import load_into_redis

        counts = load_into_redis(config, frame, redis_url, progress=False,
                                 catalog=load_catalog(config))  # fmt: skip
        print(f"[demo] 3/5 loaded {counts['users']} users, {counts['items']} items into Redis")
        env = {**os.environ, **serve, "CTR_MODEL_VERSION": str(version)}
        base = f"http://127.0.0.1:{args.port}"
        service = subprocess.Popen(
            [sys.executable, "-m", "ctr.cli", "serve", "--port", str(args.port)], env=env
        )
        _wait_ready(base, service, version)
        print(f"[demo] 4/5 service ready at {base}")
        first = prep.frames["test"].iloc[0]
        user = str(first[config.data.user_key])
        id_src = config.item_id_feature.source
        pool = prep.frames["test"][id_src].astype(str).unique().tolist()[:30]
        body = {"user_id": user, "candidates": [{"item_id": i} for i in pool], "top_k": 10}
        context = _context_of(config, first)  # the request's own, as the test row's
        if context:
            body["context"] = context
        body["explain"] = True
        result = _post(base + "/v1/score", body)
        print(f"[demo] 5/5 POST /v1/score user={user} candidates={len(pool)} top_k=10 "
              f"context={context}")  # fmt: skip
        print(f"       model {result['model']}  cold_start={result['cold_start']}")
        print("       rank  item_id        probability  most-attended history")
        for item in result["items"]:
            att = ", ".join(
                f"{a['item_id']}:{a['weight']:.2f}" for a in item.get("attention") or []
            )
            rank, iid, prob = item["rank"], item["item_id"], item["probability"]
            print(f"       {rank:>4}  {iid:<14} {prob:.4f}       {att}")
        from service.store import redact

        serve = (
            f"CTR_MODELS_DIR={env['CTR_MODELS_DIR']} CTR_MODEL_NAME={config.name} "
            f"CTR_MODEL_VERSION={version} CTR_REDIS_URL={redact(redis_url)} "
            f".venv/bin/ctr serve --port {args.port}"  # this demo's (CTR_PORT may differ)
        )
        after = " once this demo has stopped" if args.keep_serving else ""
        if redis_proc is None:  # the Redis it used stays, with the users loaded
            print(f"[demo] to serve this bundle yourself{after}, its log on your terminal: "
                  f"{serve}")  # fmt: skip
        else:  # its own Redis stops with it: start one and load the users first
            # the shared data's root where --data-root named it: the load reads it too
            root = f"CTR_DATA_ROOT={os.environ['CTR_DATA_ROOT']} " if args.data_root else ""
            print(f"[demo] to serve this bundle yourself{after}: start Redis on "
                  f"{redact(redis_url)}, load the users ({root}.venv/bin/ctr load --redis-url "
                  f"{redact(redis_url)} --bundle {env['CTR_MODELS_DIR']}/{config.name}), "
                  f"then {serve}")  # fmt: skip
        if args.keep_serving:
            print(f"[demo] serving at {base} in the foreground (Ctrl-C to stop)")
            signal.signal(signal.SIGTERM, lambda *_: service.terminate() if service else None)
            try:
                service.wait()
            except KeyboardInterrupt:
                pass
    finally:
        if service is not None and service.poll() is None:
            service.terminate()
            service.wait(timeout=15)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    return 0
