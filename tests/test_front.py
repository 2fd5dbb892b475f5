"""``ctr serve``'s HTTP protocol (``service.front``): a scoring request served without
ASGI gets, byte for byte, the answer uvicorn's own protocol gives through ASGI (the
``Date`` header aside), over real sockets to two real uvicorn servers of the same
bundle: valid and invalid requests, bodies in chunks, ``Expect: 100-continue``,
HTTP/1.0, ``Connection: close``, pipelined requests, a bug's 500; and its access-log
line, metrics and request IDs are uvicorn's and the app's."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service import front
from service import metrics as m
from service.app import create_app
from service.front import FrontProtocol
from tests.helpers import Built, build_and_load, settings_for
from tests.server_thread import ServerThread

DATE = re.compile(rb"date: [^\r]*\r\n")
LIMIT = 4000  # CTR_MAX_BODY_BYTES of both servers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("front"), "din")


def _app(built: Built) -> Any:
    return create_app(settings_for(built, api_key="k", protect_scoring=True, max_body_bytes=LIMIT))


@pytest.fixture(scope="module")
def servers(built: Built) -> Iterator[dict[str, ServerThread]]:
    """The same app twice: behind ``ctr serve``'s protocol and behind uvicorn's own."""
    # connections kept alive for longer than an exchange waits for the server to close
    # one (exchange's timeout): a connection the server should close and does not fails
    kw = {"timeout_keep_alive": 60}
    with (
        ServerThread(_app(built), **kw) as fast,
        ServerThread(_app(built), http="httptools", **kw) as plain,
    ):
        yield {"front": fast, "uvicorn": plain}


def score_body(built: Built, n: int = 6) -> bytes:
    items = built.frame["item_id"].astype(str).unique()[:n].tolist()
    user = str(built.frame["user_id"].iloc[0])
    return json.dumps({"user_id": user, "candidates": [{"item_id": i} for i in items]}).encode()


def post(body: bytes, *extra: str, version: str = "1.1", length: bool = True) -> bytes:
    head = [f"POST /v1/score HTTP/{version}", "Host: t", "X-API-Key: k", *extra]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# a last request that makes the server close the connection, so that a read to the end
# returns every answer before it
LAST = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-ID: last\r\nConnection: close\r\n\r\n"


def exchange(server: ServerThread, raw: bytes, timeout: float = 15) -> bytes:
    """``raw`` written to a new connection at once; every byte the server sends until it
    closes the connection, with the ``Date`` headers taken out."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(raw)
        got = bytearray()
        while chunk := sock.recv(65536):
            got += chunk
    return DATE.sub(b"", bytes(got))


def chunked(body: bytes) -> bytes:
    half = len(body) // 2
    parts = [body[:half], body[half:]]
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def requests_for(built: Built) -> dict[str, bytes]:
    body = score_body(built)
    rid = "X-Request-ID: same-id"
    return {
        "score": post(body, rid) + LAST,
        "score, Connection: close": post(body, rid, "Connection: close"),
        "score, HTTP/1.0": post(body, rid, version="1.0"),
        "pipelined": post(body, rid) + post(score_body(built, 3), "X-Request-ID: second") + LAST,
        "chunked body": post(chunked(body), rid, "Transfer-Encoding: chunked", length=False)
        + LAST,
        "Expect: 100-continue": post(body, rid, "Expect: 100-continue") + LAST,
        "malformed JSON (400)": post(b'{"user_id": ', rid) + LAST,
        "invalid field (422)": post(b'{"user_id": "u", "candidates": 3}', rid) + LAST,
        "body over the limit (413)": post(b"x" * (LIMIT + 1), rid) + LAST,
        "chunks over the limit (413)": post(
            chunked(b"[" * (LIMIT + 10)), rid, "Transfer-Encoding: chunked", length=False
        )
        + LAST,
        "no API key (401)": post(body, rid).replace(b"X-API-Key: k\r\n", b"") + LAST,
        "repeated X-Request-ID: the first": post(body, rid, "X-Request-ID: other") + LAST,
        "not the fast route": b"GET /v1/score HTTP/1.1\r\nHost: t\r\n" + rid.encode()
        + b"\r\n\r\n" + LAST,
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "score",
        "score, Connection: close",
        "score, HTTP/1.0",
        "pipelined",
        "chunked body",
        "Expect: 100-continue",
        "malformed JSON (400)",
        "invalid field (422)",
        "body over the limit (413)",
        "chunks over the limit (413)",
        "no API key (401)",
        "repeated X-Request-ID: the first",
        "not the fast route",
    ],
)
def test_the_same_bytes_as_through_asgi(
    servers: dict[str, ServerThread], built: Built, case: str
) -> None:
    raw = requests_for(built)[case]
    fast, plain = exchange(servers["front"], raw), exchange(servers["uvicorn"], raw)
    assert fast == plain
    assert fast.startswith(b"HTTP/1.1 ")
    if case.startswith(("score", "pipelined", "chunked", "Expect", "repeated")):
        assert b"HTTP/1.1 200 OK\r\n" in fast and b"x-request-id: same-id\r\n" in fast
        assert b'"request_id":"same-id"' in fast and b'"items":[{' in fast
    if case == "Expect: 100-continue":
        assert fast.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    if case == "pipelined":
        assert fast.count(b"HTTP/1.1 200 OK\r\n") == 3 and b"x-request-id: second\r\n" in fast


def test_the_front_serves_the_scoring_route_only(
    servers: dict[str, ServerThread], built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison above compares the front with uvicorn's own path only if the front
    path is taken: it is, for ``POST /v1/score`` and no other request."""
    served: list[str] = []
    inner = front.serve_direct

    async def spy(handler: Any, cycle: Any, *rest: Any) -> None:
        served.append(cycle.scope["path"])
        await inner(handler, cycle, *rest)

    monkeypatch.setattr(front, "serve_direct", spy)
    raw = post(score_body(built)) + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + LAST
    assert exchange(servers["front"], raw).count(b"HTTP/1.1 200 OK") == 3
    assert served == ["/v1/score"]
    exchange(servers["uvicorn"], raw)
    assert served == ["/v1/score"]


def test_a_drawn_request_id_is_in_header_and_body(
    servers: dict[str, ServerThread], built: Built
) -> None:
    got = exchange(servers["front"], post(score_body(built), "Connection: close"))
    head, _, body = got.partition(b"\r\n\r\n")
    ids = re.findall(rb"\r\nx-request-id: ([0-9a-f]{32})\r\n", head + b"\r\n")
    assert len(ids) == 1 and json.loads(body)["request_id"] == ids[0].decode()


def test_a_bug_gets_the_apps_500_and_the_connection_is_closed(
    servers: dict[str, ServerThread], built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As through ASGI: the app's JSON 500, then uvicorn's traceback (with the request's
    ID) and the connection closed: the request after it on that connection is not
    answered."""
    seen: list[logging.LogRecord] = []
    catch = logging.Handler(logging.ERROR)
    catch.emit = seen.append  # type: ignore[method-assign]

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyError("internal detail")

    for server in servers.values():
        state = server.server.config.loaded_app.app.state.ctr
        monkeypatch.setattr(state, "require_model", boom)
    raw = post(score_body(built), "X-Request-ID: bug-1") + LAST
    logging.getLogger("uvicorn.error").addHandler(catch)
    try:
        fast, plain = exchange(servers["front"], raw), exchange(servers["uvicorn"], raw)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catch)
    assert fast == plain
    assert fast.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert fast.count(b"HTTP/1.1") == 1  # the /healthz after it: never answered
    assert b'"request_id":"bug-1"' in fast and b"internal detail" not in fast
    raised = [x for x in seen if x.exc_info and x.exc_info[0] is KeyError]
    assert len(raised) == 2  # one from each server
    assert {x.request_id for x in raised} == {"bug-1"}  # type: ignore[attr-defined]


def _count(status: str) -> float:
    for metric in m.REQUEST_DURATION.collect():
        for s in metric.samples:
            if s.name.endswith("_count") and s.labels.get("status") == status:
                if s.labels.get("route") == "/v1/score":
                    return s.value
    return 0.0


def test_metrics_count_each_answer_and_a_client_gone_before_its_body(
    servers: dict[str, ServerThread], built: Built
) -> None:
    before = {k: _count(k) for k in ("200", "422", "499")}
    exchange(servers["front"], post(score_body(built)) + post(b"[]") + LAST)
    # the client goes away with its body half sent: nobody to answer, counted as 499
    with socket.create_connection(("127.0.0.1", servers["front"].port), timeout=10) as sock:
        sock.sendall(post(score_body(built))[:-5])
    exchange(servers["front"], LAST)  # the server has seen the close by now
    for _ in range(100):
        if _count("499") > before["499"]:
            break
        time.sleep(0.05)
    after = {k: _count(k) for k in ("200", "422", "499")}
    assert {k: after[k] - before[k] for k in after} == {"200": 1, "422": 1, "499": 1}


def test_the_access_log_line_is_uvicorns(built: Built) -> None:
    """With the access log on, the same line as uvicorn's, with the client a trusted
    proxy's ``X-Forwarded-For`` names (uvicorn's proxy-headers middleware)."""
    lines: dict[str, list[str]] = {}
    catch = logging.Handler(logging.INFO)
    raw = post(score_body(built), "X-Forwarded-For: 203.0.113.9") + LAST
    for name, http in (("front", front.FrontProtocol), ("uvicorn", "httptools")):
        got: list[str] = []
        catch.emit = lambda r, got=got: got.append(r.getMessage())  # type: ignore[method-assign]
        with ServerThread(_app(built), http=http, log_level="info", access_log=True) as server:
            logging.getLogger("uvicorn.access").addHandler(catch)
            try:
                exchange(server, raw)
            finally:
                logging.getLogger("uvicorn.access").removeHandler(catch)
        lines[name] = got
    # the scoring request's line (the /healthz after it names the client's own port)
    assert (
        lines["front"][0] == lines["uvicorn"][0] == '203.0.113.9:0 - "POST /v1/score HTTP/1.1" 200'
    )
    assert len(lines["front"]) == len(lines["uvicorn"]) == 2


def test_another_uvicorn_falls_back_to_asgi(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where uvicorn lacks what the front builds on, requests go through ASGI, with a
    warning, and are answered as before."""
    monkeypatch.setattr(front, "SUPPORTED", False)
    monkeypatch.setattr(front.FrontProtocol, "warned", False)
    served: list[Any] = []
    monkeypatch.setattr(front, "serve_direct", lambda *a: served.append(a))
    with ServerThread(_app(built)) as server:
        got = exchange(server, post(score_body(built), "Connection: close"))
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and not served
    assert front.FrontProtocol.warned


def test_supported_checks_the_cycles_fields() -> None:
    assert front.supported()
    assert set(front.CYCLE_FIELDS) <= set(vars(_cycle()))


def _cycle(transport: Any = None, flow: Any = None, access_log: bool = False) -> Any:
    """A cycle as uvicorn makes one (for its fields, and for :func:`front._write`)."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    done: list[bool] = []
    cycle = RequestResponseCycle(
        scope={"method": "POST", "path": "/v1/score", "http_version": "1.1", "client": None,
               "query_string": b"", "root_path": "", "headers": []},
        transport=transport, flow=flow, logger=logging.getLogger("uvicorn.error"),
        access_logger=logging.getLogger("uvicorn.access"), access_log=access_log,
        default_headers=[], message_event=asyncio.Event(), expect_100_continue=False,
        keep_alive=True, on_response=lambda: done.append(True),
    )  # fmt: skip
    cycle.done = done
    return cycle


class Transport:
    """What ``_write`` does to the socket."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_an_answer_waits_while_the_socket_is_full() -> None:
    """Backpressure, as uvicorn's ``send``: while the transport has paused writing, the
    answer waits (nothing written, the request not complete), and goes once it resumes."""
    from uvicorn.protocols.http.flow_control import FlowControl

    from service.asgi import orjson_response

    async def main() -> None:
        transport = Transport()
        flow = FlowControl(transport)  # type: ignore[arg-type]
        cycle = _cycle(transport, flow)
        flow.pause_writing()
        rid = [(b"x-request-id", b"r")]
        task = asyncio.ensure_future(front._write(cycle, orjson_response({"a": 1}), rid))
        await asyncio.sleep(0.05)
        assert not transport.written and not cycle.response_complete and not task.done()
        flow.resume_writing()
        await task
        assert len(transport.written) == 1 and transport.written[0].endswith(b'{"a":1}')
        assert cycle.response_complete and cycle.done == [True]

    asyncio.run(main())


def test_a_cancel_while_a_bugs_500_waits_gets_uvicorns_ending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug's 500 waits for a full socket, and the request is cancelled meanwhile (a
    graceful shutdown's end): as uvicorn's run_asgi ends an app that raised, the
    traceback (once), uvicorn's plain 500 when the socket takes it, and the connection
    closed; never the bug's 500 after the cancel, nor nothing at all."""
    from uvicorn.protocols.http.flow_control import FlowControl

    async def bug(header: Any, chunks: Any) -> Any:
        raise KeyError("internal detail")

    async def main() -> None:
        transport = Transport()
        flow = FlowControl(transport)  # type: ignore[arg-type]
        cycle = _cycle(transport, flow)
        flow.pause_writing()
        task = asyncio.ensure_future(front.serve_direct(bug, cycle, None))
        await asyncio.sleep(0.05)  # the bug's 500 waits for the socket
        assert not transport.written and not task.done()
        task.cancel()
        await asyncio.sleep(0.05)
        assert not transport.written  # still full
        flow.resume_writing()
        await task
        sent = b"".join(transport.written)
        assert sent.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert sent.endswith(b"\r\n\r\nInternal Server Error") and b"request_id" not in sent
        assert transport.closed

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        asyncio.run(main())
    tracebacks = [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is asyncio.CancelledError  # type: ignore[index]


def test_nothing_is_written_for_a_client_gone(caplog: pytest.LogCaptureFixture) -> None:
    """A client that went away while its request ran: no bytes, no access line, the
    request not marked answered (as uvicorn's ``send``)."""
    from uvicorn.protocols.http.flow_control import FlowControl

    from service.asgi import orjson_response

    async def main() -> None:
        transport = Transport()
        cycle = _cycle(transport, FlowControl(transport), access_log=True)  # type: ignore[arg-type]
        cycle.disconnected = True
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            await front._write(cycle, orjson_response({"a": 1}), [(b"x-request-id", b"r")])
        assert not transport.written and not cycle.response_started and not cycle.done
        assert not [r for r in caplog.records if r.name == "uvicorn.access"]

    asyncio.run(main())


def test_a_request_in_flight_is_one_of_the_servers_tasks(
    servers: dict[str, ServerThread], built: Built
) -> None:
    """The request's task is in uvicorn's set of tasks while it runs (the concurrency
    limit counts it; a shutdown past its grace period cancels it), and out after."""
    raw = post(score_body(built), "Connection: close")
    tasks = servers["front"].server.server_state.tasks
    with socket.create_connection(("127.0.0.1", servers["front"].port), timeout=15) as sock:
        sock.sendall(raw[:-10])
        deadline = time.monotonic() + 5
        while not tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        names = [t.get_coro().__qualname__ for t in tasks]  # type: ignore[union-attr]
        sock.sendall(raw[-10:])
        assert read_reply(sock).startswith(b"HTTP/1.1 200 OK\r\n")
    assert names == ["serve_direct"]


def read_reply(sock: socket.socket) -> bytes:
    """One ``Content-Length`` reply from ``sock``, whole, without its ``Date`` header."""
    got = bytearray()
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole answer: {bytes(got)[:200]!r}"
        got += chunk
    head, _, rest = bytes(got).partition(b"\r\n\r\n")
    length = int(re.search(rb"\r\ncontent-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += sock.recv(65536)
    assert len(rest) == length  # nothing after it
    return DATE.sub(b"", head + b"\r\n\r\n" + rest)


def test_requests_one_after_another_on_a_kept_connection(
    servers: dict[str, ServerThread], built: Built
) -> None:
    """Each request sent once the answer before it has been read (no pipelining): the
    connection stays open and serves the next, as uvicorn's does; its tasks are gone
    after."""
    got: dict[str, list[bytes]] = {}
    for name, server in servers.items():
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            got[name] = []
            for k, n in enumerate((6, 3, 6)):
                sock.sendall(post(score_body(built, n), f"X-Request-ID: kept-{k}"))
                got[name].append(read_reply(sock))
        deadline = time.monotonic() + 5  # a finished task's callbacks run a turn later
        while server.server.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.server.server_state.tasks
    assert got["front"] == got["uvicorn"]
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in got["front"])


def test_the_concurrency_limits_503_is_uvicorns(built: Built) -> None:
    """``limit_concurrency`` (uvicorn's option): a request over it gets uvicorn's 503,
    never the scoring route's answer."""
    got = {}
    for name, http in (("front", FrontProtocol), ("uvicorn", "httptools")):
        with ServerThread(_app(built), http=http, limit_concurrency=1) as server:
            got[name] = exchange(server, post(score_body(built), "Connection: close"))
    assert got["front"] == got["uvicorn"]
    assert got["front"].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


@pytest.mark.parametrize("finished", [True, False], ids=["body finished", "body never finished"])
def test_a_request_in_flight_at_shutdown(built: Built, finished: bool) -> None:
    """A graceful shutdown begins while a request's body is still coming in. Finished
    meanwhile: it is answered, and the connection closed. Never finished: at the end of
    the grace period uvicorn cancels it; the app's 503 `shutting_down` with the request's
    ID (uvicorn's plain 500 and a traceback before session 37), its access line with the
    client a trusted proxy names: the same through the front and uvicorn's protocol."""
    raw = post(score_body(built), "X-Request-ID: sd-1", "X-Forwarded-For: 203.0.113.9")
    got: dict[str, tuple[bytes, list[str], list[Any]]] = {}
    for name, http in (("front", FrontProtocol), ("uvicorn", "httptools")):
        access: list[str] = []
        errors: list[logging.LogRecord] = []
        catch_access = logging.Handler(logging.INFO)
        catch_access.emit = lambda r, a=access: a.append(r.getMessage())  # type: ignore[method-assign]
        catch_error = logging.Handler(logging.ERROR)
        catch_error.emit = errors.append  # type: ignore[method-assign]
        server = ServerThread(_app(built), http=http, log_level="info", timeout_graceful_shutdown=1)
        with server, socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            logging.getLogger("uvicorn.access").addHandler(catch_access)
            logging.getLogger("uvicorn.error").addHandler(catch_error)
            try:
                sock.sendall(raw[:-10])
                time.sleep(0.3)  # the request's task waits for the rest of its body
                server.server.should_exit = True  # the shutdown begins
                time.sleep(0.3)
                if finished:
                    sock.sendall(raw[-10:])
                reply = bytearray()
                while chunk := sock.recv(65536):
                    reply += chunk
            finally:
                logging.getLogger("uvicorn.access").removeHandler(catch_access)
                logging.getLogger("uvicorn.error").removeHandler(catch_error)
        ids = [getattr(r, "request_id", None) for r in errors if r.exc_info]
        got[name] = (DATE.sub(b"", bytes(reply)), access, ids)
    assert got["front"] == got["uvicorn"]
    reply, access, ids = got["front"]
    if finished:
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in reply
        assert access == ['203.0.113.9:0 - "POST /v1/score HTTP/1.1" 200'] and not ids
    else:
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b'"error":"shutting_down"' in reply and b"x-request-id: sd-1\r\n" in reply
        assert access == ['203.0.113.9:0 - "POST /v1/score HTTP/1.1" 503'] and not ids


def test_connections_leave_no_garbage(servers: dict[str, ServerThread], built: Built) -> None:
    """Connections and scoring requests through the front leave no more reference cycles
    for the garbage collector than through uvicorn's own path."""
    # the scoring request last: the cycle the protocol keeps is the front's
    raw = post(score_body(built), "Connection: close")
    found = {}
    for server in servers.values():  # first requests fill caches (alone, it read 19 vs 7)
        exchange(server, raw)
    gc.collect()
    gc.disable()
    try:
        for name, server in servers.items():
            for _ in range(20):
                exchange(server, raw)
            found[name] = gc.collect()
    finally:
        gc.enable()
    assert found["front"] <= found["uvicorn"] + 5, found


def test_ctr_serve_runs_the_front_where_httptools_is(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ctr.cmd_serve import _http_protocol

    assert _http_protocol(True) == "service.front:FrontProtocol"
    assert _http_protocol(False) == "service.front:TimedProtocol"  # the read timeout only
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _http_protocol(True) == "auto"  # uvicorn falls back to h11 then, as before


def test_a_cancel_during_a_handled_errors_await_is_the_shutdowns_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cancel at an await inside an ``except`` block (the Python runner's call after
    a native call failed) carries that error as its context: it was taken for a bug's
    500 waiting, answered uvicorn's plain 500. Only a bug's 500 ends so; this is the
    shutdown's 503, as through the stack."""
    from uvicorn.protocols.http.flow_control import FlowControl

    from service.nativerun import NativeRunError

    async def handler(header: Any, chunks: Any) -> Any:
        try:
            raise NativeRunError("native call failed")
        except NativeRunError:
            await asyncio.sleep(10)  # the Python runner's call

    async def main() -> None:
        transport = Transport()
        cycle = _cycle(transport, FlowControl(transport))  # type: ignore[arg-type]
        task = asyncio.ensure_future(front.serve_direct(handler, cycle, None))
        await asyncio.sleep(0.05)
        task.cancel()
        await task
        sent = b"".join(transport.written)
        assert sent.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), sent[:80]
        assert b'"error":"shutting_down"' in sent

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]


@pytest.mark.parametrize("http", [FrontProtocol, front.TimedProtocol], ids=["front", "asgi"])
def test_a_client_gone_mid_request_stops_its_work(
    built: Built, monkeypatch: pytest.MonkeyPatch, http: Any
) -> None:
    """A client that closed after sending kept its request's in-flight place, Redis
    read and graph call to their end (the deadline): 54 of 64 places held for nobody,
    a live client refused 503 overloaded (an overload review). Behind the front door,
    and through ASGI behind uvicorn's own protocol (``CTR_HTTP_FRONT=false``, which
    session 43 left running), the request's task is cancelled as the connection goes:
    its place is free at once, the request counted 499 and nothing answered."""
    import service.scoring as scoring_mod

    real = scoring_mod.fetch
    reads: dict[str, int] = {"started": 0, "cancelled": 0}

    async def slow(*a: Any, **k: Any) -> Any:
        reads["started"] += 1
        try:
            await asyncio.sleep(5)  # a read that takes long: the client gives up
        except asyncio.CancelledError:
            reads["cancelled"] += 1
            raise
        return await real(*a, **k)

    def count(status: str) -> float:
        child = m.REQUEST_DURATION.labels("/v1/score", "POST", status)
        return sum(s.value for s in child.collect()[0].samples if s.name.endswith("_count"))

    app = create_app(settings_for(built, api_key="k", redis_timeout_ms=10_000,
                                  request_timeout_ms=10_000))  # fmt: skip
    with ServerThread(app, http=http) as server:
        monkeypatch.setattr(scoring_mod, "fetch", slow)
        before = count("499")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(post(score_body(built)))
            end = time.monotonic() + 5
            while reads["started"] == 0:  # the request is being served
                assert time.monotonic() < end
                time.sleep(0.01)
        end = time.monotonic() + 5
        while reads["cancelled"] == 0 or app.state.ctr.in_flight:
            assert time.monotonic() < end, "the gone client's work went on"
            time.sleep(0.01)
        assert time.monotonic() - started < 3  # not its 5 s read, nor the deadline
        wait = time.monotonic() + 5
        while count("499") < before + 1:
            assert time.monotonic() < wait
            time.sleep(0.01)


@pytest.mark.parametrize("http", [FrontProtocol, front.TimedProtocol], ids=["front", "asgi"])
def test_a_request_sent_as_a_graceful_shutdown_begins_is_answered(
    built: Built, monkeypatch: pytest.MonkeyPatch, http: Any
) -> None:
    """uvicorn closed an idle keep-alive connection the moment a graceful shutdown
    began: a request its client sent then was lost to a reset, no answer (a review: 24
    requests in flight when a 3-worker service was stopped under load; a 502 behind a
    load balancer). The connection is read on a moment: the request is answered, with
    ``connection: close``, and then the connection closes."""
    began = threading.Event()
    real = front.TimedProtocol.shutdown

    def shutdown(self: Any) -> None:
        real(self)
        began.set()

    monkeypatch.setattr(front.TimedProtocol, "shutdown", shutdown)
    with ServerThread(_app(built), http=http) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(post(score_body(built)))
            assert read_reply(sock).startswith(b"HTTP/1.1 200 OK\r\n")
            server.server.should_exit = True  # SIGTERM's doing
            assert began.wait(10)
            sock.sendall(post(score_body(built)))
            second = read_reply(sock)
            assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second[:200]
            assert b"\r\nconnection: close\r\n" in second.lower()
            assert sock.recv(1) == b""  # then closed
