"""A real uvicorn server in a background thread, for tests that need real HTTP
concurrency (reload under traffic, overload)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
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
    proc.kill()
    raise RuntimeError("ctr serve did not become ready")
