"""The hot path's shortcuts behave exactly like the general code they skip:

* ``POST /v1/score`` served straight from ASGI at the app's front door (``ScoringApp``)
  answers what the FastAPI route answers, for good and bad requests and for a bug alike;
* the C-level check of plain candidate lists (``_plain_ids``) accepts exactly what the
  per-candidate check accepts, and hands everything else to it;
* the lifespan sets the GIL switch interval and puts Python's back on shutdown."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

import service.serving as serving
from service import metrics as m
from service.app import create_app
from service.errors import BadRequest
from service.validate import _checked_candidates, _plain_ids, parse_score
from tests.helpers import Built, build_and_load, settings_for
from training.bench_path import fast_path_in_stack as in_stack
from training.bench_path import without_fast_path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("fast"), "din")


@pytest.fixture(scope="module")
def clients(built: Built) -> Iterator[tuple[TestClient, TestClient]]:
    settings = settings_for(built, api_key="k", protect_scoring=True, max_body_bytes=20_000)
    fast = create_app(settings)
    assert ("POST", "/v1/score") in fast.fast_routes
    slow = without_fast_path(create_app(settings))
    with TestClient(fast) as a, TestClient(slow) as b:
        yield a, b


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


def requests(built: Built) -> list[tuple[dict[str, str], Any]]:
    users = built.frame["user_id"].astype(str).unique()
    items = built.frame["item_id"].astype(str).unique()[:40].tolist()
    key = {"X-API-Key": "k"}
    good = {"user_id": users[0], "candidates": [{"item_id": i} for i in items]}
    return [
        (key, good),
        (key, {**good, "top_k": 5, "explain": True}),
        (key, {"user_id": "nobody", "candidates": [{"item_id": items[0]}, {"item_id": 7}]}),
        (key, {**good, "candidates": [{"item_id": i, "features": {}} for i in items]}),
        ({}, good),  # no key
        ({"X-API-Key": "wrong"}, good),
        (key, {**good, "candidates": [{"item_id": items[0]}, {"item_id": items[0]}]}),
        (key, {**good, "candidates": [{"item_id": ""}]}),
        (key, {**good, "candidates": [{"item_id": "a\x01b"}]}),
        (key, {**good, "candidates": [{"id": "x"}]}),
        (key, {**good, "candidates": []}),
        (key, {**good, "top_k": 0}),
        (key, {"candidates": [{"item_id": "x"}]}),
        (key, b"{not json"),
        (key, b""),
        (key, {**good, "candidates": [{"item_id": f"i{k}" * 50} for k in range(200)]}),  # 413
    ]


def test_fast_path_answers_like_the_fastapi_route(
    built: Built, clients: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow = clients
    served = []
    real = serving._serve

    async def spy(*args: Any) -> int:
        served.append(1)
        return await real(*args)

    monkeypatch.setattr(serving, "_serve", spy)
    statuses = set()
    for headers, body in requests(built):
        kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        a = fast.post("/v1/score", headers=headers, **kw)
        b = slow.post("/v1/score", headers=headers, **kw)
        assert a.status_code == b.status_code, (body, a.text, b.text)
        assert comparable(a.json()) == comparable(b.json()), body
        assert a.headers.get("retry-after") == b.headers.get("retry-after")
        statuses.add(a.status_code)
    assert statuses >= {200, 400, 401, 413, 422}
    assert len(served) == len(requests(built))  # only the fast client took the fast path
    # a body over the limit without Content-Length: the streaming check, both paths
    for c in (fast, slow):
        chunks = iter([b'{"user_id": "' + b"x" * 15_000, b'"}' + b" " * 15_000])
        r = c.post("/v1/score", headers={"X-API-Key": "k"}, content=chunks)
        assert r.status_code == 413 and r.json()["field"] == "body"


def test_a_bug_on_the_front_door_answers_and_is_raised_like_the_route(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in the handler: the same JSON 500 as from the FastAPI
    route (Starlette's error middleware and the app's handler), counted the same, and
    raised on to the server, which logs it, on both paths (and counted once where the
    front door's route is answered inside the stack, whose error middleware sees it
    after)."""
    settings = settings_for(built, native_runner=False)
    body = {"user_id": "u", "candidates": [{"item_id": "i"}]}
    answers = []
    apps = [wrap(create_app(settings)) for wrap in (lambda a: a, without_fast_path, in_stack)]
    for app in apps:
        for raising in (False, True):
            with TestClient(app, raise_server_exceptions=raising) as c:

                def boom(*args: object, **kwargs: object) -> None:
                    raise KeyError("internal detail")

                monkeypatch.setattr(c.app.state.ctr, "require_model", boom)
                before = m.ERRORS.labels("internal")._value.get()
                if raising:
                    with pytest.raises(KeyError, match="internal detail"):
                        c.post("/v1/score", json=body)
                else:
                    r = c.post("/v1/score", json=body)
                    answers.append((r.status_code, comparable(r.json()), r.headers["content-type"]))
                assert m.ERRORS.labels("internal")._value.get() == before + 1
                monkeypatch.undo()
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 500 and answers[0][1]["error"] == "internal"
    assert "KeyError" in answers[0][1]["detail"] and "internal detail" not in str(answers[0])


def test_fast_path_answers_like_the_route_when_not_ready(built: Built) -> None:
    settings = settings_for(built, model_name="no-such-model")
    with (
        TestClient(create_app(settings)) as fast,
        TestClient(without_fast_path(create_app(settings))) as slow,
    ):
        body = {"user_id": "u", "candidates": [{"item_id": "i"}]}
        a, b = fast.post("/v1/score", json=body), slow.post("/v1/score", json=body)
    assert a.status_code == b.status_code == 503
    assert comparable(a.json()) == comparable(b.json())
    assert a.json()["error"] == "model_not_ready"
    assert a.headers["retry-after"] == b.headers["retry-after"] == "1"


def test_repeated_headers_read_the_first_on_both_paths(
    built: Built, clients: tuple[TestClient, TestClient]
) -> None:
    headers = [("X-API-Key", "k"), ("X-API-Key", "wrong")]
    good = requests(built)[0][1]
    for c in clients:
        assert c.post("/v1/score", headers=headers, json=good).status_code == 200


def test_fast_path_is_timed_under_the_route_template(
    built: Built, clients: tuple[TestClient, TestClient]
) -> None:
    fast, _ = clients

    def count(status: str) -> float:
        for line in fast.get("/metrics").text.splitlines():
            if line.startswith("ctr_request_duration_seconds_count{") and (
                'route="/v1/score"' in line and f'status="{status}"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before_ok, before_bad = count("200"), count("401")
    headers, good = requests(built)[0]
    assert fast.post("/v1/score", headers=headers, json=good).status_code == 200
    assert fast.post("/v1/score", json=good).status_code == 401
    assert count("200") == before_ok + 1
    assert count("401") == before_bad + 1
    # other methods on the path still go through FastAPI's router
    r = fast.get("/v1/score")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert (r.json()["error"], r.json()["detail"]) == (
        "method_not_allowed", "GET is not allowed on /v1/score: use POST"
    )


def test_unknown_paths_are_404_and_timed_as_unmatched(
    clients: tuple[TestClient, TestClient],
) -> None:
    """An unknown path gets a 404 in the service's error body (FastAPI's was
    ``{"detail": "Not Found"}``) on both apps (the front door passes it on), timed under
    the route ``unmatched`` (never the path itself: a scanner's paths would each make a
    series), and not counted as a service error."""
    for c in clients:

        def count(method: str, c: TestClient = c) -> float:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith("ctr_request_duration_seconds_count{") and (
                    'route="unmatched"' in line
                    and f'method="{method}"' in line
                    and 'status="404"' in line
                ):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        before = count("GET"), count("POST")
        errors = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "not_found"})
        for method, path in (("GET", "/no/such/path"), ("POST", "/v1/scores")):
            r = c.request(method, path, json={}, headers={"X-Request-ID": "r404"})
            assert r.status_code == 404, r.text
            said = f"no such path: {path} (the API is listed at /docs)"
            assert r.json() == {"error": "not_found", "field": None, "request_id": "r404",
                                "detail": said}  # fmt: skip
        assert (count("GET"), count("POST")) == (before[0] + 1, before[1] + 1)
        assert REGISTRY.get_sample_value("ctr_errors_total", {"kind": "not_found"}) == errors
        assert "/no/such/path" not in c.get("/metrics").text


@pytest.mark.parametrize(
    "cands",
    [
        [{"item_id": "a"}, {"item_id": "b"}],
        [{"item_id": "ünï"}, {"item_id": "中文"}, {"item_id": "a b"}],
        [{"item_id": "x" * 256}],
    ],
)
def test_plain_ids_accepts_what_the_full_check_accepts(cands: list[dict]) -> None:
    ids = _plain_ids(cands, 256)
    assert ids is not None
    assert (ids, [None] * len(ids)) == _checked_candidates(cands, 256)


@pytest.mark.parametrize(
    "cands",
    [
        [{"item_id": "a"}, {"item_id": "a"}],  # duplicate
        [{"item_id": ""}],
        [{"item_id": "x" * 257}],
        [{"item_id": "a\x00"}],
        [{"item_id": "\ud800"}],
        [{"item_id": 5}],  # a valid int ID: the full check converts it
        [{"item_id": "a\u00a0b"}],  # valid, but not printable: the full check decides
        [{"item_id": True}],
        [{"item": "a"}],
        [{"item_id": "a", "features": {"cat": "1"}}],
        [["a"]],
        [{"item_id": None}],
    ],
)
def test_plain_ids_hands_everything_else_to_the_full_check(cands: list[Any]) -> None:
    assert _plain_ids(cands, 256) is None
    obj = {"user_id": "u", "candidates": cands}
    try:
        want = _checked_candidates(cands, 256)
    except BadRequest as exc:
        with pytest.raises(BadRequest) as got:
            parse_score(obj, 100, 256)
        assert (got.value.field, got.value.message) == (exc.field, exc.message)
        assert got.value.field and got.value.field.startswith("candidates[")
    else:
        req = parse_score(obj, 100, 256)
        assert (req.item_ids, req.features) == want


def test_lifespan_sets_the_switch_interval(built: Built) -> None:
    before = m.HOOKS.users
    app = create_app(settings_for(built, switch_interval_ms=0.25))
    with TestClient(app):
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        assert m.HOOKS.users == before + 1
    assert m.HOOKS.users == before


def test_process_hooks_are_shared_and_restored_by_the_last_user() -> None:
    hooks = m.ProcessHooks()
    original = sys.getswitchinterval()
    try:
        hooks.enter(0.001)
        hooks.enter(0.002)  # a second app in the same process
        assert gc.callbacks.count(hooks.gc_timer) == 1
        hooks.exit()  # the first app leaves first: the second's setting stays
        assert sys.getswitchinterval() == pytest.approx(0.002)
        assert hooks.gc_timer in gc.callbacks
        hooks.exit()
        assert sys.getswitchinterval() == pytest.approx(original)
        assert hooks.gc_timer not in gc.callbacks
    finally:
        sys.setswitchinterval(original)
        if hooks.gc_timer in gc.callbacks:
            gc.callbacks.remove(hooks.gc_timer)


def test_gc_pauses_are_noted_in_the_callback_and_observed_on_flush() -> None:
    """The callback never touches prometheus (a collection can start while its own
    thread holds a metric lock); flush() moves the pauses into the histogram."""
    timer = m.GCTimer()

    def count() -> float:
        return sum(
            s.value
            for metric in m.GC_PAUSE.collect()
            for s in metric.samples
            if s.name == "ctr_gc_pause_seconds_count" and s.labels["generation"] == "2"
        )

    gc.callbacks.append(timer)
    try:
        before = count()
        worker = threading.Thread(target=gc.collect)  # any thread may collect
        worker.start()
        worker.join()
        gc.collect()
    finally:
        gc.callbacks.remove(timer)
    full = [seconds for g, seconds in timer.pending if g == 2]  # young ones may join
    assert len(full) == 2 and all(seconds >= 0 for seconds in full)
    assert count() == before  # nothing observed yet
    timer.flush()
    assert count() == before + 2 and not timer.pending
