"""ctr: one entry point for every command of the product.

Torch is imported only by the commands that train, export or build a bundle (train,
export, demo, results, bench-model, and bench, bench-pair, bench-path and soak where
they build one), so that serve, load and impressions run in the torch-free runtime
image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.impression_read import ImpressionReader


def _setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a service setting for ``--a`` / ``--b``)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. CTR_X=1 (got {text!r})")
    return key, value


def _number(
    kind: Callable[[str], Any], ok: Callable[[Any], bool], must: str
) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, for which ``ok`` must hold (else "must be
    ``must``")."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must} (got {text})")
        return value

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, which must be above 0 and finite (``inf`` would
    never end a wait or a loop)."""
    return _number(kind, lambda v: v > 0 and math.isfinite(v), "above 0")


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, which must be 0 or more, and finite."""
    return _number(kind, lambda v: v >= 0 and math.isfinite(v), "0 or more, and finite")


THREADS_HELP = "ORT intra-op threads (CTR_INTRA_OP_THREADS; 0: ORT's default)"


def _counts(text: str) -> str:
    """An argparse type: a comma-separated list of whole numbers above 0 (``50,200``),
    returned as given (each command splits it)."""
    try:
        ok = bool(text.strip()) and all(int(part) > 0 for part in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"must be whole numbers above 0, comma-separated (got {text!r})"
        )
    return text


def _share(text: str) -> float:
    """An argparse type: a share between 0 and 1."""
    value = _non_negative(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a share is at most 1 (got {text})")
    return value


SET_HELP = (
    "KEY=VALUE config override, repeatable (train.epochs=2); VALUE is read as JSON where it "
    "parses, so digits meant as text need JSON quotes: 'name=\"2024\"'"
)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:  # `--set name`: the value forgotten, not an empty one
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.spec import load_config
    from training.train import leave_distributed, train

    config = load_config(args.config, _overrides(args.set))
    out = Path(args.out or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        metrics = train(config, out, progress=not args.quiet)
    except KeyboardInterrupt as exc:
        exc.ctr_left = _train_left(out)  # type: ignore[attr-defined]
        raise
    leave_distributed()  # under torchrun: every rank done before any leaves
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports (its run folder)
        return 0
    t = metrics["test"]
    print(
        f"trained {config.model.type} -> {out}  test auc {t['auc']:.4f} gauc {t['gauc']:.4f} "
        f"logloss {t['logloss']:.4f} calibration {t['calibration']:.3f}"
    )
    return 0


def _train_left(out: Path) -> str:
    """What an interrupted ``ctr train`` left in its run folder ``out``: a previous
    run's files go only once the data is ready and training begins."""
    from training.train import RUN_FILES

    if all((out / name).is_file() for name in RUN_FILES):
        return f"{out} still holds the finished run it held before (this one was not saved)"
    return f"{out} holds no finished run: train it again"


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_bundle
    from training.train import load_run

    if args.name is not None and not args.name.strip():
        raise ValueError("--name: empty (leave it out for the config's name)")
    config, mapper, model, metrics = load_run(args.run)
    version, path, report = export_bundle(
        model, config, mapper, metrics, args.models_dir, args.name
    )
    print(
        f"exported {path} (version {version}); parity max |ORT - torch| = "
        f"{report.max_abs_diff:.2e} over {len(report.cases)} cases"
    )
    return 0


def bundle_config(path: Path, overrides: dict[str, Any]) -> Any:
    """The feature config a bundle was trained with (its manifest's), ``overrides``
    applied: ``path`` is a version folder (``models/din/3``) or a model's folder
    (``models/din``: its newest version, the one ``CTR_MODEL_VERSION=latest`` serves)."""
    from ctr.bundle import MANIFEST, BundleError, list_versions, load_bundle, version_of
    from ctr.spec import FeatureConfig, apply_overrides

    # a version folder holds a manifest (a model may be named with digits too)
    if version_of(path.name) is not None and (path / MANIFEST).is_file():
        bundle = load_bundle(path.parent.parent, path.parent.name, path.name)
    elif version_of(path.name) is not None and not path.exists() and path.parent.is_dir():
        have = list_versions(path.parent.parent, path.parent.name)
        if have:  # models/din/9 where models/din holds versions: a version, not a model
            raise BundleError(f"{path.parent} has no version {path.name} (have {have})")
        bundle = load_bundle(path.parent, path.name, "latest")
    else:
        bundle = load_bundle(path.parent, path.name, "latest")
    raw = apply_overrides(copy.deepcopy(bundle.manifest["config"]), overrides)
    return FeatureConfig.model_validate(raw), bundle.manifest


# what a training split's fingerprint depends on: the rows the adapter makes of the data
DATA_PARTS = ("data", "features", "max_seq_len", "item_key")


def data_changed(plain: Any, config: Any) -> bool:
    """``config`` (a bundle's, with ``--set`` overrides) reads other data than ``plain``
    (the bundle's own): an override of another key leaves the data as it was."""
    a, b = plain.model_dump(mode="json"), config.model_dump(mode="json")
    return any(a.get(k) != b.get(k) for k in DATA_PARTS)


def check_trained_on(config: Any, frame: Any, manifest: dict[str, Any], bundle: str) -> None:
    """``ctr load --bundle``: the data read now (``CTR_DATA_ROOT``, the config's files) is
    the data the bundle was trained on: its training split's fingerprint is the
    manifest's. Another data set in its place (another category's files, a shorter
    file) loaded silently, and the model served histories it was never trained on.
    Nothing is checked for a bundle without a fingerprint, or with a random split whose
    seed it did not record (exports before session 37: the manifest's config leaves
    ``data.split_seed`` out)."""
    from training.data import split_frame
    from training.data.generic import DataError, data_root, fingerprint, reads_data_root

    expected = manifest.get("data_fingerprint")
    seed = manifest.get("data_split_seed")
    if not isinstance(expected, str):
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        if config.data.split == "random":
            return
        seed = config.data.split_seed
    train, _, _ = split_frame(frame, config.data, seed=seed, trained=True)
    got = fingerprint(train)
    if got != expected:
        where = (f"data.path {config.data.path}" if config.data.path
                 else f"CTR_DATA_ROOT={data_root()}" if reads_data_root(config.data)
                 else f"the {config.data.source} source's options")  # fmt: skip
        raise DataError(
            f"the data read from {where} is not the data {bundle} was trained on (its "
            f"training split's fingerprint {got[:12]}, the manifest's {expected[:12]}): "
            "point at that data, retrain, or --force to load it anyway"
        )


def cmd_load(args: argparse.Namespace) -> int:
    from ctr.spec import FeatureConfig, load_config
    from service.loader import load_identity, load_into_redis, loaded_identity
    from service.settings import Settings
    from service.store import ping, redact
    from training.data import load_catalog, load_frame, split_frame

    trained_on = None  # the bundle's manifest, whose data_fingerprint is checked
    as_trained = False  # the config's data is a bundle's own, not changed by a --set
    if args.bundle:  # the data the served model was trained on, by its own config
        config, trained_on = bundle_config(Path(args.bundle), _overrides(args.set))
        plain = FeatureConfig.model_validate(trained_on["config"])  # without the --set
        as_trained = not data_changed(plain, config)
        if args.force or not as_trained:
            trained_on = None  # other data on purpose
    else:
        config = load_config(args.config, _overrides(args.set))
    settings = Settings()
    url = args.redis_url or settings.redis_url
    cluster = args.cluster or settings.redis_cluster
    ping(url, cluster)  # before the data is read: that can take minutes
    replay = args.replay_split
    if replay and config.data.split == "random":
        raise ValueError(
            "--replay-split needs a time split (data.split last_per_user or time): a "
            "random split's examples have no time order to replay them in"
        )
    if replay and args.once:
        # the record cannot see the events a replay posted since: a second replay over
        # them had its events answered "duplicate" and scored on the first one's
        raise ValueError("--once with --replay-split: a replay starts from a fresh load")
    if args.once and loaded_identity(url, cluster) == load_identity(config):  # no replay
        print(f"{redact(url)} holds this data already (ctr:loaded): not loading")
        return 0
    frame = load_frame(config)
    if trained_on:
        check_trained_on(config, frame, trained_on, args.bundle)
    users = None
    if replay:
        # a bundle's split as it was trained (one trained before a split was refused);
        # a --set of the data (data.split=time) is checked as a --config's is
        _, val, test = split_frame(frame, config.data, seed=config.data.split_seed,
                                   trained=as_trained)  # fmt: skip
        users = test if replay == "test" else val
    counts = load_into_redis(config, frame, url, progress=not args.quiet, cluster=cluster,
                             catalog=load_catalog(config),
                             sequence_ttl_s=settings.sequence_ttl_s,
                             max_id_length=settings.max_id_length, user_frame=users,
                             replay=replay)  # fmt: skip
    print(f"loaded {counts['users']} users and {counts['items']} items into {redact(url)}")
    for what in ("users", "items"):
        n, first = counts[f"unreachable_{what}"]
        if n:
            print(f"warning: {n} {what} have IDs no request can name (empty, longer than "
                  f"CTR_MAX_ID_LENGTH={settings.max_id_length}, or control characters; "
                  f"first: {first[:80]!r}): the API refuses them", file=sys.stderr)  # fmt: skip
    before = counts.get("replaced")
    if before:
        print(f"warning: {redact(url)} held another data set (config {before.get('name')!r}, "
              f"source {before.get('source')!r}, path {before.get('path')!r}; "
              f"{counts.get('replaced_differs')}): its item "
              "features were replaced (those this data lacks deleted), and users both "
              "hold too; "
              "serve two data sets from two Redis databases (CTR_REDIS_URL .../<db>)",
              file=sys.stderr)  # fmt: skip
    return 0


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


def _store_default() -> str:
    """The model store a command writes or reads by default: ``CTR_MODELS_DIR``, as the
    service reads it (``ctr export`` wrote to ``models`` whatever it said, and the
    service, told where the store is, did not find the bundle: an API review)."""
    return os.environ.get("CTR_MODELS_DIR") or "models"


def cmd_demo(args: argparse.Namespace) -> int:
    from ctr.demo import run_demo

    return run_demo(args)


def cmd_bench_model(args: argparse.Namespace) -> int:
    from training.bench import ablation, run

    ns = [int(x) for x in args.n.split(",")]
    print(f"command: ctr bench-model {' '.join(sys.argv[2:])}".strip())
    over = _overrides(args.set)
    print(run(args.models.split(","), ns, args.threads, args.repeats, args.seq_len, over))
    if args.ablation:
        print()
        print(ablation(args.ablation, args.threads, args.repeats, args.seq_len))
    return 0


def cmd_build_ops(args: argparse.Namespace) -> int:
    from ctr import native

    cuda = {"auto": None, "yes": True, "no": False}[args.cuda]
    levels = [a.strip() for a in args.arch.split(",") if a.strip()] if args.arch else []
    if args.out and not levels:
        print("build-ops: --out needs --arch LEVELS, e.g. x86-64-v4,x86-64-v3,x86-64-v2 "
              f"(known: {', '.join(native.LEVELS)})", file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.out:
            built = native.build_levels(levels, Path(args.out), cuda)
        else:  # into the cache; no --arch: $CTR_OPS_CXX_ARCH or -march=native, as before
            built = [(a, native.build(cuda=cuda, arch=a)) for a in levels or [None]]
    except native.NativeError as exc:
        print(f"ctr build-ops: error: {exc}", file=sys.stderr)
        return 2
    for level, lib in built:
        lacks = native.missing_flags(level) if level in native.LEVEL_FLAGS else []
        test = f"not self-tested: this CPU lacks {' '.join(lacks)}" if lacks else "self-test passed"
        arch = f"{level}, " if level else ""
        print(f"{lib.path} ({arch}cuda kernel: {'yes' if lib.cuda else 'no'}, {test})")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from training.bench_gpu import render, run
    from training.bench_service import _device

    command = "ctr bench-gpu " + shlex.join(sys.argv[2:])
    res = run(
        Path(args.models_dir),
        args.models.split(","),
        [int(x) for x in args.n.split(",")],
        args.repeats,
        [int(x) for x in args.users.split(",")],
    )
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    device = _device({"CTR_PROVIDER": "cuda" if cuda else "cpu"})
    table = f"Command: `{command.strip()}`\n\n" + render(res, device, args.repeats)
    print(table)
    if args.out:
        _write_report(Path(args.out), "bench_gpu", res, table)
    return 0


def cmd_profile_graph(args: argparse.Namespace) -> int:
    from training.profile_graph import profile, render

    res = profile(Path(args.models_dir), args.model, args.n, args.graph, args.threads, args.runs)
    command = "ctr profile-graph " + shlex.join(sys.argv[2:])
    table = f"Command: `{command.strip()}`\n\n" + render(res, args.top)
    print(table)
    if args.out:
        _write_report(Path(args.out), "profile_graph", res, table)
    return 0


def cmd_bench_path(args: argparse.Namespace) -> int:
    _bench_db(args)
    import tempfile

    from training.bench_path import render, run

    command = "ctr bench-path " + shlex.join(sys.argv[2:])
    ns = [int(x) for x in args.n.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        where, name = Path(args.models_dir or tmp), args.model
        if not args.models_dir:
            from training.bench_service import make_bundle

            name = make_bundle(args.model, where, 50)[0].name
        res = run(where, name, ns, args.redis_url, args.rounds, args.reps)
    table = render(res, command.strip())
    print(table)
    if args.out:
        _write_report(Path(args.out), "bench_path", res, table)
    return 0


def cmd_bench_pair(args: argparse.Namespace) -> int:
    _bench_db(args)
    from training.bench_pair import render, run

    envs = (dict(args.a), dict(args.b))
    res = run(
        args.model, args.n, args.concurrency, args.rounds, args.seconds, envs,
        args.redis_url, (args.port, args.port + 1), args.threads, args.inflight,
        Path(args.models_dir) if args.models_dir else None, args.writes, args.other_writes,
        args.pipelined, _overrides(args.set),
        tuple(Path(r) if r else None for r in (args.a_root, args.b_root)), args.b_first,
    )  # fmt: skip
    table = render(res, ("ctr bench-pair " + shlex.join(sys.argv[2:])).strip())
    print(table)
    if args.out:
        _write_report(Path(args.out), "bench_pair", res, table)
    return 0


def _json_report(res: Any) -> str:
    """A run's raw results as JSON, null for a figure it could not give (NaN is not
    JSON: strict readers refuse it)."""
    from ctr.bundle import finite

    return json.dumps(finite(res), indent=2, allow_nan=False)


def _write_report(out: Path, stem: str, res: dict, table: str) -> None:
    """``out/<stem>.json`` (the raw results) and ``out/<stem>.md`` (the printed table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(_json_report(res))
    (out / f"{stem}.md").write_text(table + "\n")


def cmd_bench(args: argparse.Namespace) -> int:
    _bench_db(args)
    from training.bench_service import plot, render, run

    res = run(
        args.models.split(","),
        [int(x) for x in args.n.split(",")],
        [int(x) for x in args.concurrency.split(",")],
        args.seconds,
        args.threads,
        args.redis_url,
        args.port,
        _overrides(args.set),
        args.inflight,
        dict(args.env),
        Path(args.models_dir) if args.models_dir else None,
        [float(x) for x in args.rates.split(",") if x],
        args.writes,
    )
    command = "ctr bench " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "ctr bench"
    table = render(res, command)
    print(table)
    if args.out:
        _write_report(Path(args.out), "bench_service", res, table)
        for p in plot(res, Path(args.out)):
            print(f"wrote {p}")
    return 0


def cmd_impressions(args: argparse.Namespace) -> int:
    import csv

    from service.impression_read import Impression, ImpressionReader, OnlineEval
    from service.settings import Settings
    from service.store import ping, redact, sync_client

    settings = Settings()
    url = args.redis_url or settings.redis_url
    cluster = args.cluster or settings.redis_cluster
    stream = args.stream or settings.impression_stream
    if not stream:
        raise ValueError("--stream: no stream named (nor CTR_IMPRESSION_STREAM set)")
    ping(url, cluster)
    client = sync_client(url, cluster, timeout_s=30)
    kind = client.type(stream)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind != "stream":  # a typo would otherwise read as "nothing was logged"
        client.close()
        what = "no such key" if kind == "none" else f"a {kind}, not a stream"
        raise ValueError(
            f"--stream {stream!r}: {what} in {redact(url)} (the service's "
            "CTR_IMPRESSION_STREAM; it is made at the first logged response)"
        )
    types = frozenset(t.strip() for t in args.types.split(",") if t.strip())
    models_dir = args.models_dir or settings.models_dir
    config, where = served_config(client, stream, models_dir)
    item_key = args.item_key or served_item_key(config, where, models_dir)
    # what the service keeps of a history (CTR_SEQUENCE_KEEP, 0: the model's L): a
    # history that long may have lost a click to trimming (None: not known, no check)
    # the model's L: the smallest over the model's versions in the store, for the service
    # trims a history to the L of the version loaded when each event came, which need
    # not be the first logged response's (erring low only censors more, never hides a
    # click)
    keep = (args.keep if args.keep is not None else settings.sequence_keep
            or smallest_history(models_dir, where, config)) or None  # fmt: skip
    seconds, micros = client.time()  # Redis's clock, once: a row scored after now - window
    now = seconds + micros / 1e6  # is pending, however long the read takes
    # a history expires CTR_SEQUENCE_TTL_S after its user's last event: a click older
    # than that may be gone with it (rows censored, not labelled 0)
    reader = ImpressionReader(client, stream, item_key, args.window_s, types, args.skew_s,
                              now=now, keep=keep, ttl_s=settings.sequence_ttl_s)  # fmt: skip
    online = OnlineEval()
    try:
        with contextlib.ExitStack() as stack:
            out = None
            if args.out:  # rows written as they are read: none held
                out = csv.writer(stack.enter_context(open(args.out, "w", newline="")))
                out.writerow(Impression.FIELDS)
            for row in reader:
                online.add(row)
                if out is not None:
                    out.writerow(row.row())
        trimmed = _stream_trimmed(client, stream)
    finally:
        client.close()
    figures = online.summary()
    for name, per_version in figures["by_version"].items():
        per_version["offline"] = offline_metrics(models_dir, name)
    figures["entries"] = reader.entries
    figures["duplicates"] = reader.duplicates
    figures["unreadable"] = reader.unreadable
    figures["now"] = now
    figures["pending"] = reader.pending
    figures["unreadable_histories"] = reader.unreadable_histories
    figures["unreadable_history_rows"] = reader.unreadable_history_rows
    figures["censored"] = reader.censored
    figures["censored_expired"] = reader.expired
    figures["sequence_ttl_s"] = settings.sequence_ttl_s
    figures["history_keep"] = keep
    figures["behaviours"] = reader.behaviours.to_dict()
    print(json.dumps(figures, indent=2))
    for line in reader.behaviours.warnings(item_key, types):
        print(f"warning: {line}", file=sys.stderr)
    for line in _impression_warnings(reader, now, trimmed):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _stream_trimmed(client: Any, stream: str) -> tuple[int, int] | None:
    """``(entries now, entries ever added)`` where the stream has lost some (trimmed
    by ``MAXLEN`` or deleted), from ``XINFO STREAM`` (``entries-added``: Redis 7); else
    None."""
    from redis.exceptions import ResponseError

    try:
        info = client.xinfo_stream(stream)
    except ResponseError:
        return None
    added = info.get("entries-added")
    length = info.get("length")
    if isinstance(added, int) and isinstance(length, int) and added > length:
        return length, added
    return None


def _impression_warnings(
    reader: ImpressionReader, now: float, trimmed: tuple[int, int] | None
) -> list[str]:
    """``ctr impressions``' lines for stderr beyond the behaviours': histories that
    could not be read, and a stream whose oldest entry's click window is still open
    (every row pending: no figures), and rows censored as their history may have expired."""
    out = []
    if reader.expired:
        out.append(f"{reader.expired} rows that would be labelled 0 are censored: their "
                   f"user's history may have expired since (CTR_SEQUENCE_TTL_S="
                   f"{reader.ttl_s:g}) and taken a click with it; read the log within the "
                   "TTL of the scoring")  # fmt: skip
    if reader.unreadable_histories:
        named = "; ".join(f"{user!r}: {error}" for user, error in reader.history_errors)
        out.append(f"{reader.unreadable_histories} user histories could not be read "
                   f"({named}): their {reader.unreadable_history_rows} rows have no label "
                   "and are left out of the figures")  # fmt: skip
    if reader.oldest_ts is not None and reader.oldest_ts + reader.window_s > now:
        age = max(now - reader.oldest_ts, 0.0)
        why = (f"it has lost {trimmed[1] - trimmed[0]} of the {trimmed[1]} entries added "
               "(trimmed to CTR_IMPRESSION_MAXLEN, or deleted): raise CTR_IMPRESSION_MAXLEN "
               "or read it with a shorter --window-s"
               if trimmed else "read it once the window has passed, or with a shorter "
               "--window-s")  # fmt: skip
        out.append(f"the stream's oldest entry was scored {age:.0f} s ago, within "
                   f"--window-s {reader.window_s:g}: every row is pending (a click may still "
                   f"come) and left out of the figures; {why}")  # fmt: skip
    return out


def served_config(client: Any, stream: str, models_dir: str) -> tuple[Any, str]:
    """The feature config (``ctr.spec.FeatureConfig``) of the model that served
    ``stream``'s first logged response, read from that bundle's manifest in
    ``models_dir``, or None where the entry or the manifest is not there or not
    readable; and that model's ``"<name>/<version>"`` (``none logged``)."""
    from ctr.bundle import MANIFEST, BundleError, read_checked_manifest, version_of
    from ctr.spec import FeatureConfig
    from service.impression_read import pages, parse_entry

    served = None
    for entry_id, fields in next(pages(client, stream, page=1), []):
        rows = parse_entry(entry_id, fields)
        if rows:
            served = (rows[0].model, rows[0].version)
    where = f"{served[0]}/{served[1]}" if served else "none logged"
    if served is not None and version_of(served[1]) is not None:
        path = Path(models_dir) / served[0] / served[1] / MANIFEST
        try:
            return FeatureConfig.model_validate(read_checked_manifest(path)["config"]), where
        except (BundleError, KeyError, ValueError):
            pass
    return None, where


def smallest_history(models_dir: str, where: str, config: Any) -> int:
    """The smallest history length (``max_seq_len``) among the versions in
    ``models_dir`` of the model ``where`` names (``"<name>/<version>"``), the served
    one's (``config``) included; 0 where none is known."""
    from ctr.bundle import MANIFEST, BundleError, list_versions, read_checked_manifest

    lengths = [config.max_seq_len] if config is not None else []
    name = where.rpartition("/")[0]
    try:
        versions = list_versions(models_dir, name) if name else []
    except BundleError:
        versions = []
    for v in versions:
        try:
            manifest = read_checked_manifest(Path(models_dir) / name / str(v) / MANIFEST)
            length = manifest["config"]["max_seq_len"]
        except (BundleError, KeyError, TypeError, ValueError):
            continue
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            lengths.append(length)  # a broken version's (0, 1e400, text) is no length
    return min(lengths, default=0)


def served_item_key(config: Any, where: str, models_dir: str) -> str:
    """The field stored behaviours carry a candidate's ID under: the served model's
    (``config``, from :func:`served_config`) item key feature's source; ``item_id``
    (said on stderr) where its manifest was not found."""
    if config is not None:
        source: str = config.item_id_feature.source
        return source
    print(f"note: --item-key item_id (the served model's manifest was not found under "
          f"{models_dir} ({where}); name it with --item-key or --models-dir)",
          file=sys.stderr)  # fmt: skip
    return "item_id"


def offline_metrics(models_dir: str, served: str) -> dict[str, Any] | None:
    """The test-split figures the manifest of ``served`` (``"<name>/<version>"``, as the
    impression log names it) recorded at export, to set beside its online ones; None
    where that bundle is not in ``models_dir`` or recorded none."""
    from ctr.bundle import MANIFEST, version_of

    name, _, version = served.rpartition("/")
    if not name or version_of(version) is None:
        return None
    path = Path(models_dir) / name / version / MANIFEST
    try:
        test = json.loads(path.read_text()).get("metrics", {}).get("test")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(test, dict):
        return None
    keep = ("auc", "gauc", "logloss", "mean_pred", "observed_ctr", "calibration")
    return {k: test[k] for k in keep if k in test}


def cmd_results(args: argparse.Namespace) -> int:
    from training.results import render, run

    if args.out and Path(args.out).suffix == ".json":  # the table's JSON goes beside it
        raise ValueError(f"--out {args.out}: the Markdown table's path (its .json is "
                         "written beside it, which would overwrite it)")  # fmt: skip
    seeds = list(range(args.seeds))
    overrides = _overrides(args.set)
    res = run(args.datasets.split(","), args.models.split(","), seeds, overrides, Path(args.runs))
    command = "ctr results " + shlex.join(sys.argv[2:])
    text = render(res, command.strip(), overrides)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(_json_report(res))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    _bench_db(args)
    from training.soak import run

    return run(
        args.duration,
        args.concurrency,
        args.sample,
        args.warmup,
        args.max_growth_mb,
        args.redis_url,
        args.port,
        args.threads,
    )


BENCH_REDIS = "redis://127.0.0.1:6379/14"
BENCH_REDIS_HELP = (
    "the benchmark's own Redis database, not $CTR_REDIS_URL: it loads users and replaces "
    "the ctr:item:* hashes there; one holding keys no benchmark wrote is refused unless "
    "--force (default: %(default)s)"
)
BENCH_FORCE_HELP = "load into --redis-url even where it holds keys no benchmark wrote"


def _bench_db(args: argparse.Namespace) -> None:
    """A benchmark's database is its own (:func:`service.loader.check_bench_db`),
    checked before anything is built or started."""
    from service.loader import check_bench_db

    check_bench_db(args.redis_url, args.force)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML feature config")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    t.add_argument("--set", action="append", default=[], help=SET_HELP)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a training run to the model store")
    e.add_argument("--run", required=True, help="training run folder")
    e.add_argument("--models-dir", default=_store_default(),
                   help="the model store (default: $CTR_MODELS_DIR, else models)")  # fmt: skip
    e.add_argument("--name", help="model name (default: the config's name)")
    e.set_defaults(func=cmd_export)

    ld = sub.add_parser("load", help="bulk-load a dataset's users and items into Redis")
    source = ld.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a feature config (YAML)")
    source.add_argument(
        "--bundle",
        help="take the config from a bundle's manifest: a version folder (models/din/3) or "
        "a model's folder (models/din: its newest version), so that Redis holds the data "
        "the served model was trained on",
    )
    ld.add_argument("--redis-url", help="default: $CTR_REDIS_URL")
    ld.add_argument("--cluster", action="store_true", help="Redis Cluster (or CTR_REDIS_CLUSTER=1)")
    ld.add_argument("--set", action="append", default=[], help=SET_HELP)
    ld.add_argument("--quiet", action="store_true")
    ld.add_argument(
        "--force",
        action="store_true",
        help="with --bundle: load even where the data is not what the bundle was trained "
        "on (its manifest's data_fingerprint; not checked where --set changes the data)",
    )
    ld.add_argument(
        "--once",
        action="store_true",
        help="load nothing when the last complete load into this Redis was of the same "
        "data (the key ctr:loaded): events stored since are kept",
    )
    ld.add_argument(
        "--replay-split",
        choices=("test", "val"),
        help="store each user of that split as of its first example time there (the "
        "history and profile those examples held in training, no later behaviour), for "
        "replaying the split's requests in time order, each example's behaviours posted "
        "as /v1/events after it is scored (per data.behaviour_labels: the clicks, or "
        "every example; with a timestamp): by default each user's newest history, the "
        "split's behaviours in it, overstates a replay's AUC. A time split only; not "
        "with --once",
    )
    ld.set_defaults(func=cmd_load)

    sv = sub.add_parser("serve", help="start the scoring service (settings from CTR_* env)")
    sv.add_argument("--host", help="default: $CTR_HOST (0.0.0.0)")
    sv.add_argument("--port", type=int, help="default: $CTR_PORT (8000)")
    sv.add_argument("--workers", type=int, help="worker processes (default: $CTR_WORKERS, 1)")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="train, export, load, serve and score a sample request")
    d.add_argument("--config", default="configs/synthetic_din.yaml")
    d.add_argument("--data-root", help="use the shared datasets under this path")
    d.add_argument("--models-dir", default=_store_default(),
                   help="the model store (default: $CTR_MODELS_DIR, else models)")  # fmt: skip
    d.add_argument("--port", type=int, default=8000, help="the service's (default: %(default)s)")
    d.add_argument("--keep-serving", action="store_true", help="leave the service running")
    d.add_argument("--set", action="append", default=[], help=SET_HELP)
    d.set_defaults(func=cmd_demo)
    bm = sub.add_parser("bench-model", help="model-only ORT latency vs naive copies and torch")
    bm.add_argument("--models", default="din,dien")
    bm.add_argument("--n", type=_counts, default="1,50,200,500,1000")
    bm.add_argument("--threads", type=_positive(int), default=2)
    bm.add_argument("--repeats", type=_positive(int), default=50)
    bm.add_argument("--seq-len", type=int, default=50)
    bm.add_argument(
        "--ablation", type=_non_negative(int), default=500, help="DIN ablation at this N (0 = off)"
    )
    bm.add_argument("--set", action="append", default=[], help="config override")
    bm.set_defaults(func=cmd_bench_model)
    bs = sub.add_parser("bench", help="service benchmark over HTTP with a real Redis")
    bs.add_argument("--models", default="din,dien")
    bs.add_argument("--n", type=_counts, default="50,200,500,1000")
    bs.add_argument("--concurrency", type=_counts, default="1,2,4,8,16")
    bs.add_argument("--seconds", type=_positive(float), default=5.0)
    bs.add_argument("--threads", type=_non_negative(int), default=2, help=THREADS_HELP)
    bs.add_argument(
        "--inflight",
        type=_positive(int),
        default=1,
        help="ORT runs in flight (CTR_INFERENCE_CONCURRENCY)",
    )
    bs.add_argument("--redis-url", default=BENCH_REDIS, help=BENCH_REDIS_HELP)
    bs.add_argument("--force", action="store_true", help=BENCH_FORCE_HELP)
    bs.add_argument("--port", type=int, default=8310)
    bs.add_argument(
        "--out", default="runs/bench",
        help="folder for JSON, table and plots (default runs/bench: never over a committed "
        "raw output under docs/bench)",
    )  # fmt: skip
    bs.add_argument("--set", action="append", default=[], help="config override")
    bs.add_argument(
        "--env",
        action="append",
        default=[],
        type=_setting,
        help="service setting, e.g. CTR_PROVIDER=cuda",
    )
    bs.add_argument("--rates", default="", help="also run open-loop at these req/s rates")
    bs.add_argument(
        "--writes",
        type=_share,
        default=0.0,
        help="share of closed-loop requests before which the client appends a behaviour "
        "to the request's user in Redis (0-1; default 0: nothing written)",
    )
    bs.add_argument(
        "--models-dir", default="", help="score these existing bundles (--models names them)"
    )
    bs.set_defaults(func=cmd_bench)
    bo = sub.add_parser("build-ops", help="build the custom-op library (native/), print its path")
    bo.add_argument(
        "--cuda", choices=["auto", "yes", "no"], default="auto",
        help="the CUDA kernel: auto = when nvcc is found and ORT has the CUDA provider",
    )  # fmt: skip
    bo.add_argument(
        "--arch", default="",
        help="comma list of CPU levels, each built with -march=<level>: x86-64-v4, "
        "x86-64-v3, x86-64-v2, generic (no -march flag), native (this CPU only); "
        "default: $CTR_OPS_CXX_ARCH when set, else native",
    )  # fmt: skip
    bo.add_argument(
        "--out", default="",
        help="install each --arch level as OUT/<level>/libctr_ops.so (+ .sha256): a folder "
        "CTR_OPS_LIBRARY can name (the best level this CPU supports is loaded)",
    )  # fmt: skip
    bo.set_defaults(func=cmd_build_ops)
    bg = sub.add_parser("bench-gpu", help="model alone on a GPU: CUDA EP, IO binding, graphs")
    bg.add_argument("--models-dir", required=True, help="bundles to measure")
    bg.add_argument("--models", default="bench-din,bench-dien")
    bg.add_argument("--n", type=_counts, default="50,200,500,1000")
    bg.add_argument("--repeats", type=_positive(int), default=200)
    bg.add_argument("--users", type=_counts, default="1,2,4,8,16",
                    help="micro-batch sizes at N=500")
    bg.add_argument("--out", default="", help="folder for JSON and table")
    bg.set_defaults(func=cmd_bench_gpu)
    pg = sub.add_parser("profile-graph", help="a bundle's graph node by node (ORT profiler)")
    pg.add_argument("--models-dir", default=_store_default(),
                    help="the model store (default: $CTR_MODELS_DIR, else models)")  # fmt: skip
    pg.add_argument("--model", required=True, help="bundle name (its latest version)")
    pg.add_argument(
        "--n", type=_positive(int), default=500, help="candidates (one user, full history)"
    )
    pg.add_argument("--graph", choices=("standard", "fused"), default="standard",
                    help="standard (default): the bundle's model.onnx; fused: the graph "
                    "the service serves, user side once")  # fmt: skip
    pg.add_argument("--threads", type=_non_negative(int), default=2, help=THREADS_HELP)
    pg.add_argument("--runs", type=_positive(int), default=50)
    pg.add_argument("--top", type=_positive(int), default=15, help="nodes in the table")
    pg.add_argument("--out", default="", help="folder for JSON and table")
    pg.set_defaults(func=cmd_profile_graph)
    bp = sub.add_parser("bench-path", help="in-process cost of the request path's Python")
    bp.add_argument("--model", default="din", help="din|dien, or a bundle name with --models-dir")
    bp.add_argument("--models-dir", default="", help="existing bundles (default: build one)")
    bp.add_argument("--n", type=_counts, default="50,500")
    bp.add_argument("--rounds", type=_positive(int), default=7)
    bp.add_argument("--reps", type=_positive(int), default=100)
    bp.add_argument("--redis-url", default=BENCH_REDIS, help=BENCH_REDIS_HELP)
    bp.add_argument("--force", action="store_true", help=BENCH_FORCE_HELP)
    bp.add_argument("--out", default="", help="folder for JSON and table")
    bp.set_defaults(func=cmd_bench_path)
    pp = sub.add_parser(
        "bench-pair", help="two service settings side by side, windows interleaved A B B A"
    )
    pp.add_argument("--model", default="din", help="din|dien, or a bundle name with --models-dir")
    pp.add_argument("--models-dir", default="", help="existing bundles (default: build one)")
    pp.add_argument("--n", type=_positive(int), default=50)
    pp.add_argument("--concurrency", type=_positive(int), default=4)
    pp.add_argument("--rounds", type=_positive(int), default=12,
                    help="windows per side, an even number (A B B A ...)")  # fmt: skip
    pp.add_argument("--seconds", type=_positive(float), default=1.5, help="length of each window")
    pp.add_argument(
        "--a", action="append", default=[], type=_setting, help="A's setting, e.g. CTR_X=1"
    )
    pp.add_argument(
        "--b", action="append", default=[], type=_setting, help="B's setting, e.g. CTR_X=2"
    )
    pp.add_argument("--threads", type=_non_negative(int), default=2, help=THREADS_HELP)
    pp.add_argument("--inflight", type=_positive(int), default=1, help="CTR_INFERENCE_CONCURRENCY")
    pp.add_argument("--redis-url", default=BENCH_REDIS, help=BENCH_REDIS_HELP)
    pp.add_argument("--force", action="store_true", help=BENCH_FORCE_HELP)
    pp.add_argument(
        "--writes",
        type=_share,
        default=0.0,
        help="share of requests before which the client appends a behaviour to the "
        "request's user in Redis (0-1; default 0: nothing written)",
    )
    pp.add_argument(
        "--other-writes",
        type=_non_negative(float),
        default=0.0,
        help="appends per second for users nobody scores, from a process of its own, each "
        "a round trip of its own",
    )
    pp.add_argument(
        "--pipelined",
        action="store_true",
        help="--other-writes in one pipeline per 10 ms instead (fewer, larger invalidations)",
    )
    pp.add_argument(
        "--set", action="append", default=[], help="config override for the bundle built"
    )
    pp.add_argument(
        "--a-root", default="", help="A's service runs this checkout's code (e.g. an older commit)"
    )
    pp.add_argument("--b-root", default="", help="the same for B")
    pp.add_argument("--b-first", action="store_true",
                    help="start B's service before A's (A's starts first by default)")  # fmt: skip
    pp.add_argument("--port", type=int, default=8330, help="A's port; B's is the next")
    pp.add_argument("--out", default="", help="folder for JSON and table")
    pp.set_defaults(func=cmd_bench_pair)
    im = sub.add_parser(
        "impressions",
        help="the impression log (CTR_IMPRESSION_STREAM) as rows labelled by the users' "
        "later behaviours, and the served model's online AUC and calibration",
    )
    im.add_argument("--redis-url", help="default: $CTR_REDIS_URL")
    im.add_argument("--cluster", action="store_true", help="Redis Cluster (or CTR_REDIS_CLUSTER=1)")
    im.add_argument("--stream", help="default: $CTR_IMPRESSION_STREAM")
    im.add_argument("--item-key", default="",
                    help="the behaviours' item ID field (default: the item key of the model "
                    "that served the stream's first response, from its manifest in "
                    "--models-dir; item_id where that is not there)")  # fmt: skip
    im.add_argument("--keep", type=_non_negative(int), default=None,
                    help="behaviours the service keeps per user (CTR_SEQUENCE_KEEP; default: "
                    "that setting, else the served model's L; 0: not known): a row labelled "
                    "0 whose window reaches before the oldest entry of a history that long "
                    "is censored (a click there may have been trimmed): no label, left out "
                    "of the figures")  # fmt: skip
    im.add_argument("--window-s", type=_positive(float), default=3600.0,
                    help="a behaviour this long after the scoring at most labels it 1; a row "
                    "scored less than this before the command started is pending: no label, "
                    "left out of the figures (default: %(default)s)")  # fmt: skip
    im.add_argument("--skew-s", type=_non_negative(float), default=1.0,
                    help="a behaviour stamped this long before the scoring still counts (the "
                    "client's clock against the server's; whole-second timestamps; default: "
                    "%(default)s)")  # fmt: skip
    im.add_argument("--types", default="click",
                    help="behaviour types that count, comma-separated (empty: all; default: "
                    "%(default)s)")  # fmt: skip
    im.add_argument("--out", default="", help="CSV of the labelled rows")
    im.add_argument("--models-dir", default="",
                    help="the model store whose manifests' offline test figures are set "
                    "beside each served version's online ones (default: $CTR_MODELS_DIR, "
                    "models)")  # fmt: skip
    im.set_defaults(func=cmd_impressions)
    rs = sub.add_parser("results", help="Base/DeepFM/DIN/DIEN on real data, mean ± std")
    rs.add_argument("--datasets", default="amazon_beauty,movielens")
    rs.add_argument("--models", default="base,deepfm,din,dien")
    rs.add_argument("--seeds", type=_positive(int), default=3)
    rs.add_argument("--set", action="append", default=[], help=SET_HELP)
    rs.add_argument("--runs", default="runs/results")
    rs.add_argument("--out", default="runs/results.md", help="table (and its .json beside it)")
    rs.set_defaults(func=cmd_results)
    sk = sub.add_parser("soak", help="bounded soak run: errors and server RSS growth")
    sk.add_argument("--duration", type=_positive(float), default=300.0)
    sk.add_argument("--concurrency", type=_positive(int), default=4)
    sk.add_argument("--sample", type=_positive(float), default=5.0)
    sk.add_argument("--warmup", type=_non_negative(float), default=30.0)
    sk.add_argument("--max-growth-mb", type=_non_negative(float), default=50.0)
    sk.add_argument("--threads", type=_non_negative(int), default=2, help=THREADS_HELP)
    sk.add_argument("--redis-url", default=BENCH_REDIS, help=BENCH_REDIS_HELP)
    sk.add_argument("--force", action="store_true", help=BENCH_FORCE_HELP)
    sk.add_argument("--port", type=int, default=8311)
    sk.set_defaults(func=cmd_soak)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a wrong input raises (a missing file, a bad config or setting, a bundle that
    does not load, Redis away, ...): ``main`` prints these as one line, not a traceback.
    Only modules already imported are asked, so the torch-free image stays torch-free."""
    from pydantic import ValidationError
    from redis.exceptions import RedisError
    from yaml import YAMLError

    from ctr.bundle import BundleError
    from ctr.native import NativeError

    found: list[type[BaseException]] = [
        OSError, ValueError, ValidationError, RedisError, YAMLError, BundleError, NativeError
    ]  # fmt: skip
    for module, name in (
        ("service.model", "ProviderError"),
        ("training.export", "ParityError"),
        ("training.train", "TrainingDiverged"),
        ("service.loader", "LoadLost"),
    ):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def describe(exc: BaseException) -> str:
    """One line for a user error: a config's or a setting's fields by name (settings as
    their ``CTR_*`` variables), a missing file by its path."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        env = exc.title == "Settings"
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if not loc:  # a rule over the whole config (e.g. an item_key naming no feature)
                parts.append(err["msg"].removeprefix("Value error, "))
                continue
            loc = f"CTR_{loc.upper()}" if env else loc
            shown = err["input"]
            if loc in ("CTR_API_KEY", "api_key"):  # a secret: never echoed
                shown = "…"
            elif loc in ("CTR_REDIS_URL", "redis_url") and isinstance(shown, str):
                from service.store import redact

                shown = redact(shown)  # its password hidden
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix, not ours
            shown_text = f"{shown!r:.60}"
            skip = err["type"] == "extra_forbidden" or f"got {shown_text}" in msg  # said
            got = "" if skip else f" (got {shown_text})"
            parts.append(f"{loc}: {msg}{got}")
        return f"invalid {'setting' if env else 'config'}: " + "; ".join(parts)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file or folder: {exc.filename}"
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:  # where it was raised: a bug that raised ValueError is then findable
        line += f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]"
    return line


# what an interrupted command leaves, said in its one line (exit status 130)
_INTERRUPTED = {
    "train": "the run folder holds no finished run (no config.json): train it again",
    # once it has begun writing, the load says what it left (service.loader.LEFT_BY_PHASE)
    "load": "nothing was written to Redis (stopped before the load began)",
    "export": "no version was published",
}


# another command's load into Redis, cut short once it had begun writing
_LOAD_CUT = ("its load into Redis was cut short (Redis holds part of it, or none): run "
             "it again, which loads it again")  # fmt: skip


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a container stopping), raised as Ctrl-C is so that the same
    clean-up runs: Python's default ended the process on the spot, leaving what the
    command had half made (an export's ``.staging-*`` folder)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


# commands that stop on their own terms: the service (uvicorn drains on SIGTERM)
_OWN_SIGTERM = frozenset({"serve"})


# commands that write a report at the end of a long run: where, checked before the run
# (a read-only --out failed after hours of training)
_REPORT_OUT = {
    "results": "file", "bench": "folder", "bench-gpu": "folder",
    "profile-graph": "folder", "bench-path": "folder", "bench-pair": "folder",
}  # fmt: skip


def _check_out(args: argparse.Namespace) -> None:
    """Make ``--out``'s folder and see that this process can write there."""
    kind, out = _REPORT_OUT.get(args.command), getattr(args, "out", "")
    if not kind or not out:
        return
    folder = Path(out) if kind == "folder" else Path(out).parent
    folder.mkdir(parents=True, exist_ok=True)  # OSError: one line naming it
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(13, "--out: this process cannot write there", str(folder))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ctr import traceback_on as wanted  # not service's: ops-build has ctr.cli alone

    traceback_on = wanted()
    previous = None
    # (a rank under torchrun: its agent stops the ranks, which may sit in a collective)
    ranked = os.environ.get("WORLD_SIZE", "1") != "1"
    own = args.command in _OWN_SIGTERM or ranked
    if not own and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _check_out(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if traceback_on:
            raise
        left = getattr(exc, "ctr_left", None)
        if getattr(exc, "ctr_load_cut", False) and args.command != "load":
            left = _LOAD_CUT  # a benchmark's (or the demo's) load: no --once to speak of
        left = left or _INTERRUPTED.get(args.command)
        how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"ctr {args.command}: {how}" + (f"; {left}" if left else ""), file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:
        if traceback_on or not isinstance(exc, _user_errors()):
            raise
        print(f"ctr {args.command}: error: {describe(exc)}", file=sys.stderr)
        print("(CTR_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
