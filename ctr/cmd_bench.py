"""The benchmark commands (``bench``, ``bench-model``, ``bench-gpu``, ``bench-path``,
``bench-pair``, ``profile-graph``, ``soak``) and ``ctr results``, and the reports they
write."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ctr.cli_args import _overrides


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


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from training.bench_gpu import render, run
    from training.bench_server import device

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
    machine = device({"CTR_PROVIDER": "cuda" if cuda else "cpu"})
    table = f"Command: `{command.strip()}`\n\n" + render(res, machine, args.repeats)
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
        item_writes=args.item_writes,
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
    from training.bench_report import plot, render
    from training.bench_service import run

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


def _bench_db(args: argparse.Namespace) -> None:
    """A benchmark's database is its own (:func:`service.loader.check_bench_db`),
    checked before anything is built or started."""
    from service.loader import check_bench_db

    check_bench_db(args.redis_url, args.force)
