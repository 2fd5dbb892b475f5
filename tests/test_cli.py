"""The ``ctr`` command as a newcomer meets it: the main job (``ctr demo``) end to end on
the synthetic generator, and wrong input answered in one line that names what is wrong,
not a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ctr.cmd_serve import serve_settings
from tests.helpers import REDIS_URL, ROOT, UNSERVED_REDIS_URL, tmpfs
from tests.redis_proc import free_port


def ctr(
    *args: str, cwd: Path = ROOT, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """``python -m ctr.cli ARGS`` on this checkout's code."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("CTR_TRACEBACK", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ctr.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_line_error(out: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a run that failed on user input (exit 2, no traceback)."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "(CTR_TRACEBACK=1 for the traceback)", out.stderr
    assert lines[-2].startswith(f"ctr {command}: error: "), out.stderr
    return lines[-2]


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["train", "--config", "configs/nope.yaml"], {},
         "no such file or folder: configs/nope.yaml"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "train.epocs=1"], {},
         "invalid config: train.epocs: Extra inputs are not permitted"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "train.epochs=0"], {},
         "invalid config: train.epochs: Input should be greater than 0 (got 0)"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "item_key=bogus"], {},
         "invalid config: item_key 'bogus' must name an item-side sparse feature"),
        (["export", "--run", "runs/nope"], {}, "no such file or folder: runs/nope"),
        (["serve"], {"CTR_PORT": "abc"},
         "invalid setting: CTR_PORT: Input should be a valid integer"),
        (["serve"], {"CTR_INTRA_OP_SPIN": "sometimes"},
         "invalid setting: CTR_INTRA_OP_SPIN: Input should be 'run', 'always' or 'never'"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "data.options.bogus=1"],
         {}, "unknown synthetic data.options ['bogus']"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set",
          "data.options.n_users=abc"], {}, "data.options.n_users must be an integer, not 'abc'"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "data.options.n_users=0"],
         {}, "data.options.n_users must be at least 1"),
        (["train", "--config", "configs/synthetic_din.yaml", "--set", "train.threads=-1"], {},
         "invalid config: train.threads: Input should be greater than 0"),
        (["results", "--datasets", "synthetic", "--out", "runs/table.json"], {},
         "--out runs/table.json: the Markdown table's path"),
        (["results", "--datasets", "synthetic,bogus"], {},
         "unknown datasets ['bogus']; known: ['amazon_beauty', 'amazon_sports', 'amazon_toys'"),
        (["results", "--datasets", "synthetic,movielens"], {"CTR_DATA_ROOT": "/nonexistent"},
         "data not found for movielens (/nonexistent/movielens-100k): set CTR_DATA_ROOT"),
        (["load", "--bundle", "models-nope/din"], {},
         "no versions of model 'din'"),
        (["serve"], {"CTR_PORT": "99999"},
         "invalid setting: CTR_PORT: Input should be less than or equal to 65535"),
        (["serve"], {"CTR_LOG_LEVEL": "foo"},
         "invalid setting: CTR_LOG_LEVEL: Input should be 'critical', 'error', 'warning'"),
        (["serve"], {"CTR_REDIS_URL": "notaurl"},
         "CTR_REDIS_URL: Redis URL must specify one of the following schemes"),
        (["serve"], {"CTR_REDIS_CLUSTER": "1", "CTR_REDIS_URL": "redis://:hush@h:1/0?timeout=3"},
         "CTR_REDIS_URL: a Redis Cluster client takes no URL option timeout"),
        (["serve"], {"CTR_API_KEY": "k\x01y"},
         "CTR_API_KEY: holds control characters, which an X-API-Key header"),
        (["serve"], {"CTR_MODEL_VERSION": "abc"},
         "CTR_MODEL_VERSION: must be a version number (digits, no leading zero) or 'latest' "
         "(got 'abc')"),
        # /admin/reload refuses "01" (another folder's number): so does the setting
        (["serve"], {"CTR_MODEL_VERSION": "01"},
         "CTR_MODEL_VERSION: must be a version number (digits, no leading zero) or 'latest' "
         "(got '01')"),
        (["serve"], {"CTR_REDIS_URL": "redis://127.0.0.1:6379/O"},
         "CTR_REDIS_URL: the database (the URL's path) must be a number"),
        (["serve"], {"CTR_MAX_BODY_BUFFER_BYTES": "500000"},
         "CTR_MAX_BODY_BUFFER_BYTES (500000) must be at least CTR_MAX_BODY_BYTES (1000000)"),
        (["serve"], {"CTR_PROCESS_METRICS_S": "0.0001"},
         "CTR_PROCESS_METRICS_S: must be 0 (start and scrapes only) or at least 0.1"),
        (["serve"], {"CTR_USER_TRACKING_DRAIN_MS": "0.001"},
         "CTR_USER_TRACKING_DRAIN_MS: must be 0 (read whenever readable) or at least 1"),
        (["serve", "--host", "999.1.1.1"], {},
         "cannot listen on 999.1.1.1:8000"),
        (["serve", "--workers", "2"], {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/prom"},
         "PROMETHEUS_MULTIPROC_DIR='/nonexistent/prom' is not a folder"),
        (["serve", "--port", "70000"], {},
         "--port: Input should be less than or equal to 65535 (got 70000)"),
        (["serve", "--workers", "0"], {"CTR_WORKERS": "2"},
         "--workers: Input should be greater than 0 (got 0)"),
    ],
)  # fmt: skip
def test_wrong_input_is_one_line_naming_it(args: list[str], env: dict[str, str], says: str) -> None:
    out = ctr(*args, **env)
    assert says in one_line_error(out, args[0])
    assert "hush" not in out.stderr  # a password in a URL never echoed


def test_more_wrong_input_named_in_one_line(tmp_path: Path) -> None:
    """From a newcomer's review: each of these was a traceback, a misleading line, a
    wrong exit status or a silent success."""
    import socket

    from tests.helpers import REDIS_URL

    # a version that does not exist, of a model that has versions (it was read as a
    # model named "9": "no versions of model '9'")
    (tmp_path / "models" / "din" / "1").mkdir(parents=True)
    (tmp_path / "models" / "din" / "1" / "manifest.json").write_text("{}")
    out = ctr("load", "--bundle", str(tmp_path / "models" / "din" / "9"))
    assert "models/din has no version 9 (have [1])" in one_line_error(out, "load")
    # a stream that is not there: it printed zero rows and exited 0
    out = ctr("impressions", "--redis-url", REDIS_URL, "--stream", "no:such:stream")
    assert "--stream 'no:such:stream': no such key" in one_line_error(out, "impressions")
    # a taken port: uvicorn's 13 lines after the model had loaded, exit status 3
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        out = ctr("serve", "--host", "127.0.0.1", "--port", port)
    assert f"127.0.0.1:{port} is in use" in one_line_error(out, "serve")
    # a Redis the demo cannot start: exit status 1, the URL unnamed, a socket "not local"
    out = ctr("demo", "--port", str(free_port()), CTR_REDIS_URL="unix:///nonexistent/r.sock")
    line = one_line_error(out, "demo")
    assert "CTR_REDIS_URL=unix:///nonexistent/r.sock does not answer" in line


@pytest.mark.parametrize("name", ["item.cate", "type", "values", "training"])
def test_a_feature_name_no_model_table_can_take_is_one_line_before_the_data(
    tmp_path: Path, name: str
) -> None:
    """torch's ModuleDict, which holds a model's tables by feature name, refuses a '.'
    and its own attributes' names: ``ctr train`` read the data, then died with a
    KeyError's traceback (config review s42). The name is refused in one line, naming
    the way out (``column:``), before the data is read (here it is not there)."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: names\nfeatures:\n"
        "  - {name: user_id, kind: sparse, side: user}\n"
        "  - {name: item_id, kind: sparse, side: item}\n"
        f"  - {{name: '{name}', kind: sparse, side: item}}\n"
        f"data: {{source: csv, path: {tmp_path / 'missing.csv'}}}\n"
    )
    line = one_line_error(ctr("train", "--config", str(config), "--quiet"), "train")
    assert f"feature name {name!r}" in line and f"with column: {name!r}" in line, line


def test_serve_flags_override_the_settings_even_when_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--port 0`` (any free port) is the flag's value, not "unset": it overrides
    CTR_PORT; flags not given leave the settings as they are."""
    from service.settings import Settings

    monkeypatch.setenv("CTR_PORT", "9999")
    monkeypatch.setenv("CTR_HOST", "127.0.0.2")
    monkeypatch.setenv("CTR_WORKERS", "3")
    flags = argparse.Namespace(host=None, port=0, workers=None)
    s = serve_settings(flags, Settings)
    assert (s.host, s.port, s.workers) == ("127.0.0.2", 0, 3)
    flags = argparse.Namespace(host="0.0.0.0", port=None, workers=1)
    s = serve_settings(flags, Settings)
    assert (s.host, s.port, s.workers) == ("0.0.0.0", 9999, 1)


def test_the_traceback_on_request() -> None:
    out = ctr("train", "--config", "configs/nope.yaml", CTR_TRACEBACK="1")
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "FileNotFoundError" in out.stderr


def test_load_checks_redis_before_reading_the_data() -> None:
    """An unreachable Redis is named (password hidden) before the data is prepared."""
    port = free_port()  # nothing listens there
    url = f"redis://:secret@127.0.0.1:{port}/0"
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", url)
    line = one_line_error(out, "load")
    assert f"the Redis at redis://:***@127.0.0.1:{port}/0 does not answer" in line
    assert re.search(r" \[store\.py:\d+\]$", line)  # where it was raised
    assert "secret" not in out.stderr + out.stdout
    assert "%" not in out.stderr  # the loader's progress bar never started
    # redis-py also reads a password from the query: hidden there too
    url = f"redis://127.0.0.1:{port}/0?password=secret&socket_timeout=1"
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", url)
    line = one_line_error(out, "load")
    assert f"127.0.0.1:{port}/0?password=***&socket_timeout=1 does not answer" in line
    assert "secret" not in out.stderr + out.stdout


def test_a_redis_url_whose_database_is_no_number_is_refused_by_the_flag_too() -> None:
    """``--redis-url redis://…/1O`` (an O for a 0): redis-py took database 0 and
    ``ctr load`` loaded every user there, exit 0, while ``CTR_REDIS_URL`` was refused
    (review, session 40)."""
    import redis

    port = int(REDIS_URL.split(":")[2].split("/")[0])
    before = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/0").dbsize()
    url = f"redis://:secret@127.0.0.1:{port}/1O"
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", url)
    line = one_line_error(out, "load")
    assert "the database (the URL's path) must be a number" in line, line
    assert "is not a usable Redis URL" in line and "does not answer" not in line, line
    assert "secret" not in out.stderr + out.stdout
    assert redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/0").dbsize() == before


def test_demo_checks_the_services_settings_before_training(tmp_path: Path) -> None:
    """A bad ``CTR_*`` value failed the service the demo starts, after minutes of
    training, export and load, with status 1: now one line naming it, status 2, before
    anything is trained (review, session 40)."""
    out = ctr("demo", "--config", str(ROOT / "configs/synthetic_din.yaml"),
              "--port", str(free_port()), cwd=tmp_path, CTR_SEQUENCE_TTL_S="-5",
              CTR_REDIS_URL=REDIS_URL)  # fmt: skip
    line = one_line_error(out, "demo")
    assert "invalid setting: CTR_SEQUENCE_TTL_S" in line, line
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_demo_refuses_a_port_in_use_before_training(tmp_path: Path) -> None:
    """A service left from an earlier demo holds the port: the demo says so at once
    instead of training and then scoring against that other service."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = ctr("demo", "--config", str(ROOT / "configs/synthetic_din.yaml"),
                  "--port", str(port), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2  # wrong input: one line, status 2
    assert f"ctr demo: error: PortInUse: port {port} is in use" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_demo_runs_the_main_job_end_to_end(tmp_path: Path) -> None:
    """``ctr demo`` (what ``scripts/demo.sh`` runs after setup) on a small synthetic set:
    train, export, load, serve, score, print the ranking, stop the service. With
    ``CTR_API_KEY`` set (and scoring protected) it sends the key: its `explain` request
    was a 401 at the last step (review, session 40)."""
    port = free_port()
    out = ctr(
        "demo", "--config", str(ROOT / "configs/synthetic_din.yaml"),
        "--models-dir", str(tmp_path / "models"), "--port", str(port),
        "--set", "train.epochs=1",
        "--set", 'data.options={"n_users": 300, "samples_per_user": 4}',
        cwd=tmp_path, timeout=600, CTR_REDIS_URL=REDIS_URL, CTR_API_KEY="k3y",
        CTR_PROTECT_SCORING="true",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "[demo] 2/5 exported" in text and "[demo] 5/5 POST /v1/score" in text
    assert "model {'name': 'din', 'version': '1'}" in text
    rows = re.findall(r"^\s+(\d+)\s+(i\d+)\s+(0\.\d{4})\s", text, re.M)
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    probs = [float(r[2]) for r in rows]
    assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    assert len({r[1] for r in rows}) == 10
    assert re.search(r"^\s+1\s+i\d+\s+0\.\d{4}\s+i\d+:-?\d\.\d\d", text, re.M)  # explained
    assert (tmp_path / "models" / "din" / "1" / "model.onnx").is_file()
    # the command it prints to serve the bundle serves it on the port it used
    assert re.search(rf"\.venv/bin/ctr serve --port {port}$", text, re.M), text[-600:]
    with socket.socket() as probe:  # the service it started is stopped
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_bench_pair_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ctr bench-pair`: each side's KEY=VALUE settings, B on the port after A's, config
    overrides for the bundle it builds (`--set`), the report written to --out; a setting
    without `=`, or no rounds or time, is refused by name."""
    import training.bench_pair as bp
    from ctr.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["bench-pair", "--a", "CTR_X=1", "--a", "CTR_Y=a=b", "--b", "CTR_X=2",
         "--port", "9000", "--n", "20", "--out", str(tmp_path),
         "--force"]  # run is faked: no database to check (its default is 6379/14)
    )  # fmt: skip
    seen: dict = {}

    def fake_run(*a: object, item_writes: float = -1.0) -> dict:
        seen["args"], seen["item_writes"] = a, item_writes
        return {"figures": 1}

    monkeypatch.setattr(bp, "run", fake_run)
    monkeypatch.setattr(bp, "render", lambda res, command: f"table for {command}")
    assert args.func(args) == 0
    model, n, _, rounds, seconds, envs, _, ports = seen["args"][:8]
    assert (model, n, rounds, seconds) == ("din", 20, 12, 1.5)
    assert seen["args"][-6:] == (0.0, 0.0, False, {}, (None, None), False)  # nothing written
    assert seen["item_writes"] == 0.0
    args = parser.parse_args(
        ["bench-pair", "--writes", "0.25", "--other-writes", "1000", "--pipelined",
         "--set", "features.0.mapping.buckets=2000000", "--set", "name=wide",
         "--a-root", "/tmp/old-checkout", "--b-first", "--item-writes", "10", "--force"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert seen["item_writes"] == 10.0
    assert seen["args"][-6:] == (
        0.25, 1000.0, True, {"features.0.mapping.buckets": 2000000, "name": "wide"},
        (Path("/tmp/old-checkout"), None), True,
    )  # fmt: skip
    assert envs == ({"CTR_X": "1", "CTR_Y": "a=b"}, {"CTR_X": "2"}) and ports == (9000, 9001)
    assert json.loads((tmp_path / "bench_pair.json").read_text()) == {"figures": 1}
    assert (tmp_path / "bench_pair.md").read_text().startswith("table for ctr bench-pair")
    for bad, says in [
        (["--a", "CTR_X"], "expected KEY=VALUE"),
        (["--rounds", "0"], "must be above 0"),
        (["--seconds", "x"], "not a number"),
        (["--writes", "1.5"], "a share is at most 1"),
        (["--writes", "-0.1"], "must be 0 or more"),
        (["--other-writes", "-5"], "must be 0 or more"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(["bench-pair", *bad])
        assert says in capsys.readouterr().err


# ---- a CLI review (session 36): every wrong input one line, every interruption too ------


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        (["name.x=1"], "override 'name.x': name is a str, not a mapping or a list"),
        (["train.epochs.x=1"], "train.epochs is a int"),
        (["name"], "--set 'name': expected KEY=VALUE"),
        (["=3"], "--set '=3': expected KEY=VALUE"),
        # a model's name is a folder of the store: no path, not empty
        (["name=../escaped"], "name: String should match pattern"),
        (['name=""'], "name: String should match pattern"),
    ],
)
def test_bad_overrides_are_one_line(sets: list[str], said: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    line = one_line_error(ctr("train", "--config", "configs/synthetic_din.yaml", *args), "train")
    assert said in line, line


def test_an_empty_config_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    out = ctr("train", "--config", str(tmp_path / "empty.yaml"), "--set", "train.epochs=1")
    assert "holds no mapping of settings (it is empty)" in one_line_error(out, "train")


def test_ctr_traceback_is_a_boolean() -> None:
    """``CTR_TRACEBACK=0`` turned the traceback on (any non-empty value did)."""
    out = ctr("train", "--config", "configs/nope.yaml", CTR_TRACEBACK="0")
    one_line_error(out, "train")


def test_an_interrupted_command_says_what_it_left(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C was a KeyboardInterrupt traceback; a half-done ``ctr load`` said nothing
    of the Redis it left part-written. One line and exit status 130 (128 + SIGINT)."""
    import ctr.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.delenv("CTR_TRACEBACK", raising=False)
    monkeypatch.setattr(cli, "cmd_load", interrupted)
    assert cli.main(["load", "--config", "configs/synthetic_din.yaml"]) == 130
    err = capsys.readouterr().err
    # stopped before the load began (its data still being read): nothing was written
    # (it said Redis held part of the load: review, session 40)
    assert err.startswith("ctr load: interrupted; nothing was written to Redis") and (
        "Traceback" not in err
    )


def test_an_interrupt_says_what_is_true_of_the_command_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CLI review: Ctrl-C in ``ctr bench``'s load said ``ctr load``'s "so --once loads
    again" (bench has no --once); Ctrl-C in ``ctr train`` before training began said the
    folder held no finished run, where it still held the one before."""
    import ctr.cli as cli
    import training.train as tt

    monkeypatch.delenv("CTR_TRACEBACK", raising=False)

    def load_cut(args: object) -> int:
        exc = KeyboardInterrupt()
        exc.ctr_left = "(the loader's text for ctr load)"  # type: ignore[attr-defined]
        exc.ctr_load_cut = True  # type: ignore[attr-defined]
        raise exc

    monkeypatch.setattr(cli, "cmd_bench", load_cut)
    assert cli.main(["bench"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("ctr bench: interrupted; its load into Redis was cut short")
    assert "--once" not in err
    monkeypatch.setattr(cli, "cmd_load", load_cut)
    assert cli.main(["load", "--config", "configs/synthetic_din.yaml"]) == 130
    assert "(the loader's text for ctr load)" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    for name in tt.RUN_FILES:  # a finished run, from before
        (run / name).write_text("{}")

    def early(config: object, out: object, progress: bool = True) -> dict:
        raise KeyboardInterrupt  # while the data is read: nothing removed yet

    monkeypatch.setattr(tt, "train", early)
    argv = ["train", "--config", "configs/synthetic_din.yaml", "--out", str(run)]
    assert cli.main(argv) == 130
    assert "still holds the finished run it held before" in capsys.readouterr().err
    (run / "config.json").unlink()  # as train() does once training begins
    assert cli.main(argv) == 130
    assert "holds no finished run: train it again" in capsys.readouterr().err


def test_export_names_the_file_at_fault(tmp_path: Path) -> None:
    """A CLI review: a mapping without the config's tables was blamed on checkpoint.pt;
    a file given as the run was "no such file or folder"; an empty --name published
    under the config's name, silently."""
    import training.train as tt
    from tests.helpers import small_config

    run = tmp_path / "run"
    tt.train(small_config("base"), run, progress=False)
    (run / "mapping.json").write_text("{}")
    out = ctr("export", "--run", str(run), "--models-dir", str(tmp_path / "models"))
    assert "mapping.json does not load with this run's other files" in one_line_error(
        out, "export"
    )
    out = ctr("export", "--run", str(run / "config.json"))
    assert "a file, not a run folder" in one_line_error(out, "export")
    out = ctr("export", "--run", str(run), "--name", "", "--models-dir", str(tmp_path / "m"))
    assert "--name: empty" in one_line_error(out, "export")
    assert not (tmp_path / "m").exists()


def test_a_load_stopped_part_way_says_so_and_leaves_no_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped once it has begun writing: the line says Redis holds part of the load,
    its record is cleared (``--once`` loads again), and its ``ctr:loading`` token is
    deleted (README's key schema; it stayed until the next load: review, session 40)."""
    import redis

    import ctr.cli as cli
    import service.loader as loader

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    calls = 0
    real = loader._replace_users

    def stopped(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the first chunk of users is written
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.delenv("CTR_TRACEBACK", raising=False)
    monkeypatch.setattr(loader, "_replace_users", stopped)
    argv = ["load", "--config", "configs/synthetic_din.yaml", "--redis-url", REDIS_URL,
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("ctr load: interrupted; Redis holds part of this load"), err
    assert calls == 2 and client.dbsize() > 0  # part of it written
    assert client.get("ctr:loaded") is None and client.get("ctr:loading") is None
    # another load's token (a second load running) is not this one's to delete
    calls = 0
    client.set("ctr:loading", "another")
    monkeypatch.setattr(loader.secrets, "token_hex", lambda n: "mine")

    def second(*args: Any) -> None:
        client.set("ctr:loading", "another")  # the other load started meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_replace_users", second)
    assert cli.main(argv) == 130
    assert client.get("ctr:loading") == b"another"
    capsys.readouterr()
    # stopped while it builds its records (its record deleted, nothing else written)
    monkeypatch.setattr(loader, "_replace_users", real)
    assert cli.main(argv) == 0  # a whole load
    keys = client.dbsize()

    def building(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "user_records", building)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing of this load was written, but its ctr:loaded record was cleared" in err
    assert client.dbsize() == keys - 1 and client.get("ctr:loaded") is None
    # a second Ctrl-C while the first one's clean-up waits on Redis: the line still says
    # what the load left (it fell back to "nothing was written")
    monkeypatch.undo()
    monkeypatch.delenv("CTR_TRACEBACK", raising=False)
    calls = 0
    monkeypatch.setattr(loader, "_replace_users", stopped)
    real_eval = redis.Redis.eval

    def cut(self: Any, script: str, *args: Any) -> Any:
        if script == loader.DROP_TOKEN:
            raise KeyboardInterrupt
        return real_eval(self, script, *args)

    monkeypatch.setattr(redis.Redis, "eval", cut)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("ctr load: interrupted; Redis holds part of this load"), err


def test_a_load_into_a_database_that_is_no_number_is_refused_before_it_writes() -> None:
    """``ctr bench``, ``bench-pair``, ``soak`` and ``bench-path`` load through
    ``load_into_redis`` without ``ping``: redis-py took ``/1O`` for database 0 and the
    load replaced that database's item hashes (diff review, session 40)."""
    import redis

    from service.loader import load_into_redis
    from tests.helpers import small_config
    from training.data import load_frame

    config = small_config("din")
    frame = load_frame(config)
    zero = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/0")
    before = zero.dbsize()
    with pytest.raises(ValueError, match=r"redis://:\*\*\*@.*/1O: the database \(the URL's"):
        load_into_redis(config, frame, REDIS_URL.replace("//", "//:pw@").rsplit("/", 1)[0] + "/1O")
    assert zero.dbsize() == before


def test_an_interrupted_training_run_is_not_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted after its first checkpoint, into a folder that held an earlier
    run, left the new weights beside the old config, mapping and metrics: ``ctr export``
    published them as one bundle. The old run's files go when training starts, and a
    folder without all four is refused in one line."""
    import training.train as tt
    from tests.helpers import small_config

    run = tmp_path / "run"
    config = small_config("base")
    tt.train(config, run, progress=False)
    assert all((run / name).is_file() for name in tt.RUN_FILES)
    real_save = tt.torch.save

    def save_then_interrupt(obj: object, path: object) -> None:
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(tt.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tt.train(config.model_copy(update={"train": config.train.model_copy(
            update={"seed": 7})}), run, progress=False)  # fmt: skip
    monkeypatch.undo()
    assert not (run / "metrics.json").exists() and not (run / "config.json").exists()
    with pytest.raises(tt.RunError, match="not a finished training run"):
        tt.load_run(run)
    out = ctr("export", "--run", str(run), "--models-dir", str(tmp_path / "models"))
    assert "not a finished training run" in one_line_error(out, "export")


def test_a_damaged_run_file_is_one_line(tmp_path: Path) -> None:
    import training.train as tt
    from tests.helpers import small_config

    run = tmp_path / "run"
    tt.train(small_config("base"), run, progress=False)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    out = ctr("export", "--run", str(run), "--models-dir", str(tmp_path / "models"))
    line = one_line_error(out, "export")
    assert "checkpoint.pt does not load with this run's other files" in line, line
    # valid JSON that is no object: an AttributeError traceback (review, session 40)
    for text in ("null", "[]"):
        (run / "checkpoint.pt").unlink()
        tt.train(small_config("base"), run, progress=False)
        (run / "metrics.json").write_text(text)
        out = ctr("export", "--run", str(run), "--models-dir", str(tmp_path / "models"))
        line = one_line_error(out, "export")
        assert "metrics.json does not load with this run's other files" in line, line
        assert "a JSON object expected" in line, line


def test_bench_pair_finds_its_port_taken_before_it_loads_redis() -> None:
    """A port in use: a traceback (RuntimeError) once the bundle was built and Redis
    loaded; now one line, status 2, before either (review, session 40)."""
    import redis

    client = redis.Redis.from_url(UNSERVED_REDIS_URL)
    client.flushdb()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = ctr("bench-pair", "--port", str(port), "--redis-url", UNSERVED_REDIS_URL,
                  "--rounds", "2", "--seconds", "0.5")  # fmt: skip
    line = one_line_error(out, "bench-pair")
    assert f"PortInUse: port {port} is in use" in line, line
    assert client.dbsize() == 0  # nothing loaded


@pytest.mark.parametrize("command", ["bench", "bench-path", "bench-pair", "soak"])
def test_a_benchmark_refuses_a_database_holding_other_data(command: str) -> None:
    """The benchmarks load their users and items into --redis-url: pointed at a served
    database they replaced real users' histories and item hashes without a word. A
    database holding keys no benchmark wrote is refused, before anything is built."""
    import redis

    from service.loader import BENCH_KEY, check_bench_db, mark_bench_db

    client = redis.Redis.from_url(UNSERVED_REDIS_URL)
    client.flushdb()
    client.rpush("{u:u5}:seq", '{"item_id": "prod-item"}')
    out = ctr(command, "--redis-url", UNSERVED_REDIS_URL)
    line = one_line_error(out, command)
    assert "holds 1 keys no benchmark wrote" in line and "--force" in line, line
    assert client.lrange("{u:u5}:seq", 0, -1) == [b'{"item_id": "prod-item"}']
    assert client.dbsize() == 1
    check_bench_db(UNSERVED_REDIS_URL, force=True)  # taken with --force
    mark_bench_db(UNSERVED_REDIS_URL)  # as a benchmark's load does: it may load there again
    assert client.exists(BENCH_KEY)
    check_bench_db(UNSERVED_REDIS_URL)
    client.flushdb()
    check_bench_db(UNSERVED_REDIS_URL)  # an empty database is fine
    # a database an older version's benchmark loaded (its bench-* data record, no key)
    client.rpush("{u:u5}:seq", "{}")
    client.set("ctr:loaded:data", '{"name": "bench-din", "source": "synthetic"}')
    check_bench_db(UNSERVED_REDIS_URL)
    client.set("ctr:loaded:data", '{"name": "din", "source": "synthetic"}')
    with pytest.raises(ValueError, match="no benchmark wrote"):
        check_bench_db(UNSERVED_REDIS_URL)
    client.flushdb()


def test_an_export_name_that_is_a_path_is_refused(tmp_path: Path) -> None:
    """``--name ../escaped`` published outside ``--models-dir``."""
    import training.train as tt
    from tests.helpers import small_config

    run = tmp_path / "run"
    tt.train(small_config("base"), run, progress=False)
    store = tmp_path / "store"
    out = ctr("export", "--run", str(run), "--models-dir", str(store), "--name", "../escaped")
    assert "model name '../escaped'" in one_line_error(out, "export")
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["bench-model", "--n", "0"],
        ["bench-model", "--n", "abc"],
        ["bench-model", "--threads", "0"],
        ["bench-model", "--repeats", "0"],
        ["profile-graph", "--runs", "0"],
        ["impressions", "--stream", "s", "--window-s", "-5"],
        ["impressions", "--stream", "s", "--window-s", "nan"],
        ["impressions", "--stream", "s", "--skew-s", "inf"],
        ["results", "--seeds", "0"],
    ],
)
def test_numeric_flags_are_checked_by_argparse(args: list[str]) -> None:
    out = ctr(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"argument {args[-2]}: " in out.stderr, out.stderr


def test_an_unwritable_metrics_folder_is_refused_with_one_worker(tmp_path: Path) -> None:
    """With several workers a folder that is not one crash-looped them; with one, a
    NotADirectoryError at the first metric. Both are one line now."""
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    out = ctr("serve", "--port", str(free_port()), PROMETHEUS_MULTIPROC_DIR=str(a_file))
    assert "is not a folder this process can write" in one_line_error(out, "serve")


def results_refused(tmp_path: Path, datasets: str, models: str, *args: str, **env: str) -> str:
    """The one-line error of a ``ctr results`` run (one seed, a table under ``tmp_path``
    unless ``args`` name others) refused before anything trained (its runs folder never
    made)."""
    runs = tmp_path / "runs"
    out = ctr("results", "--datasets", datasets, "--models", models, "--seeds", "1",
              "--runs", str(runs), "--out", str(tmp_path / "r.md"), *args, **env)  # fmt: skip
    said = one_line_error(out, "results")
    assert not runs.exists()  # nothing trained
    return said


def test_a_report_out_that_cannot_be_written_fails_before_the_run(tmp_path: Path) -> None:
    """``ctr results`` trained every model (hours on real data) and then failed writing
    its table; the folder is made and checked first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    said = results_refused(tmp_path, "synthetic", "din", "--out", str(blocker / "r.md"))
    assert "a-file" in said


def test_ctr_results_checks_every_config_before_it_trains(tmp_path: Path) -> None:
    """A typo in --models (or an override a later dataset refuses) failed after every
    run before it had trained (hours on real data), and no table was written."""
    said = results_refused(tmp_path, "synthetic", "din,dein", "--seeds", "2")
    assert "model.type" in said


def test_ctr_results_checks_every_data_file_before_it_trains(tmp_path: Path) -> None:
    """A category whose files are missing from a folder that is there (Sports beside
    Beauty) failed after the datasets before it had trained."""
    folder = tmp_path / "data" / "amazon-s3rec-sequences"
    folder.mkdir(parents=True)
    (folder / "Beauty.txt").write_text("1 1 2 3\n")
    (folder / "Beauty_item2attributes.json").write_text("{}")
    root = {"CTR_DATA_ROOT": str(tmp_path / "data")}
    said = results_refused(tmp_path, "synthetic,amazon_beauty,amazon_sports", "din", **root)
    assert f"data file not found for amazon_sports ({folder / 'Sports_and_Outdoors.txt'})" in said
    assert "Sports_and_Outdoors_item2attributes.json" in said and "Beauty" not in said
    # a category the adapter does not know is said up front too
    said = results_refused(tmp_path, "synthetic,amazon_beauty", "din", "--set",
                           "data.options.name=Shoes", **root)  # fmt: skip
    assert "amazon data.options.name must be one of" in said


def test_a_results_table_of_one_seed_has_no_spread() -> None:
    """One seed printed ``± 0.0000``, which reads as no spread, not as none measured;
    the header says which standard deviation it is."""
    from training.results import render

    row = {"auc": 0.7, "gauc": 0.6, "logloss": 0.5, "best_epoch": 1, "seconds": 3.0}
    one = render({"synthetic": {"din": [row]}}, "ctr results", {})
    assert "| din | 0.7000 ± n/a |" in one and "sample standard deviation (n - 1)" in one
    two = render({"synthetic": {"din": [row, {**row, "auc": 0.8}]}}, "ctr results", {})
    assert "| din | 0.7500 ± 0.0707 |" in two


# ---- session 38: every count, length and wait of the bench and soak commands is bounded --


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["soak", "--sample", "0"], "must be above 0"),  # scanned /proc in a tight loop
        (["soak", "--sample", "inf"], "must be above 0"),  # never sampled again
        (["soak", "--warmup", "-1"], "must be 0 or more"),
        (["soak", "--max-growth-mb", "-5"], "must be 0 or more"),
        (["soak", "--threads", "-1"], "must be 0 or more"),  # 0: ORT's default
        (["bench", "--seconds", "0"], "must be above 0"),
        (["bench", "--threads", "-2"], "must be 0 or more"),
        (["bench", "--inflight", "0"], "must be above 0"),
        (["bench-path", "--rounds", "0"], "must be above 0"),  # died in StatisticsError
        (["bench-path", "--reps", "0"], "must be above 0"),
        (["bench-model", "--ablation", "-1"], "must be 0 or more"),
        (["profile-graph", "--model", "m", "--top", "0"], "must be above 0"),
        (["bench-pair", "--threads", "-1"], "must be 0 or more"),
        (["profile-graph", "--model", "m", "--threads", "-1"], "must be 0 or more"),
        (["bench-pair", "--seconds", "nan"], "must be above 0"),
    ],
)
def test_bench_and_soak_numbers_are_bounded(argv: list[str], says: str, capsys) -> None:
    from ctr.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert says in capsys.readouterr().err
    # the bound's own edge is accepted
    ok = {"0": "1", "-1": "0", "-5": "0", "-2": "0", "inf": "1", "nan": "1"}
    build_parser().parse_args([*argv[:-1], ok[argv[-1]]])


# ---- session 38 (fault review): a metrics folder without room is refused at start --------


def test_a_metrics_folder_without_room_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full file system each worker died of SIGBUS as it counted its first request
    (prometheus_client maps its files) and uvicorn started it again, for good: 146
    'Child process died' lines and nothing naming why. ``ctr serve`` checks the room
    first, and workers have Python's fault handler on."""
    from ctr import cmd_serve

    cmd_serve.check_metrics_space(str(tmp_path), 2)  # a real folder with room: nothing said
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 16, 4096  # 64 KB free

    monkeypatch.setattr(os, "statvfs", lambda p: Full() if p == str(tmp_path) else real(p))
    with pytest.raises(ValueError, match=r"has 0\.1 MB free, under the 24 MB 2 worker"):
        cmd_serve.check_metrics_space(str(tmp_path), 2)


def _serving(metrics: Path, models: Path, **popen: Any) -> subprocess.Popen:
    """``ctr serve`` (one worker, ``PROMETHEUS_MULTIPROC_DIR=metrics``, the model store
    ``models``, which may hold no model) started with ``popen``'s options, returned once
    ``/healthz`` answers; killed, and the test failed, where it exits or never answers."""
    import httpx

    port = free_port()
    # the tests' Redis (not 6379/0, the default, which other tests check stays untouched)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": str(metrics),
           "CTR_MODELS_DIR": str(models), "CTR_REDIS_URL": REDIS_URL}  # fmt: skip
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    for _ in range(300):
        if proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate(timeout=30)
    pytest.fail(f"ctr serve never answered (exit {proc.returncode}): {out[1]!s:.2000}")


def test_ctr_serve_refuses_a_full_metrics_tmpfs(tmp_path: Path) -> None:
    """The same through ``ctr serve`` on a real 256 KB tmpfs (skipped where this process
    may not mount one)."""
    folder = tmp_path / "prom"
    with tmpfs(folder, "256k"):
        out = ctr("serve", "--workers", "2", "--port", str(free_port()),
                  PROMETHEUS_MULTIPROC_DIR=str(folder), CTR_MODELS_DIR=str(tmp_path))  # fmt: skip
        said = one_line_error(out, "serve")
        assert f"PROMETHEUS_MULTIPROC_DIR='{folder}' has 0.2 MB free" in said
    # filled by the metric files of dead workers (what a SIGBUS crash loop leaves): wiped
    # before the room is judged, then the service starts (no model: /healthz answers)
    with tmpfs(folder, "20m"):
        dead = subprocess.Popen(["true"])
        dead.wait()
        for k in range(12):
            (folder / f"counter_{dead.pid}{k:02d}.db").write_bytes(b"\0" * (1 << 20))
        (folder / f"histogram_{dead.pid}.db").write_bytes(b"\0" * (1 << 20))
        proc = _serving(folder, tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert not list(folder.glob(f"*_{dead.pid}*.db"))
            # a worker dying of SIGBUS says so (one worker: this process itself)
            proc.send_signal(signal.SIGBUS)
            err = proc.communicate(timeout=30)[1]
            assert "Fatal Python error: Bus error" in err, err[-2000:]
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.communicate(timeout=30)


def test_ctr_serve_starts_with_its_stderr_closed(tmp_path: Path) -> None:
    """The fault handler turned on for a one-worker serve raised where the process had
    no stderr (``2>&-``, some supervisors): the service could not start, and said
    nothing (own-diff review, session 38)."""
    folder = tmp_path / "prom"
    folder.mkdir()
    proc = _serving(folder, tmp_path, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
    proc.terminate()
    proc.wait(timeout=30)


def test_ctr_serve_lifts_the_soft_open_files_limit(tmp_path: Path) -> None:
    """Started under a soft limit of 256 open files, ``ctr serve`` runs with the hard
    limit: each connection holds a descriptor (up to CTR_READ_TIMEOUT_MS before its
    first byte), and at a soft limit of 1024 a thousand idle connections kept every
    other client out (a security review, session 47)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-files limit is {hard}: nothing to lift")
    folder = tmp_path / "prom"
    folder.mkdir()

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = _serving(folder, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    preexec_fn=low)  # fmt: skip
    try:
        soft = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert soft > 256 and (soft == hard or hard == resource.RLIM_INFINITY), (soft, hard)


def test_ctr_load_replays_a_time_split_only() -> None:
    """``--replay-split`` on a random split is refused before anything is read or
    written (its examples have no time order to replay them in); on a time split the
    load runs (what it stores: tests/test_loader.py)."""
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", REDIS_URL,
              "--set", "data.split=random", "--replay-split", "test")  # fmt: skip
    assert "--replay-split needs a time split" in one_line_error(out, "load")
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", REDIS_URL,
              "--replay-split", "test", "--once")  # fmt: skip
    assert "a replay starts from a fresh load" in one_line_error(out, "load")
    out = ctr("load", "--config", "configs/synthetic_din.yaml", "--redis-url", REDIS_URL,
              "--set", "data.options.n_users=30", "--replay-split", "test", "--quiet")  # fmt: skip
    assert out.returncode == 0 and "loaded 30 users" in out.stdout, out.stderr


@pytest.mark.parametrize(
    ("start", "ceiling", "want"),
    [
        ((256, "inf"), 10240, 10240),  # macOS: unlimited hard, EINVAL past maxfilesperproc
        ((256, "inf"), 1 << 20, 1 << 20),
        ((1024, 524288), 1 << 20, 524288),  # Linux: the hard limit
        ((1024, 524288), 100_000, 65536),  # a kernel refusing the hard one: the next
        ((20000, "inf"), 10240, 20000),  # never lowered
        (("inf", "inf"), 10240, "inf"),
    ],
)
def test_raise_fd_limit_takes_what_the_kernel_allows(
    monkeypatch: pytest.MonkeyPatch, start: tuple[Any, Any], ceiling: int, want: Any
) -> None:
    """Where the kernel refuses the hard limit (macOS refuses a soft limit above
    kern.maxfilesperproc, 10240 by default, with EINVAL, and its hard limit is unlimited)
    the soft limit is still lifted, to the most it takes; it was left at 256."""
    import resource

    from ctr.cmd_serve import raise_fd_limit

    inf = resource.RLIM_INFINITY
    limits = [inf if v == "inf" else v for v in start]

    def setrlimit(which: int, new: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and new[1] == limits[1]
        if new[0] > ceiling:
            raise ValueError("current limit exceeds maximum limit")
        limits[0] = new[0]

    monkeypatch.setattr(resource, "getrlimit", lambda which: tuple(limits))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    raise_fd_limit()
    assert limits[0] == (inf if want == "inf" else want)
