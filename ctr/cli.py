"""ctr: one entry point for every command of the product.

Torch is imported only by the commands that train, export or build a bundle (train,
export, demo, results, bench-model, and bench, bench-pair, bench-path and soak where
they build one), so that serve, load and impressions run in the torch-free runtime
image.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from ctr.cli_args import (
    BENCH_FORCE_HELP,
    BENCH_REDIS,
    BENCH_REDIS_HELP,
    SET_HELP,
    THREADS_HELP,
    _counts,
    _non_negative,
    _positive,
    _setting,
    _share,
    _store_default,
)


def _command(target: str) -> Callable[[argparse.Namespace], int]:
    """A command's function, ``"module:name"``, imported when the command runs: the
    modules that implement the commands import what they need (pydantic, redis, torch,
    ...), which the ops-build stage and the torch-free image lack."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return func(args)

    run.__name__ = run.__qualname__ = name
    return run


cmd_train = _command("ctr.cmd_train:cmd_train")
cmd_export = _command("ctr.cmd_train:cmd_export")
cmd_load = _command("ctr.cmd_train:cmd_load")
cmd_serve = _command("ctr.cmd_serve:cmd_serve")
cmd_bench = _command("ctr.cmd_bench:cmd_bench")
cmd_bench_model = _command("ctr.cmd_bench:cmd_bench_model")
cmd_bench_gpu = _command("ctr.cmd_bench:cmd_bench_gpu")
cmd_bench_path = _command("ctr.cmd_bench:cmd_bench_path")
cmd_bench_pair = _command("ctr.cmd_bench:cmd_bench_pair")
cmd_profile_graph = _command("ctr.cmd_bench:cmd_profile_graph")
cmd_results = _command("ctr.cmd_bench:cmd_results")
cmd_soak = _command("ctr.cmd_bench:cmd_soak")
cmd_impressions = _command("ctr.cmd_impressions:cmd_impressions")


def cmd_demo(args: argparse.Namespace) -> int:
    from ctr.demo import run_demo

    return run_demo(args)


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
        "--item-writes",
        type=_non_negative(float),
        default=0.0,
        help="writes per second to one item-feature hash (ctr:item:<feature>, a field no "
        "candidate has), from a process of its own, each a round trip of its own: what "
        "CTR_ITEM_TRACKING hears from a catalogue pipeline",
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
