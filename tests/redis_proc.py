"""A private redis-server the test starts, stops and restarts on its own port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError


def free_cluster_port() -> int:
    """A port p with p and p + 10000 (the cluster bus) both free, p <= 55535."""
    import random

    for _ in range(200):
        p = random.randint(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair for a cluster node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    def __init__(self, port: int | None = None, *extra: str, binary: str | None = None) -> None:
        """``binary``: another server than the ``redis-server`` on the PATH (Valkey's
        ``valkey-server``, which takes the same options)."""
        binary = binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="ctr-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", self.dir, "--enable-debug-command", "local"]
        cmd += self.extra
        cmd += ["--logfile", "redis.log"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            except (RedisError, OSError):
                time.sleep(0.05)
        log = Path(self.dir, "redis.log")
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server on port {self.port} did not start: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its AOF and exits
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Redis:
        return Redis(port=self.port, decode_responses=True)


@contextlib.contextmanager
def private_redis(*extra: str) -> Iterator[RedisProcess]:
    """A started :class:`RedisProcess` on a free port (``extra``: server arguments),
    stopped and its folder removed on the way out."""
    proc = RedisProcess(None, *extra).start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(proc.dir, ignore_errors=True)
