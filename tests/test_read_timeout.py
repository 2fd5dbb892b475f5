"""``CTR_READ_TIMEOUT_MS`` (``service.front.TimedProtocol``, under the front and under
uvicorn's own protocol alike): a request that does not all arrive in time no longer
holds its connection for good. uvicorn has no such limit: a client that sent part of a
head or a body, or nothing, was never answered nor closed (a fuzzing review's finding)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.app import create_app
from service.front import FrontProtocol, TimedProtocol
from tests.helpers import Built, build_and_load, settings_for
from tests.server_thread import ServerThread

TIMEOUT_MS = 400


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("read-timeout"), "din")


@pytest.fixture(scope="module", params=[FrontProtocol, TimedProtocol], ids=["front", "plain"])
def server(built: Built, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    app = create_app(settings_for(built, read_timeout_ms=TIMEOUT_MS))
    with ServerThread(app, http=request.param, timeout_keep_alive=30) as s:
        yield s


def _body(built: Built) -> bytes:
    items = built.frame["item_id"].astype(str).unique()[:5].tolist()
    user = str(built.frame["user_id"].iloc[0])
    return json.dumps({"user_id": user, "candidates": [{"item_id": i} for i in items]}).encode()


def _head(length: int) -> bytes:
    return f"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Every byte until the server closes the connection, and the seconds it took."""
    start = time.monotonic()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    return bytes(got), time.monotonic() - start


def _timeouts() -> float:
    return REGISTRY.get_sample_value("ctr_errors_total", {"kind": "request_timeout"}) or 0.0


def _connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_head_that_stops_halfway_gets_a_408_and_is_closed(server: ServerThread) -> None:
    before = _timeouts()
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Le")
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"x-request-id: " in head.lower()
    answer = json.loads(body)
    assert answer["error"] == "request_timeout" and answer["field"] == "headers"
    assert TIMEOUT_MS / 1000 * 0.9 <= took < 5
    assert _timeouts() == before + 1


def test_a_body_that_stops_short_closes_the_connection(server: ServerThread, built: Built) -> None:
    body = _body(built)
    before = _timeouts()
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body[:-5])
        got, took = _until_closed(sock)
    assert got == b""  # its handler was waiting for the body: ended as a client gone
    assert TIMEOUT_MS / 1000 * 0.9 <= took < 5
    assert _timeouts() == before + 1


def test_a_connection_that_sends_nothing_is_closed_quietly(server: ServerThread) -> None:
    before = _timeouts()
    with _connect(server) as sock:
        got, took = _until_closed(sock)
    assert got == b"" and TIMEOUT_MS / 1000 * 0.9 <= took < 5
    assert _timeouts() == before  # no request had begun: nothing to count


def test_a_slow_request_within_the_limit_and_a_kept_connection_are_served(
    server: ServerThread, built: Built
) -> None:
    """The clock counts one request's arrival: a request sent in two parts inside the
    limit is answered, and the connection then outlives the limit (uvicorn's keep-alive
    timeout governs the wait for the next request) and serves another."""
    body = _body(built)
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(_head(len(body)) + body[:10])
            time.sleep(TIMEOUT_MS / 1000 / 4)
            sock.sendall(body[10:])
            got = sock.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            time.sleep(TIMEOUT_MS / 1000 * 2)  # idle past the read timeout: still open


def test_an_upgrade_request_no_longer_holds_the_connection(
    server: ServerThread, built: Built
) -> None:
    """``Upgrade: h2c`` with a body: uvicorn's parser stops at the head (the body and a
    pipelined request after it are never read): the app answered 422 "body is empty"
    and the connection stayed open until the keep-alive timeout. Now a 400 naming the
    header, and the connection is closed at once."""
    body = _body(built)
    raw = (
        b"POST /v1/score HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body + _head(len(body)) + body
    )
    with _connect(server) as sock:
        sock.sendall(raw)
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    answer = json.loads(got.partition(b"\r\n\r\n")[2])
    assert answer["error"] == "unsupported_upgrade" and answer["field"] == "Upgrade"
    assert took < TIMEOUT_MS / 1000  # closed once answered, not at a timeout


def test_no_limit_at_zero(built: Built) -> None:
    app: Any = create_app(settings_for(built, read_timeout_ms=0))
    with ServerThread(app, http=FrontProtocol) as s, _connect(s) as sock:
        sock.settimeout(TIMEOUT_MS / 1000 * 3)
        sock.sendall(b"POST /v1/score HTTP/1.1\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1)  # still open, as uvicorn leaves it
