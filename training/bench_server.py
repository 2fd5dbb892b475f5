"""The real service under a benchmark: its environment, ``ctr serve`` started in a
subprocess and stopped, what it serves (``/v1/models``), its processes' CPU and memory
from ``/proc``, and the machine it runs on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def service_env(
    models_dir: Path,
    name: str,
    redis_url: str,
    threads: int,
    inflight: int = 1,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment ``ctr serve`` gets from the benchmark: this process's, the
    benchmark's settings, then ``extra_env`` (``--env``), which wins. The model-only
    baseline reads its settings from the same dict (:func:`load_baseline`)."""
    env = dict(
        os.environ,
        CTR_MODELS_DIR=str(models_dir),
        CTR_MODEL_NAME=name,
        CTR_REDIS_URL=redis_url,
        CTR_INTRA_OP_THREADS=str(threads),
        CTR_INFERENCE_CONCURRENCY=str(inflight),
        CTR_LOG_LEVEL="warning",
        CTR_REDIS_TIMEOUT_MS="1000",
        CTR_REQUEST_TIMEOUT_MS="10000",
        CTR_MAX_IN_FLIGHT="1024",
    )
    env.update(extra_env or {})  # --env wins over the defaults above
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


class ServiceStartFailed(OSError):
    """The benchmark's service did not come up (it exited, another process answers on
    its port, or it never got ready): ``ctr`` prints it as one line, status 2."""


def ports_free(*ports: int) -> None:
    """:class:`ctr.demo.PortInUse` where a benchmark's port is held, checked before its
    bundle is built and Redis loaded (the service found it taken only after both)."""
    from ctr.demo import PortInUse, port_taken

    for port in ports:
        if port_taken("127.0.0.1", port):
            raise PortInUse(f"port {port} is in use (an earlier service?): stop it or pass --port")


def start_service(env: dict[str, str], port: int, root: Path | None = None) -> Any:
    """``ctr serve`` in a subprocess with ``env`` (:func:`service_env`, the one the
    baseline is loaded from); ``(process, base URL)`` once ``/readyz`` answers 200 from
    that process or one of its workers, never from a service an earlier run left on the
    port (:class:`ServiceStartFailed`). ``root``: the checkout whose code serves (default: this
    one; another commit's work tree, to compare code with code)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=root or ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1800):
            if proc.poll() is not None:
                raise ServiceStartFailed(f"the service exited with code {proc.returncode} "
                                         "during start-up (its log is above)")  # fmt: skip
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    pid = served_model(url, ("worker_pid",))["worker_pid"]
                    stat = _stat(pid) if isinstance(pid, int) else None
                    if pid != proc.pid and (stat is None or int(stat[1]) != proc.pid):
                        raise ServiceStartFailed(
                            f"{url} answers from process {pid}, not from the service just "
                            f"started ({proc.pid}): is an earlier service still on that port?"
                        )
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ServiceStartFailed(f"the service on {url} did not become ready")
    except BaseException:
        # also a SIGTERM or Ctrl-C of this process alone while the service starts: the
        # caller holds no handle to it yet, and it would stay on the port, orphaned
        stop_service(proc)
        raise


def stop_service(proc: subprocess.Popen) -> None:
    """Stop a service :func:`start_service` started: SIGTERM (a graceful shutdown), and
    SIGKILL if it has not ended 30 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


SERVED_KEYS = ("graph", "graph_note", "runner", "provider", "precision",
               "single_thread_max_candidates", "user_tracking", "gpu_copy")  # fmt: skip


def served_model(
    url: str, keys: tuple[str, ...] = SERVED_KEYS, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """What the running service serves (``/v1/models``): by default graph, runner,
    precision. With the service's key (``env``'s ``CTR_API_KEY``, else this process's),
    so that its notes read as they are, not hidden."""
    key = (os.environ if env is None else env).get("CTR_API_KEY", "").strip()
    headers = {"X-API-Key": key} if key else {}
    body = httpx.get(url + "/v1/models", timeout=10, headers=headers).json()
    return {k: body.get(k) for k in keys}


def loop_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid``'s main thread, where uvicorn's event
    loop runs with one worker; None where /proc cannot tell. Per request, it is what caps
    one worker: at most 1 / (loop CPU per request) requests/s, whatever the device."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _tree_stats(pid: int) -> list[list[str]] | None:
    """``/proc/PID/stat`` fields (from the third on) of process ``pid`` and its
    descendants (uvicorn's workers); None where /proc cannot tell."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, st in stats.items() if int(st[1]) == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return [stats[p] for p in tree]


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid`` and its descendants
    (uvicorn's workers), the reaped ones included: the whole service; None where /proc
    cannot tell."""
    stats = _tree_stats(pid)
    if stats is None:
        return None
    # utime, stime, cutime, cstime (fields 14-17 of /proc/PID/stat)
    ticks = sum(sum(int(v) for v in st[11:15]) for st in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory (MB) of process ``pid`` and its descendants; None where /proc
    cannot tell."""
    stats = _tree_stats(pid)
    if stats is None:
        return None
    # rss in pages: field 24 of /proc/PID/stat
    return sum(int(st[21]) for st in stats) * os.sysconf("SC_PAGE_SIZE") / 1e6


def device(env: dict[str, str]) -> str:
    # the kernel release says which sandbox a lent machine ran in (gVisor reports 4.4.0,
    # and its syscalls, the event loop's included, cost far more than a VM's)
    cpu = f"{os.cpu_count()} CPU cores, Linux {platform.release()}"
    if env.get("CTR_PROVIDER") != "cuda":
        return f"CPU ({cpu})"
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        gpu = "unknown GPU"
    return f"{gpu} (CUDA EP), {cpu}"
