"""Checks for scripts/stack_smoke.sh (standard library only; talks to 127.0.0.1 only).

    python scripts/stack_smoke_check.py mirror
    python scripts/stack_smoke_check.py free-port 18000
    python scripts/stack_smoke_check.py inside --docker DOCKER --container ID
    python scripts/stack_smoke_check.py host-api --api http://127.0.0.1:18000
    python scripts/stack_smoke_check.py ops-image --docker DOCKER --image IMAGE \
        --levels x86-64-v4,x86-64-v3,x86-64-v2 --expect x86-64-v4
    python scripts/stack_smoke_check.py fused-model --docker DOCKER --container ID \
        --api http://127.0.0.1:18001 --name bench-dien --level x86-64-v4
    python scripts/stack_smoke_check.py prometheus-up --prom http://127.0.0.1:19090 --port 18000
    python scripts/stack_smoke_check.py dashboard --prom URL --dashboard deploy/grafana/...json
    python scripts/stack_smoke_check.py locust-out --out DIR
    python scripts/stack_smoke_check.py report --out DIR

Each prints ``ok: ...`` lines and exits 1 with ``FAIL: ...`` on the first failed check.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class CheckError(Exception):
    pass


def ok(message: str) -> None:
    print(f"ok: {message}", flush=True)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


# ------------------------------------------------------------------ host helpers


def _apt_entries() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled deb entry in the machine's apt sources."""
    entries: list[tuple[str, list[str]]] = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()  # drop [opts]
            if len(line) >= 3 and line[0] == "deb":
                entries.append((line[1], [line[2]]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
    return entries


def mirror(suite: str = "bookworm") -> tuple[str, str]:
    """The Debian mirror (and security mirror) that this machine's apt uses for ``suite``.
    Without one, set STACK_DEBIAN_MIRROR."""
    main = security = ""
    for uri, suites in _apt_entries():
        uri = uri.rstrip("/")
        if not main and suite in suites:
            main = uri
        if not security and f"{suite}-security" in suites:
            security = uri
    if not main:
        raise SystemExit(f"no apt source for {suite}: set STACK_DEBIAN_MIRROR")
    return main, security or main + "-security"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ HTTP


def http(method: str, url: str, body: object | None = None, timeout: float = 10.0):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    host = urllib.parse.urlsplit(url).hostname
    require(host in ("127.0.0.1", "localhost"), f"refusing to send traffic to {host}")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# ------------------------------------------------------------------ API inside the container

INSIDE = r"""
import json, os, sys, urllib.request, urllib.error
port = os.environ.get("CTR_PORT", "8000")
def call(path, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    req = urllib.request.Request("http://127.0.0.1:%s%s" % (port, path),
                                 data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
req = json.loads(sys.argv[1])
key = os.environ.get("CTR_API_KEY") or None
out = {"score": call("/v1/score", req["score"]),
       "event": call("/v1/events", req["event"], key),
       "again": call("/v1/events", req["event"], key),
       "models": None}
with urllib.request.urlopen("http://127.0.0.1:%s/v1/models" % port, timeout=10) as r:
    out["models"] = json.loads(r.read())
print(json.dumps(out))
"""


def check_inside(docker: str, container: str, top_k: int = 10) -> None:
    """Score and post an event from inside the API container (its own Python, its own
    loopback), then check the answers."""
    candidates = [f"i{i}" for i in range(0, 100, 2)]
    payload = {
        "score": {
            "user_id": "u1",
            "candidates": [{"item_id": c} for c in candidates],
            "context": {"hour": 13},
            "top_k": top_k,
            "explain": True,
        },
        "event": {
            "user_id": "u1",
            "event_id": f"stack-smoke-{uuid.uuid4().hex}",
            "item_id": "i2",
            "type": "click",
            "timestamp": time.time(),
        },
    }
    done = subprocess.run(
        [docker, "exec", container, "python", "-c", INSIDE, json.dumps(payload)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    require(done.returncode == 0, f"docker exec failed: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])

    status, body = out["score"]
    require(status == 200, f"/v1/score from inside the container: HTTP {status} {body}")
    items = body["items"]
    require(len(items) == top_k, f"expected top_k={top_k} items, got {len(items)}")
    require([i["rank"] for i in items] == list(range(1, top_k + 1)), "ranks are not 1..k")
    probs = [i["probability"] for i in items]
    require(all(0.0 < p < 1.0 for p in probs), f"probabilities out of (0, 1): {probs}")
    require(probs == sorted(probs, reverse=True), f"items not ranked by probability: {probs}")
    require({i["item_id"] for i in items} <= set(candidates), "unknown item IDs in the answer")
    require(len({round(p, 9) for p in probs}) > 1, "every candidate got the same score")
    require(not body["degraded"], "degraded response (Redis unreachable from the API?)")
    require(not body["cold_start"], "u1 is a cold start: the init job did not load Redis")
    require(all(i.get("attention") for i in items), "explain=true returned no attention")
    require(body["model"]["name"] == "din", f"model {body['model']}")
    ok(
        f"/v1/score inside the container: {top_k} of {len(candidates)} ranked, "
        f"p = {probs[0]:.4f} .. {probs[-1]:.4f}, model {body['model']['name']} "
        f"v{body['model']['version']}"
    )

    status, body = out["event"]
    require(status == 202, f"/v1/events: HTTP {status} {body}")
    require(body == {"appended": True, "duplicate": False}, f"/v1/events answered {body}")
    status, body = out["again"]
    require(status == 202 and body == {"appended": False, "duplicate": True},
            f"replayed event not deduplicated: HTTP {status} {body}")  # fmt: skip
    ok("/v1/events accepted (202, appended) and idempotent on replay")
    ok(f"/v1/models: {json.dumps(out['models'])[:200]}")


def check_host_api(api: str) -> None:
    """The same API from the host (where the load test connects), plus requests the
    service must refuse, so the error panels of the dashboard have series."""
    status, body = http("GET", f"{api}/readyz")
    require(status == 200, f"{api}/readyz: HTTP {status} {body}")
    status, body = http(
        "POST", f"{api}/v1/score", {"user_id": "u3", "candidates": [{"item_id": "i1"}]}
    )
    require(status == 200 and len(body["items"]) == 1, f"/v1/score from the host: {status}")
    bad = [
        {"user_id": "u3", "candidates": []},
        {"user_id": "u3", "candidates": [{"item_id": "i1"}], "top_k": 0},
        {"candidates": [{"item_id": "i1"}]},
    ]
    for request in bad:
        status, body = http("POST", f"{api}/v1/score", request)
        require(400 <= status < 500, f"bad request {request} answered HTTP {status}")
    ok(f"host -> {api}: ready, scores, refuses {len(bad)} bad requests with 4xx")


# ------------------------------------------------------------------ custom-op library

OPS_PROBE = r"""
import json, os, shutil
from ctr import native
folder = os.environ["CTR_OPS_LIBRARY"]
lib = native.library(folder)
compilers = [c for c in ("g++", "gcc", "c++", "cc", "clang") if shutil.which(c)]
print(json.dumps({"folder": folder, "present": sorted(os.listdir(folder)), "level": lib.level,
                  "path": str(lib.path), "cuda": lib.cuda, "compilers": compilers}))
"""


def check_ops_image(docker: str, image: str, levels: list[str], expect: str) -> None:
    """The runtime image's prebuilt custom-op folder (CTR_OPS_LIBRARY) holds ``levels``,
    and ``ctr.native.library`` there chooses ``expect`` (the highest level this CPU has
    the flags for) and self-tests it; the image has no compiler."""
    done = subprocess.run(
        [docker, "run", "--rm", "--network", "none", "--entrypoint", "python", image,
         "-c", OPS_PROBE],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    require(done.returncode == 0, f"ctr.native.library in {image}: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    require(out["folder"] == "/opt/ctr-ops", f"CTR_OPS_LIBRARY={out['folder']}")
    require(out["present"] == sorted(levels), f"{out['folder']} holds {out['present']}")
    require(out["level"] == expect, f"level {out['level']} chosen, expected {expect}")
    require(out["path"] == f"/opt/ctr-ops/{expect}/libctr_ops.so", f"chose {out['path']}")
    require(not out["compilers"], f"{image} has a compiler: {out['compilers']}")
    ok(
        f"prebuilt custom-op library in {image}: {', '.join(levels)}; level {expect} "
        f"chosen for this CPU and self-tested ({out['path']}, cuda kernel {out['cuda']}); "
        "no compiler in the image"
    )


def check_fused_model(
    docker: str, container: str, api: str, name: str, level: str, timeout: float
) -> None:
    """A DIEN bundle served by the runtime image: /v1/models says graph "fused" (the
    image's library at ``level`` passed the service's parity check), and the log says
    which level was chosen."""
    deadline = time.monotonic() + timeout
    status, body = 0, None
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{api}/v1/models", timeout=5)
        except OSError:  # not listening yet
            status = 0
        if status == 200:
            break
        state = subprocess.run(
            [docker, "inspect", "-f", "{{.State.Status}}", container],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.strip()  # fmt: skip
        require(state == "running", f"the {name} container stopped: {state}")
        time.sleep(1)
    require(status == 200, f"{api}/v1/models: no answer in {timeout:.0f}s (HTTP {status})")
    assert isinstance(body, dict)
    require(body["name"] == name, f"serving {body['name']}, not {name}")
    require(body["graph"] == "fused", f"graph {body['graph']!r}: {body['graph_note']}")
    require(body["graph_note"] is None, f"graph_note {body['graph_note']!r}")
    want_ops = ["ctr_ops.AttentionalGRU", "ctr_ops.DinAttention"]  # AUGRU and attention unit
    require(body.get("graph_ops") == want_ops, f"graph_ops {body.get('graph_ops')!r}")
    logs = subprocess.run(
        [docker, "logs", container], capture_output=True, text=True, timeout=30, check=False
    )
    text = logs.stdout + logs.stderr
    lib = f"/opt/ctr-ops/{level}/libctr_ops.so"
    require(f"custom-op library: level {level} chosen ({lib})" in text,
            f"the log does not say level {level} was chosen")  # fmt: skip
    require(f"fused graph kept ({lib} (level {level}))" in text, "no 'fused graph kept' line")
    ok(
        f"{name} (DIEN) served from the runtime image: /v1/models graph fused, "
        f"{body['provider']}, ops {', '.join(want_ops)}, library {lib} (level {level})"
    )


# ------------------------------------------------------------------ Prometheus


def prom_query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http("GET", url)
    require(status == 200 and isinstance(body, dict), f"query {expr!r}: HTTP {status} {body}")
    require(body.get("status") == "success", f"query {expr!r}: {body}")
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def check_prometheus_up(prom: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = prom_query(prom, 'up{job="api"}')
            last = result
            if result and all(float(r["value"][1]) == 1 for r in result):
                break
        except (CheckError, OSError) as exc:
            last = exc
        time.sleep(2)
    else:
        raise CheckError(f'up{{job="api"}} != 1 after {timeout:.0f}s: {last}')
    status, body = http("GET", f"{prom}/api/v1/targets?state=active")
    targets = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "api"]
    require(len(targets) == 1, f"expected one api target, got {targets}")
    target = targets[0]
    require(target["health"] == "up", f"api target {target}")
    require(target["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics", target["scrapeUrl"])
    ok(f'Prometheus scrapes {target["scrapeUrl"]}: up{{job="api"}} == 1')
    check_alert_rules(prom, max(deadline, time.monotonic() + 40))  # rules: every 15 s


def check_alert_rules(prom: str, deadline: float) -> None:
    """Prometheus loaded deploy/prometheus/alerts.yml (its every rule) and evaluates
    each without an error (health "ok" once evaluated: a PromQL the server refuses
    stays "err")."""
    rules: list[dict] = []
    while True:
        status, body = http("GET", f"{prom}/api/v1/rules?type=alert")
        require(status == 200 and body.get("status") == "success", f"/api/v1/rules: {body}")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        bad = [r for r in rules if r.get("health") == "err"]
        require(not bad, f"alert rules failing: {[(r['name'], r.get('lastError')) for r in bad]}")
        if rules and all(r.get("health") == "ok" for r in rules):
            break
        if time.monotonic() > deadline:
            health = [(r["name"], r.get("health")) for r in rules]
            raise CheckError(f"alert rules not all evaluated: {health}")
        time.sleep(2)
    ok(f"Prometheus evaluates {len(rules)} alert rules: " + ", ".join(r["name"] for r in rules))


# ------------------------------------------------------------------ Grafana dashboard

RANGE_VARS = ("__rate_interval", "__interval", "__range", "__range_s", "__interval_ms")


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, variables substituted."""
    dash = json.loads(path.read_text())
    values: dict[str, str] = {name: "1m" for name in RANGE_VARS}
    values["__range_s"], values["__interval_ms"] = "60", "60000"
    for var in dash.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = "|".join(current) if current else None
        if current in (None, "", "$__all", "All"):
            current = var.get("allValue") or ".*"
        values[var["name"]] = str(current)
    queries = []
    for panel in _panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace("${" + name + "}", value).replace("[[" + name + "]]", value)
                expr = re.sub(r"\$" + re.escape(name) + r"\b", value, expr)
            require("$" not in expr, f"unsubstituted variable in {expr!r}")
            queries.append((panel.get("title", "?"), expr))
    return queries


def check_dashboard(prom: str, path: Path, timeout: float) -> None:
    queries = dashboard_queries(path)
    require(len(queries) > 0, f"no queries in {path}")
    dash = json.loads(path.read_text())
    for var in dash.get("templating", {}).get("list", []):
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var.get("definition", ""))
        if match:
            metric, label = match.groups()
            url = f"{prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": metric}
            )
            status, body = http("GET", url)
            require(status == 200 and body["data"], f"variable ${var['name']}: {body}")
            ok(f"variable ${var['name']} = label_values({metric}, {label}) -> {body['data']}")
    pending = list(queries)
    deadline = time.monotonic() + timeout
    while True:
        failed = []
        for title, expr in pending:
            result = prom_query(prom, expr)
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            if not finite:
                failed.append((title, expr, result))
        if not failed or time.monotonic() > deadline:
            break
        pending = [(t, e) for t, e, _ in failed]
        time.sleep(3)
    for title, expr, result in failed:
        print(f"FAIL: panel {title!r}: {expr} -> {result}", flush=True)
    require(not failed, f"{len(failed)} of {len(queries)} dashboard queries returned no data")
    ok(f"all {len(queries)} PromQL queries of {path.name} return finite data")


# ------------------------------------------------------------------ load test report


def check_locust_out(out: Path) -> None:
    """What the compose `loadtest` profile's locust container wrote into ``out`` (its
    --csv, --html and --json-file): every file there, requests made, zero failures."""
    paths = {
        "stats": out / "locust_stats.csv",
        "history": out / "locust_stats_history.csv",
        "failures": out / "locust_failures.csv",
        "html": out / "locust_report.html",
        "json": out / "locust_final.json",
    }
    for name, path in paths.items():
        require(path.is_file() and path.stat().st_size > 0, f"locust wrote no {name}: {path}")
    with paths["stats"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    agg = [r for r in rows if r.get("Name") == "Aggregated"]
    require(len(agg) == 1, f"no Aggregated row in {paths['stats']}")
    csv_requests, csv_failures = int(agg[0]["Request Count"]), int(agg[0]["Failure Count"])
    require(csv_requests > 0, "the locust container made no requests")
    require(csv_failures == 0, f"{csv_failures} of {csv_requests} requests failed (stats CSV)")
    with paths["failures"].open(newline="") as f:
        failed = list(csv.DictReader(f))
    require(not failed, f"locust_failures.csv lists failures: {failed[:3]}")
    entries = json.loads(paths["json"].read_text())
    requests = sum(int(e["num_requests"]) for e in entries)
    failures = sum(int(e["num_failures"]) for e in entries)
    require(requests > 0, "locust_final.json counts no requests")
    require(failures == 0, f"{failures} of {requests} requests failed (locust_final.json)")
    names = {e["name"] for e in entries}
    require("/v1/events" in names and any(n.startswith("/v1/score [N=") for n in names),
            f"locust_final.json lacks a route: {sorted(names)}")  # fmt: skip
    html = paths["html"].read_text(errors="replace")
    require("<html" in html.lower(), f"{paths['html']} is not an HTML report")
    ok(
        f"locust container: {requests} requests, 0 failures (JSON; CSV {csv_requests}), "
        f"{len(names)} routes; wrote {', '.join(p.name for p in paths.values())}"
    )


def check_report(out: Path) -> None:
    report = out / "report.md"
    require(report.is_file(), f"no load test report at {report}")
    text = report.read_text()
    match = re.search(r"- requests: (\d+), failures: (\d+)", text)
    require(match is not None, f"no totals in {report}")
    requests, failures = int(match.group(1)), int(match.group(2))
    require(requests > 0, "the load test made no requests")
    require(failures == 0, f"{failures} of {requests} load-test requests failed")
    require("/v1/events" in text and "/v1/score [N=" in text, "report lacks a route")
    latency = re.search(r"- latency: (.*)", text)
    ok(f"load test: {requests} requests, 0 failures, {latency.group(1) if latency else ''}")
    ok(f"report: {report}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("mirror")
    fp = sub.add_parser("free-port")
    fp.add_argument("preferred", type=int)
    ins = sub.add_parser("inside")
    ins.add_argument("--docker", required=True)
    ins.add_argument("--container", required=True)
    br = sub.add_parser("host-api")
    br.add_argument("--api", required=True)
    oi = sub.add_parser("ops-image")
    oi.add_argument("--docker", required=True)
    oi.add_argument("--image", required=True)
    oi.add_argument("--levels", required=True, help="comma list the image must hold")
    oi.add_argument("--expect", required=True, help="the level it must choose here")
    fm = sub.add_parser("fused-model")
    fm.add_argument("--docker", required=True)
    fm.add_argument("--container", required=True)
    fm.add_argument("--api", required=True)
    fm.add_argument("--name", required=True)
    fm.add_argument("--level", required=True)
    fm.add_argument("--timeout", type=float, default=120)
    pu = sub.add_parser("prometheus-up")
    pu.add_argument("--prom", required=True)
    pu.add_argument("--port", type=int, required=True)
    pu.add_argument("--timeout", type=float, default=60)
    db = sub.add_parser("dashboard")
    db.add_argument("--prom", required=True)
    db.add_argument("--dashboard", type=Path, required=True)
    db.add_argument("--timeout", type=float, default=30)
    lo = sub.add_parser("locust-out")
    lo.add_argument("--out", type=Path, required=True)
    rp = sub.add_parser("report")
    rp.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "mirror":
            print(*mirror())
        elif args.cmd == "free-port":
            print(free_port(args.preferred))
        elif args.cmd == "inside":
            check_inside(args.docker, args.container)
        elif args.cmd == "host-api":
            check_host_api(args.api)
        elif args.cmd == "ops-image":
            check_ops_image(args.docker, args.image, args.levels.split(","), args.expect)
        elif args.cmd == "fused-model":
            check_fused_model(args.docker, args.container, args.api, args.name, args.level,
                              args.timeout)  # fmt: skip
        elif args.cmd == "prometheus-up":
            check_prometheus_up(args.prom, args.port, args.timeout)
        elif args.cmd == "dashboard":
            check_dashboard(args.prom, args.dashboard, args.timeout)
        elif args.cmd == "locust-out":
            check_locust_out(args.out)
        elif args.cmd == "report":
            check_report(args.out)
    except (CheckError, OSError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
        print(f"FAIL: {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
