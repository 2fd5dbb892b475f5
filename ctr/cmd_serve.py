"""``ctr serve``: the service under uvicorn, and what is checked and set before it starts
(settings, port, metrics folder, open-file limit) and watched while it runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
from typing import Any


def _http_protocol(front: bool) -> str:
    """uvicorn's ``http`` where httptools, on which they build, is installed: the front
    (``service.front.FrontProtocol``) where asked for, else uvicorn's own protocol with
    the read timeout only (``TimedProtocol``); without httptools uvicorn's own choice
    (h11: no read timeout)."""
    import importlib.util

    if importlib.util.find_spec("httptools") is None:
        return "auto"
    return "service.front:FrontProtocol" if front else "service.front:TimedProtocol"


def serve_settings(args: argparse.Namespace, settings: Any) -> Any:
    """The settings ``ctr serve`` runs with: ``--host``, ``--port`` and ``--workers``,
    where given (``--port 0`` included), override ``CTR_HOST``, ``CTR_PORT`` and
    ``CTR_WORKERS`` and are checked as those are (``settings``: the Settings class,
    imported by the caller)."""
    from pydantic import ValidationError

    given = {k: v for k in ("host", "port", "workers") if (v := getattr(args, k)) is not None}
    try:
        s = settings(**given)
    except ValidationError as exc:
        for err in exc.errors():  # a flag's value is named as the flag
            if err["loc"] and err["loc"][0] in given:
                raise ValueError(
                    f"--{err['loc'][0]}: {err['msg']} (got {err['input']!r})"
                ) from None
        raise
    s.check_serving()  # before any worker starts: one line, status 2
    return s


def check_port(host: str, port: int) -> None:
    """:class:`~ctr.demo.PortInUse` (one line, status 2) where ``host:port`` cannot be
    bound: something holds it, or the host does not resolve or is not this machine's
    (:func:`ctr.demo.bind_error`), before the model loads."""
    import errno

    from ctr.demo import PortInUse, bind_error

    exc = bind_error(host, port)
    if exc is None:
        return
    if exc.errno == errno.EADDRINUSE:  # (port 0 never is)
        raise PortInUse(
            f"{host}:{port} is in use (another `ctr serve`, a `--keep-serving` demo "
            "or `docker compose up`?): stop it, or set --port / CTR_PORT"
        )
    why = exc.strerror or str(exc)
    raise PortInUse(f"cannot listen on {host}:{port}: {why} (set --host / CTR_HOST)")


def enable_faulthandler() -> None:
    """Python's fault handler on, where there is a stderr to write to (a process started
    with it closed, ``2>&-``, could not start at all: ``faulthandler.enable`` raises)."""
    import faulthandler

    if sys.stderr is None or faulthandler.is_enabled():
        return
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        faulthandler.enable()


# free space a metrics folder needs per process (each worker's files, and the parent's
# collector): prometheus_client maps files that grow as series are added, and a write past
# what the file system can hold is a SIGBUS that kills the worker, again at each restart
METRICS_SPACE_PER_PROCESS = 8 << 20


def check_metrics_space(folder: str, workers: int) -> None:
    """Raise ValueError where ``folder`` (``PROMETHEUS_MULTIPROC_DIR``) has less free
    space than ``workers`` and the parent need (:data:`METRICS_SPACE_PER_PROCESS` each):
    on a full file system every worker died of SIGBUS as it counted its first request,
    and uvicorn started it again, for good, with nothing in the log naming why."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    need = METRICS_SPACE_PER_PROCESS * (workers + 1)
    if free < need:
        raise ValueError(
            f"PROMETHEUS_MULTIPROC_DIR={folder!r} has {free / 2**20:.1f} MB free, under the "
            f"{need / 2**20:.0f} MB {workers} worker(s) need for their metric files: free "
            "space there, or point it at another folder"
        )


def raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one (as Go's runtime and nginx's
    ``worker_rlimit_nofile`` do). Every client connection holds a descriptor for up to
    ``CTR_READ_TIMEOUT_MS`` before it sends a byte: at a soft limit of 1024 (systemd's
    default, which container runtimes pass on) a thousand idle connections left the
    worker unable to accept any other for as long as they were renewed (a security
    review, session 47)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    # an unlimited hard limit (macOS, the BSDs; Linux caps a hard limit at fs.nr_open):
    # ask for 2**20. A kernel that refuses a soft limit above its own per-process ceiling
    # (macOS: kern.maxfilesperproc, OPEN_MAX 10240 by default, EINVAL) gets the next
    # smaller one instead of none: the first refusal left it at macOS's 256
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for cap in (want, 1 << 16, 10240, 4096):
        target = min(want, cap)
        if target <= soft:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            continue


def cmd_serve(args: argparse.Namespace) -> int:
    from service import hup

    hup.install()  # before the slow imports: a SIGHUP now is a reload later, not an exit
    import tempfile

    import uvicorn

    from service.logs import uvicorn_log_config
    from service.settings import Settings

    s = serve_settings(args, Settings)
    raise_fd_limit()  # before the workers start: they inherit it
    check_port(s.host, s.port)  # before the model loads (uvicorn would fail after it)
    os.environ["CTR_HOST"] = s.host  # --host: the app's settings (read in each worker) see it
    workers = s.workers
    made = None  # the metrics folder made here, removed at exit
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ctr-prom-")
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        # each worker would die at import, and uvicorn start it again, for good
        raise ValueError(
            f"PROMETHEUS_MULTIPROC_DIR={folder!r} is not a folder this process can write "
            "(the workers keep their metrics there): create it, or unset it for a "
            "temporary one"
        )
    if folder and made is None:  # one worker renders from the folder too
        from service.metricfiles import wipe_stale

        wiped = wipe_stale(folder)  # a previous run's counts, which every scrape would add
        if wiped:
            print(f"[serve] removed {wiped} metric files of exited processes from {folder}",
                  file=sys.stderr)  # fmt: skip
    if folder:
        try:  # after the wipe: a crash loop's dead workers' files are what filled it
            check_metrics_space(folder, workers)
        except ValueError:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise
        # a worker killed by a signal (SIGBUS on a metric file the disk has no room for)
        # says where, not only uvicorn's "Child process died"; one worker is this process
        os.environ.setdefault("PYTHONFAULTHANDLER", "1")
        if workers == 1:
            enable_faulthandler()
    if workers > 1:  # a worker's SIGHUP while it imports: pending, then noted, not fatal
        hup.block_for_workers()
    supervisor = _SupervisorWatch(s.worker_start_timeout_s)
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=s.host,
            port=s.port,
            workers=workers,
            log_level=s.log_level,
            log_config=uvicorn_log_config(s.log_format),
            access_log=s.access_log,
            http=_http_protocol(s.http_front),
            timeout_graceful_shutdown=10,
        )
    finally:
        supervisor.restore()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    if supervisor.startup_failed:
        # uvicorn's supervisor stops and returns normally: a unit that restarts on
        # failure would have taken it for a clean stop
        print("ctr serve: error: a worker failed to start (its error is above); stopped",
              file=sys.stderr)  # fmt: skip
        return STARTUP_FAILURE
    return 0


# uvicorn's exit status for an app that failed to start (one worker exits with it)
STARTUP_FAILURE = 3


class _SupervisorWatch:
    """Puts a subclass of uvicorn's multi-worker supervisor in place for one
    ``uvicorn.run`` that notes whether it stopped because a worker failed to start."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        import importlib

        watch = self
        self.startup_failed = False
        # the module (the package's `uvicorn.main` attribute is its click command)
        self.module = importlib.import_module("uvicorn.main")
        self.original = getattr(self.module, "Multiprocess", None)
        if self.original is None:  # another uvicorn layout: not watched
            return

        class Watched(self.original):  # type: ignore[misc,name-defined]
            def keep_subprocess_alive(self) -> None:
                super().keep_subprocess_alive()
                # uvicorn >= 0.30 stops on a worker's start-up failure; an older one
                # restarts it (and its processes may lack exitcode): nothing noted then
                if self.should_exit.is_set() and any(
                    getattr(p, "exitcode", None) == STARTUP_FAILURE for p in self.processes
                ):
                    watch.startup_failed = True

            def terminate_all(self) -> None:
                super().terminate_all()
                # the workers stop accepting as they stop, but this process held the
                # listening socket too: new connections went on into its queue for the
                # whole drain (up to 10 s), to be reset when it exited, each request sent
                # on one lost (a review). Its copy closed: each worker closes its own as
                # its shutdown begins, and the socket goes with the last (new connections
                # refused from then). A shutdown() of the shared socket raced a worker
                # still starting, whose server listen()ed on it again (a review)
                for sock in getattr(self, "sockets", None) or ():
                    with contextlib.suppress(OSError):
                        sock.close()

            def restart_all(self) -> None:
                # SIGHUP: each new worker must be ready within the config's health-check
                # timeout (uvicorn's 5 s), or the restart is given up, every worker left
                # on the old model: a model takes longer to load. The longer wait is for
                # the restart only (the same value bounds the parent's liveness pings)
                config = self.config
                saved = getattr(config, "timeout_worker_healthcheck", None)
                if saved is not None:
                    config.timeout_worker_healthcheck = max(saved, start_timeout_s)
                # the restart runs in the loop that handles signals, so a SIGTERM waits
                # in the queue until it ends: up to the timeout per worker, past any
                # stop grace period. A thread sets should_exit meanwhile, which the
                # wait for a new worker watches
                done = threading.Event()
                queue = getattr(self, "signal_queue", None)

                def watch_stop() -> None:
                    while not done.wait(0.1):
                        if queue and any(q in (signal.SIGINT, signal.SIGTERM) for q in queue):
                            self.should_exit.set()
                            return

                watcher = threading.Thread(target=watch_stop, daemon=True)
                watcher.start()
                try:
                    super().restart_all()
                finally:
                    done.set()
                    watcher.join()
                    if saved is not None:
                        config.timeout_worker_healthcheck = saved
                    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                    if folder:  # a given-up worker's live gauges: no worker start drops them
                        from service.metricfiles import forget_dead

                        forget_dead(folder)

        self.module.Multiprocess = Watched  # type: ignore[misc]

    def restore(self) -> None:
        if self.original is not None:
            self.module.Multiprocess = self.original  # type: ignore[misc]
