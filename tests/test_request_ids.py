"""Request IDs end to end (``service.requestid``), on the front door's scoring path and
through FastAPI's stack alike: every answer carries ``X-Request-ID``; the scoring body
and every error body carry the same ID; a client's own plain ID is kept, anything else
replaced; and the service's log lines about a request name it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.logs import TextFormatter
from service.requestid import CURRENT, given
from tests.helpers import Built, build_and_load, settings_for
from tests.redis_proc import free_port
from training.bench_path import fast_path_in_stack, without_fast_path

DRAWN = re.compile("[0-9a-f]{32}")
WRAPS = {"front door": lambda app: app, "stack": without_fast_path, "in stack": fast_path_in_stack}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("rid"), "din")


@pytest.fixture(scope="module", params=list(WRAPS))
def client(request: pytest.FixtureRequest, built: Built) -> Iterator[TestClient]:
    app = WRAPS[request.param](create_app(settings_for(built, api_key="k")))
    with TestClient(app) as c:
        yield c


def body(built: Built, n: int = 5) -> dict[str, Any]:
    items = built.frame["item_id"].astype(str).unique()[:n].tolist()
    user = str(built.frame["user_id"].iloc[0])
    return {"user_id": user, "candidates": [{"item_id": i} for i in items]}


def one_id(r: Any) -> str:
    """The answer's one X-Request-ID header."""
    ids = r.headers.get_list("x-request-id")
    assert len(ids) == 1, ids
    return ids[0]


def test_a_scoring_answer_carries_one_drawn_id_in_header_and_body(
    client: TestClient, built: Built
) -> None:
    a = client.post("/v1/score", json=body(built))
    b = client.post("/v1/score", json=body(built))
    assert a.status_code == b.status_code == 200
    assert one_id(a) == a.json()["request_id"] and DRAWN.fullmatch(one_id(a))
    assert one_id(b) == b.json()["request_id"] != a.json()["request_id"]


@pytest.mark.parametrize(
    "sent",
    [
        "trace-1234:abc",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # W3C traceparent
        "Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8;Sampled=1",
        "x" * 200,
    ],
)
def test_a_client_id_is_kept(client: TestClient, built: Built, sent: str) -> None:
    r = client.post("/v1/score", json=body(built), headers={"X-Request-ID": sent})
    assert r.status_code == 200
    assert one_id(r) == sent and r.json()["request_id"] == sent


@pytest.mark.parametrize(
    "sent", [b"has space", b'q"uote', b"back\\slash", b"x" * 201, b"caf\xc3\xa9", b""]
)
def test_an_unusable_client_id_is_replaced_not_refused(
    client: TestClient, built: Built, sent: bytes
) -> None:
    r = client.post("/v1/score", json=body(built), headers=[(b"X-Request-ID", sent)])
    assert r.status_code == 200
    assert DRAWN.fullmatch(one_id(r)) and r.json()["request_id"] == one_id(r)


def test_the_first_of_repeated_ids_is_kept(client: TestClient, built: Built) -> None:
    headers = [(b"X-Request-ID", b"first"), (b"X-Request-ID", b"second")]
    r = client.post("/v1/score", json=body(built), headers=headers)
    assert one_id(r) == r.json()["request_id"] == "first"


def test_every_error_body_carries_the_id(client: TestClient, built: Built) -> None:
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/v1/score", {"content": b"{not json"}, 400, "malformed_json"),
        ("POST", "/v1/score", {"json": {**body(built), "topk": 3}}, 422, "bad_request"),
        ("POST", "/v1/score", {"content": b"x" * 2_000_000}, 413, "payload_too_large"),
        ("POST", "/v1/events", {"json": {"user_id": "u"}}, 401, "unauthorized"),
        ("POST", "/admin/reload", {"json": {}}, 401, "unauthorized"),
        ("GET", "/no/such/path", {}, 404, "not_found"),  # FastAPI's was {"detail"} only
        ("PUT", "/v1/score", {}, 405, "method_not_allowed"),
    ]
    key = {"X-API-Key": "k"}
    for k, (method, path, kw, status, kind) in enumerate(cases):
        sent = f"err-{k}"
        r = client.request(method, path, headers={"X-Request-ID": sent}, **kw)
        assert (r.status_code, r.json()["error"]) == (status, kind), (path, r.text)
        assert r.json()["request_id"] == one_id(r) == sent
        drawn = client.request(method, path, **kw)  # no ID sent: the drawn one, in both
        assert drawn.json()["request_id"] == one_id(drawn) and DRAWN.fullmatch(one_id(drawn))
    # the events route's 422 and the reload's 409, behind the key
    ev = client.post("/v1/events", json={"user_id": "u"}, headers={**key, "X-Request-ID": "ev"})
    assert ev.status_code == 422 and ev.json()["request_id"] == one_id(ev) == "ev"
    rl = {**key, "X-Request-ID": "rl"}
    re_ = client.post("/admin/reload", json={"version": "999"}, headers=rl)
    assert re_.status_code == 409 and re_.json()["error"] == "reload_failed"
    assert re_.json()["request_id"] == one_id(re_) == "rl"


def test_every_route_answers_with_the_header(client: TestClient) -> None:
    for method, path in [
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/path"),  # FastAPI's own 404
        ("PUT", "/v1/score"),  # and its 405
    ]:
        r = client.request(method, path, headers={"X-Request-ID": f"{method}{path}"})
        assert one_id(r) == f"{method}{path}", (method, path, r.status_code)
        assert DRAWN.fullmatch(one_id(client.request(method, path))), (method, path)


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_degraded_answer_is_logged_with_its_id(
    built: Built, wrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis unreachable: the answer is degraded, and the service's warning about it is a
    record whose ``request_id`` is the request's, shown at the end of its line."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = WRAPS[wrap](create_app(settings_for(built, redis_url=dead, redis_timeout_ms=200)))
    with TestClient(app) as c, caplog.at_level(logging.WARNING, "ctr.service"):
        caplog.clear()
        r = c.post("/v1/score", json=body(built), headers={"X-Request-ID": "deg-1"})
        assert r.status_code == 200 and r.json()["degraded"] is True
        logged = [x for x in caplog.records if "redis fetch failed" in x.getMessage()]
        assert [x.request_id for x in logged] == ["deg-1"]  # type: ignore[attr-defined]
        assert TextFormatter().format(logged[0]).endswith(" request_id=deg-1")
        # a record made outside any request carries None, and its line no ID
        outside = logging.getLogger("ctr.service").makeRecord(
            "ctr.service", logging.WARNING, __file__, 1, "idle", (), None
        )
        assert outside.request_id is None  # type: ignore[attr-defined]
        assert TextFormatter().format(outside) == "WARNING:ctr.service:idle"


def test_an_outage_logs_one_line_per_period(
    built: Built, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down wrote a warning per degraded request (67 lines for 67 requests),
    synchronously on the event loop while the worker was already degraded: one line per
    period now, the next saying how many it held back. Each failure is still counted
    (``ctr_errors_total{kind="redis"}``, ``ctr_degraded_responses_total``)."""
    from prometheus_client import REGISTRY

    dead = f"redis://127.0.0.1:{free_port()}/0"
    now = [1000.0]
    app = create_app(settings_for(built, redis_url=dead, redis_timeout_ms=200))

    def errors() -> float:
        return REGISTRY.get_sample_value("ctr_errors_total", {"kind": "redis"}) or 0.0

    with TestClient(app) as c, caplog.at_level(logging.WARNING, "ctr.service"):
        app.state.ctr.read_failures.clock = lambda: now[0]
        caplog.clear()
        before = errors()
        for k in range(5):
            r = c.post("/v1/score", json=body(built), headers={"X-Request-ID": f"out-{k}"})
            assert r.status_code == 200 and r.json()["degraded"] is True
        now[0] += 10.0  # the period over (the failures go on): logged, with the count
        assert c.post("/v1/score", json=body(built)).json()["degraded"] is True
    logged = [x for x in caplog.records if "redis fetch failed" in x.getMessage()]
    assert [x.request_id for x in logged][:1] == ["out-0"]  # type: ignore[attr-defined]
    assert len(logged) == 2, [x.getMessage() for x in logged]
    assert "(4 more like it not logged in the 10 s since the last line)" in logged[1].getMessage()
    assert "more like it" not in logged[0].getMessage()
    assert errors() == before + 6  # every failure counted


def _loop_busy_after_a_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring reads' connections (``Reader._call``): the event loop runs 80 ms of
    others' work just after the call's first send (the commands', or on a new
    connection its set-up's), its reply arriving meanwhile."""
    import time

    import service.store as store

    real_call = store.Reader._call

    async def busy_after_send(self: Any, conn: Any, commands: Any) -> Any:
        read = conn.read_response

        async def late_read(*a: Any, **k: Any) -> Any:
            conn.__dict__.pop("read_response", None)
            asyncio.get_running_loop().call_soon(time.sleep, 0.08)
            return await read(*a, **k)

        conn.read_response = late_read
        try:
            return await real_call(self, conn, commands)
        finally:
            conn.__dict__.pop("read_response", None)

    monkeypatch.setattr(store.Reader, "_call", busy_after_send)


def test_a_read_whose_timer_came_late_is_given_its_reply(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past what a worker serves, its loop ran other requests' work while a Redis read
    was out: the read's timer came late, its reply possibly in the socket unread, and
    the answer was a 200 without the user's history, counted and logged as a Redis
    failure, Redis idle all along (an overload review: 43 of 65 answers degraded). A
    late loop gives the read a few ms more now, and the reply is read; a Redis that is
    slow while the loop is free still degrades."""
    import time

    from prometheus_client import REGISTRY

    import service.scoring as scoring_mod

    real = scoring_mod.fetch

    async def loop_busy(*a: Any, **k: Any) -> Any:
        time.sleep(0.08)  # the loop runs others' work while the read is out
        return await real(*a, **k)

    async def redis_slow(*a: Any, **k: Any) -> Any:
        await asyncio.sleep(0.2)  # the loop free, the answer late
        return await real(*a, **k)

    def errors(kind: str) -> float:
        return REGISTRY.get_sample_value("ctr_errors_total", {"kind": kind}) or 0.0

    items = built.frame["item_id"].astype(str).unique()[:5].tolist()
    users = built.frame["user_id"].astype(str).unique()[:3].tolist()
    with TestClient(create_app(settings_for(built, redis_timeout_ms=50))) as c:
        before = errors("redis")
        monkeypatch.setattr(scoring_mod, "fetch", loop_busy)
        r = c.post("/v1/score", json={"user_id": users[0],
                                      "candidates": [{"item_id": i} for i in items]})  # fmt: skip
        assert r.status_code == 200 and r.json()["degraded"] is False, r.text
        assert r.json()["cold_start"] is False  # the user's history was read
        assert errors("redis") == before
        monkeypatch.undo()
        # the loop busy just after the read was sent: redis-py's own reply timer (the
        # socket timeout, CTR_REDIS_TIMEOUT_MS too) cut it, which the grace above does
        # not move (a soak review's degraded answer during a reload, Redis idle)
        _loop_busy_after_a_send(monkeypatch)
        r = c.post("/v1/score", json={"user_id": users[2],  # not kept: read
                                      "candidates": [{"item_id": i} for i in items]})  # fmt: skip
        assert r.status_code == 200 and r.json()["degraded"] is False, r.text
        assert r.json()["cold_start"] is False and errors("redis") == before
        monkeypatch.undo()
        monkeypatch.setattr(scoring_mod, "fetch", redis_slow)
        body = {"user_id": users[1], "candidates": [{"item_id": i} for i in items]}
        with caplog.at_level("WARNING", logger="ctr"):
            r = c.post("/v1/score", json=body)
        assert r.status_code == 200 and r.json()["degraded"] is True, r.text
        assert errors("redis") == before + 1
        # the request's own timer: its line says what ran out (it read "TimeoutError: ")
        said = [x.getMessage() for x in caplog.records if "redis fetch failed" in x.getMessage()]
        assert said and "TimeoutError: no reply within CTR_REDIS_TIMEOUT_MS=50" in said[-1]


def test_a_new_connections_set_up_read_late_is_given_its_reply(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No idle connection (none warmed here; a burst past the warm ones, a read that
    timed out, a Redis restart): the read opens one, whose set-up replies (CLIENT
    SETINFO, SELECT) redis-py read under its own timer, which a loop busy just after
    they were sent ran out (diff review, session 45: Redis idle, degraded)."""
    from prometheus_client import REGISTRY

    def errors() -> float:
        return REGISTRY.get_sample_value("ctr_errors_total", {"kind": "redis"}) or 0.0

    items = built.frame["item_id"].astype(str).unique()[:5].tolist()
    users = built.frame["user_id"].astype(str).unique()[3:5].tolist()
    settings = settings_for(built, redis_timeout_ms=50, redis_warm_connections=0)
    with TestClient(create_app(settings)) as c:
        _loop_busy_after_a_send(monkeypatch)  # a new connection's: its set-up's reply
        before = errors()
        for user in users:
            body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
            r = c.post("/v1/score", json=body)
            assert r.status_code == 200 and r.json()["degraded"] is False, r.text
            assert r.json()["cold_start"] is False
        assert errors() == before


def test_a_stalled_redis_under_load_degrades_every_answer(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stalled with many reads out: their timers fire together, on time, and each
    request builds its degraded answer in turn. Judged by the time each request looked
    (not when its timer ran), the later ones read as late and were shed 503 overloaded
    (5 to 206 in a review's bursts), no Redis error counted. Every one degrades."""
    import httpx

    import service.scoring as scoring_mod

    async def stalled(*a: Any, **k: Any) -> Any:
        await asyncio.Future()  # Redis never answers

    # 500 candidates: each degraded answer a millisecond or more of the loop's work
    items = built.frame["item_id"].astype(str).unique()[:500].tolist()
    users = [f"stall-{k}" for k in range(48)]
    app = create_app(settings_for(built, redis_timeout_ms=50, user_tracking=False))
    monkeypatch.setattr(scoring_mod, "fetch", stalled)

    async def main() -> list[httpx.Response]:
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await asyncio.gather(*(
                    client.post("/v1/score", json={
                        "user_id": u, "candidates": [{"item_id": i} for i in items]})
                    for u in users))  # fmt: skip
        finally:
            await ctx.__aexit__(None, None, None)

    answers = asyncio.run(main())
    statuses = [(r.status_code, r.json().get("degraded")) for r in answers]
    assert statuses == [(200, True)] * len(users), sorted(set(statuses))


def test_the_throttle_counts_what_it_held_back_since_its_last_line() -> None:
    """Its note said "in the last 10 s" of failures held back an hour before; and a
    new outage after a quiet spell waited for the period of the last one to pass."""
    from service.throttle import Throttle, held_note

    now = [0.0]
    th = Throttle(clock=lambda: now[0])
    first = th.ready()
    assert first is not None and held_note(first) == ""  # the first line of all
    for _ in range(5):  # the rest of the outage, a second apart: held back
        now[0] += 1
        assert th.ready() is None
    now[0] = 3600.0  # an hour later, a new outage: its first failure logged at once
    due = th.ready()
    assert due is not None and due.held == 5
    assert held_note(due) == " (5 more like it not logged in the 3600 s since the last line)"
    now[0] += 3  # the next failure of this outage: held back
    assert th.ready() is None
    now[0] += 4  # 7 s after a line, though after 4 quiet seconds: still held
    assert th.ready() is None
    now[0] += 3.5  # past the period: logged, counting the two
    due = th.ready()
    assert due is not None and (due.held, due.since_s) == (2, 10.5)


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_500_names_its_request_in_body_header_and_log(
    built: Built, wrap: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = WRAPS[wrap](create_app(settings_for(built, native_runner=False)))
    with TestClient(app, raise_server_exceptions=False) as c:

        def boom(*args: object, **kwargs: object) -> None:
            raise KeyError("internal detail")

        monkeypatch.setattr(c.app.state.ctr, "require_model", boom)  # type: ignore[attr-defined]
        with caplog.at_level(logging.ERROR, "ctr.service"):
            caplog.clear()
            r = c.post("/v1/score", json=body(built), headers={"X-Request-ID": "bug-7"})
            models = c.get("/v1/models", headers={"X-Request-ID": "bug-8"})
    for answer, sent in ((r, "bug-7"), (models, "bug-8")):
        assert answer.status_code == 500 and answer.json()["error"] == "internal"
        assert answer.json()["request_id"] == one_id(answer) == sent
    lines = [x for x in caplog.records if "internal error" in x.getMessage()]
    assert [x.request_id for x in lines] == ["bug-7", "bug-8"]  # type: ignore[attr-defined]
    assert "KeyError" in lines[0].getMessage()


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_uvicorns_traceback_of_a_500_names_its_request(
    built: Built, wrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own line about an exception that reached it (uvicorn logs it after
    the app raised) is made in the request's task: it carries the request's ID."""
    import httpx

    from tests.server_thread import ServerThread

    app = WRAPS[wrap](create_app(settings_for(built, native_runner=False)))
    seen: list[logging.LogRecord] = []
    catch = logging.Handler(logging.ERROR)
    catch.emit = seen.append  # type: ignore[method-assign]
    with ServerThread(app) as server:
        logging.getLogger("uvicorn.error").addHandler(catch)
        try:

            def boom(*args: object, **kwargs: object) -> None:
                raise KeyError("internal detail")

            monkeypatch.setattr(app.state.ctr, "require_model", boom)
            r = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "bug-9"})
            ok = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "fine-1"})
        finally:
            logging.getLogger("uvicorn.error").removeHandler(catch)
    assert r.status_code == 500 and one_id(r) == "bug-9" and ok.status_code == 200
    raised = [x for x in seen if x.exc_info and x.exc_info[0] is KeyError]
    assert len(raised) == 1 and raised[0].request_id == "bug-9"  # type: ignore[attr-defined]


def test_given_takes_plain_tokens_only() -> None:
    assert given("a") == "a" and given("!#$%&'()*+,-./:;<=>?@[]^_`{|}~") is not None
    for bad in (None, "", " a", "a\tb", 'a"b', "a\\b", "é", "a\x7f", "x" * 201):
        assert given(bad) is None, bad


async def _asgi_score(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], str]:
    """One scoring request straight through ASGI: its X-Request-ID headers and the body's
    ``request_id``."""
    body = b'{"user_id": "u0", "candidates": [{"item_id": "i1"}]}'
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    ids = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    return ids, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["request_id"]


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_request_in_a_finished_requests_context_gets_its_own_id(built: Built, wrap: str) -> None:
    """uvicorn starts a pipelined request's task inside the previous one's ``send`` (and
    after a large body, from inside its task), so the task inherits that request's
    context: its ID must not be taken for the new request's."""
    app = WRAPS[wrap](create_app(settings_for(built)))

    async def main() -> list[tuple[list[bytes], str]]:
        async with app.router.lifespan_context(app):
            CURRENT.set("stale")  # what such a task inherits
            answers = [
                await _asgi_score(app, []),
                await _asgi_score(app, [(b"x-request-id", b"mine")]),
            ]
            # a caller awaiting the app in its own task (httpx's ASGITransport) gets its
            # own context back: the request's ID does not name its later lines
            assert CURRENT.get() == "stale"
            return answers

    (drawn, drawn_body), (mine, mine_body) = asyncio.run(main())
    assert len(drawn) == 1 and drawn[0].decode() == drawn_body != "stale"
    assert DRAWN.fullmatch(drawn_body)
    assert mine == [b"mine"] and mine_body == "mine"


def test_a_reloads_model_load_logs_the_requests_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The load runs on another thread, in the request's context."""
    with caplog.at_level(logging.INFO):
        caplog.clear()
        r = client.post(
            "/admin/reload", json={}, headers={"X-API-Key": "k", "X-Request-ID": "rl-9"}
        )
        assert r.status_code == 200, r.text
    loaded = [x for x in caplog.records if x.name == "ctr.model" and x.threadName != "MainThread"]
    assert loaded and {x.request_id for x in loaded} == {"rl-9"}  # type: ignore[attr-defined]


def test_the_service_log_shows_the_id_by_default(tmp_path: Path) -> None:
    """``create_app`` on an interpreter whose logging is not set up yet (as under
    ``ctr serve``): its lines end with the request's ID, and those made outside a request
    have none."""
    code = textwrap.dedent(
        f"""
        import logging
        from service.app import create_app
        from service.requestid import CURRENT
        from service.settings import Settings
        create_app(Settings(models_dir={str(tmp_path)!r}, model_name="m"))
        log = logging.getLogger("ctr.service")
        log.warning("outside")
        CURRENT.set("r-42")
        log.warning("inside")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stderr.splitlines()
    assert "WARNING:ctr.service:outside" in lines
    assert "WARNING:ctr.service:inside request_id=r-42" in lines
