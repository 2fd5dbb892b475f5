"""A real uvicorn server in a background thread, for tests that need real HTTP
concurrency (reload under traffic, overload)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn
from fastapi import FastAPI

from service.front import FrontProtocol
from tests.helpers import ROOT
from tests.redis_proc import free_port


class ServerThread:
    """``app`` served by uvicorn with ``ctr serve``'s HTTP protocol (``http``: another
    one, e.g. ``"httptools"``, uvicorn's own)."""

    def __init__(self, app: FastAPI, http: Any = FrontProtocol, **config_kw: Any) -> None:
        self.port = free_port()
        kw = {"log_level": "warning", **config_kw}
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, http=http, **kw)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, and reap it. ``ctr serve --workers N``'s
    workers outlived a SIGKILL of their supervisor alone: they served on, their tracking
    heartbeat writing its probe key into the test database every second for the rest of
    the session (fresh-clone CI: test_cli's key counts read one more; a review found
    how, session 46). The workers now stop once their supervisor is gone, within about a
    second; this does not wait for that."""
    kids = _descendants(proc.pid)
    proc.kill()
    for kid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(process_running(k) for k in kids):
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def process_running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (its parent, once not ours, reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def serve_process(
    port: int, env: dict[str, str], *extra: str, log: IO[bytes] | None = None
) -> subprocess.Popen:
    """``ctr serve`` in a subprocess on 127.0.0.1:``port``, returned once ``/readyz`` is
    200 (the process is killed and an error raised if it never gets there); its stdout
    and stderr go to ``log`` where given."""
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    out = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
    proc = subprocess.Popen([*cmd, *extra], env=env, cwd=ROOT, **out)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    kill_tree(proc)
    raise RuntimeError("ctr serve did not become ready")
