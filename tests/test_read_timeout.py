"""``CTR_READ_TIMEOUT_MS`` (``service.front.TimedProtocol``, under the front and under
uvicorn's own protocol alike): a request that does not all arrive in time no longer
holds its connection for good. uvicorn has no such limit: a client that sent part of a
head or a body, or nothing, was never answered nor closed (a fuzzing review's finding)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.app import create_app
from service.front import FrontProtocol, TimedProtocol
from tests.helpers import REDIS_URL, Built, build_and_load, settings_for
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


@pytest.fixture(autouse=True)
def _unthrottled_warnings() -> None:
    """uvicorn's warnings are one line per kind per 10 s, process-wide (front._WARNINGS):
    a test asserting a warning is (or is not) logged sees its own first one, not one a
    test before it held back (which hid a regression in every test but the first)."""
    from service import front

    front._WARNINGS.clear()


def _body(built: Built) -> bytes:
    items = built.frame["item_id"].astype(str).unique()[:5].tolist()
    user = str(built.frame["user_id"].iloc[0])
    return json.dumps({"user_id": user, "candidates": [{"item_id": i} for i in items]}).encode()


def _head(length: int) -> bytes:
    return f"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


def _score_then_closed(server: ServerThread, body: bytes, behind: bytes) -> tuple[bytes, bytes]:
    """A score request with ``body`` and ``behind`` pipelined in one write: the heads of
    the two answers, once the connection closed after the second with nothing more."""
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body + behind)
        answers = Responses(sock)
        first, _ = answers.next()
        second, _ = answers.next()
        assert answers.buf == b"" and sock.recv(1) == b""  # then closed
    return first, second


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Every byte until the server closes the connection, and the seconds it took."""
    start = time.monotonic()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    return bytes(got), time.monotonic() - start


def _timeouts() -> float:
    return REGISTRY.get_sample_value("ctr_errors_total", {"kind": "request_timeout"}) or 0.0


def _scored(status: str, route: str = "/v1/score") -> float:
    """``route``'s answers counted with ``status`` (ctr_request_duration_seconds);
    ``unparsed``: the requests refused before their head was all read."""
    from service import metrics as m

    for metric in m.REQUEST_DURATION.collect():
        for sample in metric.samples:
            labels = sample.labels
            if sample.name.endswith("_count") and labels.get("route") == route:
                if labels.get("status") == status:
                    return sample.value
    return 0.0


def _connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_head_that_stops_halfway_gets_a_408_and_is_closed(server: ServerThread) -> None:
    before = _timeouts()
    refused = _scored("408", "unparsed")
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
    # in the request metrics with its status (the non-2xx panel), though no route read it
    assert _scored("408", "unparsed") == refused + 1


def test_a_body_that_stops_short_closes_the_connection(server: ServerThread, built: Built) -> None:
    body = _body(built)
    before = _timeouts()
    late, gone = _scored("408"), _scored("499")
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body[:-5])
        got, took = _until_closed(sock)
    assert got == b""  # its handler was waiting for the body: no answer to give
    assert TIMEOUT_MS / 1000 * 0.9 <= took < 5
    assert _timeouts() == before + 1
    # the service closed it: a 408 in the request metrics, not a client gone (499)
    deadline = time.monotonic() + 5
    while _scored("408") == late and time.monotonic() < deadline:
        time.sleep(0.02)  # the handler learns of the close after the socket does
    assert (_scored("408"), _scored("499")) == (late + 1, gone)


def test_a_connection_that_sends_nothing_is_closed_quietly(server: ServerThread) -> None:
    before = _timeouts()
    with _connect(server) as sock:
        got, took = _until_closed(sock)
    assert got == b"" and TIMEOUT_MS / 1000 * 0.9 <= took < 5
    assert _timeouts() == before  # no request had begun: nothing to count


class Responses:
    """Whole responses read one at a time from a socket (head, then Content-Length
    bytes), what came after one kept for the next: uvicorn may write a head and its body
    apart, and pipelined answers together."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"closed before {what}: {self.buf[:200]!r}"
        self.buf += chunk

    def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more("a whole head")
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")))  # fmt: skip
        while len(rest) < length:
            self._more("a whole body")
            rest = self.buf.partition(b"\r\n\r\n")[2]
        self.buf = rest[length:]
        return head, rest[:length]


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
            head, _ = Responses(sock).next()
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            time.sleep(TIMEOUT_MS / 1000 * 2)  # idle past the read timeout: still open


@pytest.mark.parametrize(
    "connection",
    [[b"Connection: Upgrade, HTTP2-Settings"], [b"Connection: keep-alive", b"Connection: Upgrade"]],
    ids=["one-header", "split-headers"],
)
def test_an_upgrade_request_no_longer_holds_the_connection(
    server: ServerThread, built: Built, connection: list[bytes]
) -> None:
    """``Upgrade: h2c`` with a body: uvicorn's parser stops at the head (the body and a
    pipelined request after it are never read): the app answered 422 "body is empty"
    and the connection stayed open until the keep-alive timeout (30 s here). Now a 400
    naming the header, and the connection closed once answered; also where the
    ``Connection`` header's upgrade token comes in a second header line."""
    body = _body(built)
    head = b"\r\n".join([b"POST /v1/score HTTP/1.1", b"Host: t", *connection, b"Upgrade: h2c"])
    raw = head + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    with _connect(server) as sock:
        sock.sendall(raw + _head(len(body)) + body)
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    answer = json.loads(got.partition(b"\r\n\r\n")[2])
    assert answer["error"] == "unsupported_upgrade" and answer["field"] == "Upgrade"
    assert took < 5  # closed once answered: not at the keep-alive timeout


def test_a_request_queued_before_an_upgrade_request_is_answered_too(
    server: ServerThread, built: Built
) -> None:
    """The close after an upgrade request waits for it: a pipelined upgrade request
    behind a plain one used to close the connection after the first answer."""
    body = _body(built)
    head = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    upgrade = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    first, second = _score_then_closed(server, body, upgrade)
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 400 ")


def test_a_request_queued_behind_a_slow_one_is_not_timed_out_meanwhile(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn stops reading behind a queued request until the one before it is
    answered: the clock of a request then still arriving does not run meanwhile. (It
    did: a slow first answer made the connection close, losing all three.)"""
    from service import scoring

    real = scoring.score
    slow = {"left": 1}

    async def slow_first(*args: Any, **kwargs: Any) -> Any:
        if slow["left"]:
            slow["left"] -= 1
            await asyncio.sleep(TIMEOUT_MS / 1000 * 2.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score", slow_first)
    body = _body(built)
    app = create_app(settings_for(built, read_timeout_ms=TIMEOUT_MS, request_timeout_ms=5000))
    with ServerThread(app, http=FrontProtocol, timeout_keep_alive=30) as s, _connect(s) as sock:
        sock.sendall(_head(len(body)) + body)  # 1: answered after 2.5 timeouts
        time.sleep(0.05)
        sock.sendall(_head(len(body)) + body + _head(len(body)) + body[:10])  # 2, 3 begun
        time.sleep(TIMEOUT_MS / 1000 / 4)
        sock.sendall(body[10:])
        answers = Responses(sock)
        heads = [answers.next()[0] for _ in range(3)]
    assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads), heads
def test_no_limit_at_zero(built: Built) -> None:
    app: Any = create_app(settings_for(built, read_timeout_ms=0))
    with ServerThread(app, http=FrontProtocol) as s, _connect(s) as sock:
        sock.settimeout(TIMEOUT_MS / 1000 * 3)
        sock.sendall(b"POST /v1/score HTTP/1.1\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1)  # still open, as uvicorn leaves it
        # and no clock at all: no sweeper was started for this server
        assert not hasattr(s.server.server_state, "ctr_read_sweeper")


def test_the_limit_holds_at_the_trace_log_level(built: Built) -> None:
    """At ``trace`` uvicorn wraps the app in its message logger: the limit was then
    not found, and a half-sent head held its connection for good."""
    app: Any = create_app(settings_for(built, read_timeout_ms=TIMEOUT_MS))
    with ServerThread(app, http=TimedProtocol, log_level="trace") as s, _connect(s) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\n")
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 ") and took < 5


def test_a_head_past_the_limit_is_a_431_before_the_parser_reads_it(server: ServerThread) -> None:
    """httptools joins a header's pieces one copy at a time (a 64 MB header held the
    event loop for seconds, a security review found): a head past MAX_HEAD_BYTES is
    refused as it arrives."""
    from service.front import MAX_HEAD_BYTES

    before = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"}) or 0.0
    refused = _scored("431", "unparsed")
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: ")
        with contextlib.suppress(OSError):  # the server may close while this is sent
            for _ in range(MAX_HEAD_BYTES // 4096 + 2):
                sock.sendall(b"a" * 4096)
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert json.loads(got.partition(b"\r\n\r\n")[2])["error"] == "header_too_large"
    after = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"})
    assert after == before + 1
    assert _scored("431", "unparsed") == refused + 1
    # a head just under the limit is served
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * (MAX_HEAD_BYTES - 200)
                     + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        got, _ = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]


def test_a_client_that_reads_nothing_is_dropped(built: Built) -> None:
    """Answers written to a client that reads none of them piled up in the transport,
    and the connection was held for good (the read clock rests while answers are in
    flight): past the timeout with the transport full, it is dropped."""
    import threading

    items = [f"i{k}" for k in range(2000)]  # unknown IDs too: 2,000 ranked items each
    user = str(built.frame["user_id"].iloc[0])
    body = json.dumps({"user_id": user, "candidates": [{"item_id": i} for i in items]}).encode()
    app = create_app(settings_for(built, read_timeout_ms=TIMEOUT_MS, max_candidates=2000))
    before = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "write_timeout"}) or 0.0
    errors, gone = _scored("500"), _scored("499")
    with ServerThread(app, http=FrontProtocol, timeout_keep_alive=30, loop="uvloop") as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))

        def send() -> None:  # blocks once the server stops reading: in a thread
            with contextlib.suppress(OSError):
                sock.sendall((_head(len(body)) + body) * 60)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "write_timeout"})
            if (got or 0.0) > before:
                break
            time.sleep(0.1)
        sock.close()
        sender.join(5)
    assert (REGISTRY.get_sample_value("ctr_errors_total", {"kind": "write_timeout"}) or 0.0) == (
        before + 1
    )
    # the request waiting for the buffer to drain learns its client left: nothing is
    # written to the dropped transport (uvloop raised there: "Exception in ASGI
    # application" and a 500 counted), it is counted as a client that left
    assert _scored("500") == errors and _scored("499") > gone


def test_a_head_whose_end_straddles_two_reads_is_not_counted_with_its_body(
    server: ServerThread, built: Built
) -> None:
    """The head's end (CR LF CR LF) split across two reads: the second read's body was
    counted as head and a valid 200 KB request was refused with a 431."""
    body = _body(built)
    padded = body[:-1] + b" " * 200_000 + body[-1:]  # JSON whitespace: the same request
    head = _head(len(padded))
    with _connect(server) as sock:
        sock.sendall(head[:-1])
        time.sleep(0.2)
        sock.sendall(head[-1:] + padded)
        got, _ = Responses(sock).next()
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]


def test_trailers_past_the_limit_close_the_connection(server: ServerThread, built: Built) -> None:
    """Chunked trailers go through the same header code as a head: 16 MB of them cost
    the worker about 10 s of CPU. Past MAX_FRAMING_BYTES the connection is closed."""
    from service.front import MAX_FRAMING_BYTES

    body = _body(built)
    head = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    before = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"}) or 0.0
    start = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-T: ")
        with contextlib.suppress(OSError):
            for _ in range(MAX_FRAMING_BYTES // 65536 + 4):
                sock.sendall(b"a" * 65536)
        with contextlib.suppress(ConnectionResetError):  # closed with bytes unread: a reset
            _until_closed(sock)
    assert time.monotonic() - start < 10
    after = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"})
    assert after == before + 1


def test_a_431_lingers_without_a_408_after_it(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """After the 431 the connection is read on for a while: the read timeout's sweep
    wrote a 408 after the write side was shut (an error logged, a timeout counted)."""
    from service.front import MAX_HEAD_BYTES

    timeouts = _timeouts()
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-A: ")  # the parser begins a request
        time.sleep(0.1)
        sock.sendall(b"a" * (MAX_HEAD_BYTES + 10))
        got = sock.recv(65536)
        time.sleep(TIMEOUT_MS / 1000 * 2.5)  # the sweep runs meanwhile
    assert got.startswith(b"HTTP/1.1 431 ")
    assert _timeouts() == timeouts
    assert not [r for r in caplog.records if "write_eof" in r.getMessage()
                or (r.exc_info and "write_eof" in str(r.exc_info[1]))]  # fmt: skip


# ---- session 38 (security review): bodies still arriving are bounded all together -------


@pytest.mark.parametrize("http", [FrontProtocol, TimedProtocol], ids=["front", "plain"])
def test_stalled_bodies_are_bounded_all_together(built: Built, http: Any) -> None:
    """Each connection held a body up to the size limit while it arrived, and nothing
    bounded them together (``CTR_MAX_IN_FLIGHT`` counts a request once its body is read):
    600 stalled 1 MB bodies grew a worker by 440 MB, never given back. Past
    ``CTR_MAX_BODY_BUFFER_BYTES`` a body is refused with 503 ``overloaded``; a body that
    is given up frees its share."""
    app = create_app(settings_for(built, max_body_buffer_bytes=2_000_000, read_timeout_ms=0))
    part = b" " * 900_000  # JSON whitespace: what stays of the body is a valid request
    with ServerThread(app, http=http) as s:
        held = [_connect(s), _connect(s)]
        for sock in held:  # two bodies of 1 MB announced, 0.9 MB of each sent, then stalled
            sock.sendall(_head(1_000_000) + part)
        deadline = time.monotonic() + 10  # both read by the worker before the third comes
        while app.state.ctr.body_bytes < 2 * len(part) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.ctr.body_bytes == 2 * len(part)
        third = _connect(s)
        third.sendall(_head(1_000_000) + part)
        head, body = Responses(third).next()  # answered as it arrives; the rest is read and dropped
        third.close()
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: " in head.lower(), head
        said = json.loads(body)
        assert said["error"] == "overloaded" and "CTR_MAX_BODY_BUFFER_BYTES" in said["detail"]
        small = _body(built)  # a whole request within what is left is served
        with _connect(s) as sock:
            sock.sendall(_head(len(small)) + small)
            assert Responses(sock).next()[0].startswith(b"HTTP/1.1 200")
        for sock in held:  # given up: their shares are freed
            sock.close()
        time.sleep(0.3)
        assert app.state.ctr.body_bytes == 0
        with _connect(s) as sock:
            sock.sendall(_head(len(part) + len(small)) + part + small)
            assert Responses(sock).next()[0].startswith(b"HTTP/1.1 200")


def test_a_malformed_request_behind_one_in_flight_waits_for_its_answer(
    server: ServerThread, built: Built
) -> None:
    """A good request and a malformed one (two Content-Length headers) in one write: the
    parser's 400 was written and the connection closed at once, so the good request's
    answer was dropped and the client read the 400 as its answer (counted 200 or 499,
    and logged as an impression all the same). The 400 now follows the answers before
    it (HTTP review, session 38)."""
    from service import front

    body = _body(built)
    bad = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n"
    front._WARNINGS.clear()  # uvicorn's warning: one line per kind per 10 s (throttled)
    refused = _scored("400", "unparsed")
    for k in range(5):
        with errors_logged(logging.WARNING) as warned, _connect(server) as sock:
            sock.sendall(_head(len(body)) + body + bad)
            answers = Responses(sock)
            first, got = answers.next()
            second, _ = answers.next()
            assert first.startswith(b"HTTP/1.1 200 "), first
            assert json.loads(got)["items"]
            assert second.startswith(b"HTTP/1.1 400 ") and b"connection: close" in second.lower()
            assert answers.buf == b"" and sock.recv(1) == b""  # then closed
        # malformed: uvicorn's warning, the first time; then held back (a client sending
        # malformed requests wrote a line each, ~2000 a second: a security review), each
        # counted in the request metrics (it was in none)
        assert [r.getMessage() for r in warned] == ["Invalid HTTP request received."] * (k == 0)
    assert _scored("400", "unparsed") == refused + 5


def test_a_long_head_behind_another_request_is_refused_too(server: ServerThread) -> None:
    """A head past the limit pipelined behind a short request, in the same write, was
    served (200, 200): the scan of a read stopped at the first head's end. The parser's
    own count of a head refuses it, with its 431 after the first request's answer."""
    from service.front import MAX_HEAD_BYTES

    long_head = (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * (MAX_HEAD_BYTES + 6000)
                 + b"\r\n\r\n")  # fmt: skip
    before = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"}) or 0.0
    with errors_logged(logging.WARNING) as warned, _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + long_head)
        answers = Responses(sock)
        first, _ = answers.next()
        second, said = answers.next()
    assert [r.getMessage() for r in warned] == []  # not "Invalid HTTP request received."
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 431 "), second
    assert json.loads(said)["error"] == "header_too_large"
    after = REGISTRY.get_sample_value("ctr_errors_total", {"kind": "header_too_large"})
    assert after == before + 1
    # alone, and just under the limit behind another: as before
    with _connect(server) as sock:
        sock.sendall(long_head)
        assert _until_closed(sock)[0].startswith(b"HTTP/1.1 431 ")
    short = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * (MAX_HEAD_BYTES - 200)
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + short
                     + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        got, _ = _until_closed(sock)
    assert got.count(b"HTTP/1.1 200 ") == 2, got[:300]


def test_a_body_in_a_transfer_coding_other_than_chunked_is_a_415(
    server: ServerThread, built: Built
) -> None:
    """``Transfer-Encoding: gzip, chunked``: the parser undoes only the chunks, and the
    gzip bytes were read as JSON (a 400 about UTF-8); a compressed body is named as such,
    as ``Content-Encoding: gzip`` is (HTTP review, session 38)."""
    import gzip

    body = gzip.compress(_body(built))
    for coding, status in ((b"gzip, chunked", b"415"), (b"chunked", b"400")):
        head = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        with _connect(server) as sock:
            sock.sendall(head + chunked)
            got, said = Responses(sock).next()
        assert got.startswith(b"HTTP/1.1 " + status), got
        if status == b"415":
            answer = json.loads(said)
            assert answer["error"] == "unsupported_encoding"
            assert answer["field"] == "Transfer-Encoding" and "gzip" in answer["detail"]
    plain = _body(built)  # chunked alone is read as before
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(plain):x}\r\n".encode() + plain + b"\r\n0\r\n\r\n")  # fmt: skip
        assert Responses(sock).next()[0].startswith(b"HTTP/1.1 200 ")


def _slow_scoring(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every scoring request takes ``seconds`` longer (its parse sleeps): one in flight."""
    import service.routes as routes_mod

    real = routes_mod.score_input

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(routes_mod, "score_input", slow)


def test_a_long_head_in_its_own_read_behind_a_request_in_flight_waits(
    server: ServerThread, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same long head sent in a read of its own while the request before it is
    still being answered: the scan refused it before the parser had begun it, took the
    connection for idle, and answered 431 at once (the client read it as its score's
    answer; the score's write then failed, a 500 with a traceback)."""
    _slow_scoring(monkeypatch, 0.5)
    failed = _scored("500")
    body = _body(built)
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body)
        time.sleep(0.2)  # the score in flight
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n")
        answers = Responses(sock)
        first, _ = answers.next()
        second, _ = answers.next()
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 431 "), first
    assert _scored("500") == failed


def test_a_pipelined_answer_to_a_client_gone_is_no_500(
    server: ServerThread, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow score with a request pipelined behind it, the client gone meanwhile:
    uvicorn marked only the newest request's cycle, and the score's answer written to
    the closed transport was a RuntimeError, a 500 and a traceback."""
    _slow_scoring(monkeypatch, 0.4)
    failed = _scored("500")
    body = _body(built)
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # both read, the score in flight
    time.sleep(1.0)  # the score ends after its client has gone
    assert _scored("500") == failed


# ---- session 39: a malformed body behind requests in flight waits for their answers -----

CHUNKED = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_BODIES = {
    "bad chunk size": CHUNKED + b"zz\r\nabc\r\n",
    "chunk not ended by CR LF": CHUNKED + b"3\r\nabcXY\r\n0\r\n\r\n",
}


@contextlib.contextmanager
def errors_logged(level: int = logging.ERROR) -> Iterator[list[logging.LogRecord]]:
    """Records of ``level`` (ERROR: tracebacks, 500s) and above on uvicorn's error log
    meanwhile."""
    seen: list[logging.LogRecord] = []
    catch = logging.Handler(level)
    catch.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(catch)
    try:
        yield seen
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catch)


@pytest.mark.parametrize("http", [FrontProtocol, TimedProtocol], ids=["front", "plain"])
def test_a_malformed_body_behind_requests_in_flight_follows_their_answers(
    built: Built, monkeypatch: pytest.MonkeyPatch, http: Any
) -> None:
    """A request whose body the parser refuses (a bad chunk size, a chunk not ended by
    CR LF), queued behind requests still being answered: its 400 was written and the
    connection closed at once, so their answers were dropped and the client read the
    400 as the first one's answer (counted 200 or 499, and logged as an impression all
    the same). Now their answers come first, then the 400, then the close; the refused
    request is counted once on its route (400), is no impression, and its queued cycle
    never answers (session 39)."""
    from redis import Redis

    from service import scoring

    real = scoring.score

    async def slow(*args: Any, **kwargs: Any) -> Any:  # each score in flight a while
        await asyncio.sleep(0.3)
        return await real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score", slow)
    stream = "test:front-body-impressions"
    redis = Redis.from_url(REDIS_URL)
    redis.delete(stream)
    statuses = ("200", "400", "499", "500")
    before = {s: _scored(s) for s in statuses}
    body = _body(built)
    good = _head(len(body)) + body
    app = create_app(settings_for(built, read_timeout_ms=TIMEOUT_MS, impression_stream=stream))
    try:
        with ServerThread(app, http=http, timeout_keep_alive=30) as s, errors_logged() as errors:
            for case, bad in BAD_BODIES.items():
                with _connect(s) as sock:
                    if case == "bad chunk size":  # in the same write as the one before it
                        sock.sendall(good + bad)
                        ahead = 1
                    else:  # in a read of its own, behind two: one in flight, one queued
                        sock.sendall(good)
                        time.sleep(0.1)
                        sock.sendall(good + bad)
                        ahead = 2
                    answers = Responses(sock)
                    for _ in range(ahead):
                        head, said = answers.next()
                        assert head.startswith(b"HTTP/1.1 200 "), (case, head)
                        assert json.loads(said)["items"]
                    head, said = answers.next()
                    assert head.startswith(b"HTTP/1.1 400 "), (case, head)
                    assert b"connection: close" in head.lower()
                    assert said == b"Invalid HTTP request received."
                    assert answers.buf == b"" and sock.recv(1) == b"", case  # then closed
            counts = {"200": 3, "400": 2, "499": 0, "500": 0}
            deadline = time.monotonic() + 5  # the refused handler counts as its task ends
            while time.monotonic() < deadline:
                got = {s: _scored(s) - before[s] for s in statuses}
                if got == counts:
                    break
                time.sleep(0.02)
            assert got == counts
            deadline = time.monotonic() + 5
            while redis.xlen(stream) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # nothing more comes
            assert redis.xlen(stream) == 3  # the answers written; the refused ones not
        assert not errors, [r.getMessage() for r in errors]
    finally:
        redis.delete(stream)
        redis.close()


@pytest.mark.parametrize("bad", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_a_malformed_body_of_the_only_request_in_flight_is_refused_at_once(
    server: ServerThread, bad: bytes
) -> None:
    """Nothing before it on the connection: its 400 at once and the connection closed,
    as before; recorded on its route as the 400 it was answered (not 499, a client gone:
    its handler, waiting for the body, learns of the close)."""
    before = (_scored("400"), _scored("499"))
    with _connect(server) as sock, errors_logged() as errors:
        sock.sendall(bad)
        got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.1 ") == 1, got[:200]
    assert got.endswith(b"\r\n\r\nInvalid HTTP request received.") and took < 5
    deadline = time.monotonic() + 5
    while _scored("400") == before[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (_scored("400"), _scored("499")) == (before[0] + 1, before[1])
    assert not errors, [r.getMessage() for r in errors]


def test_a_url_the_parser_refuses_behind_a_request_waits_for_its_answer(
    server: ServerThread, built: Built
) -> None:
    """A head whose URL httptools cannot parse (a port past 65535) is refused at the
    head's end, where uvicorn's callback raises: that was taken for a body and answered
    at once, dropping the answer before it, as a malformed head's was."""
    body = _body(built)
    bad = b"GET http://a:99999999/ HTTP/1.1\r\nHost: t\r\n\r\n"
    first, second = _score_then_closed(server, body, bad)
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 400 "), first


def test_trailer_fields_are_not_read_as_headers(server: ServerThread, built: Built) -> None:
    """A chunked body's trailer fields (RFC 9110 6.5.1) are not the request's headers:
    uvicorn appended them to the scope's header list, so a trailer parsed before the
    handler read its headers counted as one (an ``X-API-Key`` trailer opened protected
    scoring; ``Content-Encoding: gzip`` made a plain body a 415; HTTP review, session
    45). Sent in the head's write, and behind a pipelined request."""
    body = _body(built)
    head = b"POST /v1/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = b"%x\r\n" % len(body) + body + b"\r\n"
    trailers = b"0\r\nX-Request-ID: from-trailer\r\nContent-Encoding: gzip\r\n\r\n"
    one = head + chunked + trailers
    for sent, answers in ((one, 1), (_head(len(body)) + body + one, 2)):
        with _connect(server) as sock:
            sock.sendall(sent)
            got = Responses(sock)
            for _ in range(answers):
                answer, said = got.next()
                assert answer.startswith(b"HTTP/1.1 200 "), (answer, said)
                assert b"from-trailer" not in answer.lower()
                assert json.loads(said)["request_id"] != "from-trailer"
    # the trailers themselves are still taken (and the framing limit counts them)
    with _connect(server) as sock:
        sock.sendall(one + _head(len(body)) + body)
        got = Responses(sock)
        assert got.next()[0].startswith(b"HTTP/1.1 200 ")
        assert got.next()[0].startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("route", ["/v1/score", "/v1/events"])
def test_a_refusal_before_100_continue_closes_the_connection(
    server: ServerThread, built: Built, route: str
) -> None:
    """``Expect: 100-continue`` refused on its head alone (a 415 here): the client was
    never asked for its body, so the connection closes after the answer, saying
    ``connection: close``; kept open, the parser read the client's next request as that
    body (it waited for the read timeout, or answered 400). Asked for, the body is
    scored and the connection kept (the scoring route under the front, every other
    route through ASGI: HTTP review, session 45)."""
    body = _body(built)
    expect = f"POST {route} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
    refused = f"{expect}Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(refused.encode())
        answer, said = Responses(sock).next()
        assert answer.startswith(b"HTTP/1.1 415 "), (answer, said)
        assert b"\r\nconnection: close" in answer.lower()
        start = time.monotonic()
        rest = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # closed: unread
            sock.sendall(_head(len(body)) + body)  # what the client sends next, if anything
            rest, _ = _until_closed(sock)
        assert rest == b"" and time.monotonic() - start < TIMEOUT_MS / 1000 / 2
    # the body already all sent (or none at all): nothing is in doubt, the connection
    # is kept and the request behind it answered (diff review: both were closed)
    got_body = f"{expect}Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    bodiless = "GET /healthz HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n"
    for sent in (got_body.encode() + body, bodiless.encode()):
        with _connect(server) as sock:
            sock.sendall(sent + _head(len(body)) + body)
            got = Responses(sock)
            answer, _ = got.next()
            assert answer.startswith((b"HTTP/1.1 415 ", b"HTTP/1.1 200 ")), answer
            assert b"connection: close" not in answer.lower()
            assert got.next()[0].startswith(b"HTTP/1.1 200 ")
    if route != "/v1/score":
        return
    with _connect(server) as sock:  # asked for: 100 Continue, the body, kept open
        sock.sendall(f"{expect}Content-Length: {len(body)}\r\n\r\n".encode())
        got = Responses(sock)
        while b"\r\n\r\n" not in got.buf:
            got._more("100 Continue")
        assert got.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got.buf
        got.buf = got.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
        sock.sendall(body)
        answer, _ = got.next()
        assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in answer.lower()
        sock.sendall(_head(len(body)) + body)
        assert got.next()[0].startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("head", "status", "field"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"400", "Host"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nhost: b\r\n\r\n", b"400", "Host"),
        (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", b"400", "Host"),
        (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", b"505", "HTTP-version"),
        (b"GET /healthz HTTP/0.9\r\nHost: a\r\n\r\n", b"505", "HTTP-version"),
    ],
    ids=["no-host", "two-hosts", "two-hosts-1.0", "http-2.0", "http-0.9"],
)
def test_a_head_http_1_1_forbids_is_refused_after_the_answers_before_it(
    server: ServerThread, head: bytes, status: bytes, field: str
) -> None:
    """RFC 9112 3.2 and 2.3: an HTTP/1.1 request with no Host, any request with two, and
    an HTTP version other than 1.0 or 1.1 were answered 200 (an HTTP review, session 45):
    now a 400 or 505 naming the field, after the answer of the request before it on the
    connection, and the connection closed."""
    refused = _scored(status.decode(), "unparsed")
    with errors_logged(logging.WARNING) as warned, _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + head)
        answers = Responses(sock)
        first, _ = answers.next()
        second, said = answers.next()
        assert answers.buf == b"" and sock.recv(1) == b""  # then closed
    # not logged as malformed (uvicorn's "Invalid HTTP request received."): it is not
    assert [r.getMessage() for r in warned] == []
    assert first.startswith(b"HTTP/1.1 200 "), first
    assert second.startswith(b"HTTP/1.1 " + status + b" "), second
    assert b"connection: close" in second.lower()
    answer = json.loads(said)
    kind = "bad_host" if field == "Host" else "http_version_not_supported"
    assert (answer["field"], answer["error"]) == (field, kind)
    assert _scored(status.decode(), "unparsed") == refused + 1


def test_an_http_1_0_request_without_host_is_served(server: ServerThread) -> None:
    """Host is HTTP/1.1's: an HTTP/1.0 request without one is answered (and closed)."""
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        got, _ = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
