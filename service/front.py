"""uvicorn's HTTP protocol, with the app's hot routes served without ASGI.

``ctr serve`` runs uvicorn with :class:`FrontProtocol` (``CTR_HTTP_FRONT``). For a
request to one of :class:`~service.app.ScoringApp`'s ``fast_routes`` (``POST
/v1/score``) it starts :func:`serve_direct` instead of the ASGI call: the same handler,
request ID, metrics and error bodies as :meth:`ScoringApp.__call__ <service.app.ScoringApp>`,
but no ASGI scope walk by uvicorn's proxy-headers middleware, no ``receive``/``send``
messages, no Starlette ``Response.__call__`` and no header check of uvicorn's ``send``:
the response's head and body are joined and written to the socket in one call.

Everything else stays uvicorn's: its HTTP parser, keep-alive and its timeout,
pipelined requests (queued, started in order by ``on_response_complete``), flow
control, ``Expect: 100-continue``, the concurrency limit's 503, graceful shutdown
(``cycle.keep_alive`` is read when the response is written), the ``Date`` and
``Server`` headers and the access log (with the client address uvicorn's
proxy-headers middleware would give). Every other route, and any app that is not a
``ScoringApp`` behind at most that middleware, goes through ASGI as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Callable
from logging import INFO
from typing import Any

import uvicorn
from starlette.responses import Response
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from service import metrics as m
from service.app import ScoringApp
from service.asgi import (
    CLIENT_CLOSED,
    CLIENT_GONE,
    MALFORMED_BODY,
    READ_TIMED_OUT,
    SERVE_TASK,
    Handler,
    cors_headers,
    gone_status,
    request_headers,
    written,
)
from service.handlers import internal_error_response, shutdown_response
from service.requestid import CURRENT, HEADER, request_id
from service.serving import answer
from service.throttle import Throttle, held_note

log = logging.getLogger("uvicorn.error")
# the route label of a request refused before its head was all read (431, 408)
UNPARSED = "unparsed"

# what this module reads and sets of uvicorn's request cycle (all set in its __init__)
CYCLE_FIELDS = (
    "scope", "transport", "flow", "access_log", "access_logger", "default_headers",
    "keep_alive", "on_response", "message_event", "response_started", "response_complete",
    "waiting_for_100_continue", "disconnected",
)  # fmt: skip


def supported() -> bool:
    """Whether the installed uvicorn has what :class:`FrontProtocol` builds on: the
    protocol's ``_start_asgi_task`` and the cycle's fields and methods (another version
    may not: then every request goes through ASGI, with a warning at start)."""
    names = set(RequestResponseCycle.__init__.__code__.co_names)
    return (
        callable(getattr(HttpToolsProtocol, "_start_asgi_task", None))
        and callable(getattr(RequestResponseCycle, "receive", None))
        and callable(getattr(RequestResponseCycle, "send_500_response", None))
        and names.issuperset(CYCLE_FIELDS)
    )


SUPPORTED = supported()


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    return None


def _front(app: Any) -> tuple[Any, ProxyHeadersMiddleware | None]:
    """The :class:`~service.app.ScoringApp` uvicorn serves, and a proxy-headers
    middleware that only rewrites a scope (for the access log) where uvicorn wraps the
    app in one; ``(None, None)`` for any other layout."""
    proxy = None
    if isinstance(app, ProxyHeadersMiddleware):
        proxy = ProxyHeadersMiddleware(_noop)
        proxy.trusted_hosts = app.trusted_hosts
        app = app.app
    if isinstance(app, ScoringApp):
        return app, proxy
    return None, None


def _read_timeout(config: Any) -> float:
    """The served app's ``read_timeout_s`` (``CTR_READ_TIMEOUT_MS``), found through any
    middleware uvicorn wraps it in (proxy headers; at ``trace`` level its message
    logger); 0 (none) for an app that is not the service's."""
    app = config.loaded_app
    for _ in range(8):
        if isinstance(app, ScoringApp):
            return float(app.read_timeout_s or 0.0)
        app = getattr(app, "app", None)
    return 0.0


def _front_of(config: Any) -> tuple[Any, ProxyHeadersMiddleware | None]:
    """:func:`_front` of the server's app, worked out once per server (kept on its
    config): a proxy-headers middleware holds a reference cycle (its trusted hosts'
    cache), which made once per connection would be garbage for the collector."""
    app = config.loaded_app
    kept = getattr(config, "_ctr_front", None)
    if kept is None or kept[0] is not app:
        kept = (app, *_front(app))
        config._ctr_front = kept
    return kept[1], kept[2]


# the longest request head (request line and headers) read; uvicorn's httptools
# protocol has no limit (h11's is 16 KB)
MAX_HEAD_BYTES = 64 * 1024
# a message's non-body bytes after its head (chunk sizes, trailers) read at most
MAX_FRAMING_BYTES = 1 << 20
LINGER_S = 2.0  # how long a refused connection is read on (and dropped) before it closes
# how long an idle connection is read on once a graceful shutdown begins (TimedProtocol
# .shutdown): a request already sent is answered, not reset
SHUTDOWN_LINGER_S = 0.2


_WARNINGS: dict[str, Throttle] = {}  # uvicorn's warning text -> its throttle (_ParseLog)


class _ParseLog:
    """The protocol's ``logger`` (uvicorn's ``uvicorn.error``) with two changes to
    uvicorn's warnings. "Invalid HTTP request received." where the parse was stopped by
    the protocol itself (a head past ``MAX_HEAD_BYTES`` or one
    :meth:`TimedProtocol.check_head` refuses: well formed, and answered for a stated
    reason, 431, 400 ``bad_host``, 505) is logged at debug level as that refusal; the
    warning said each such request was malformed. And uvicorn's own warnings, one line
    per request, are one line per kind per ``throttle.PERIOD_S`` in each worker, saying
    how many were held back (:func:`warning`)."""

    def __init__(self, protocol: TimedProtocol, logger: logging.Logger) -> None:
        # weak: a strong reference made each connection a cycle for the collector
        self.protocol = weakref.ref(protocol)
        self.logger = logger

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        protocol = self.protocol()
        refused = None if protocol is None else protocol.refusing()
        if refused is not None:
            self.logger.debug("request head refused: %s", refused)
            return
        # uvicorn's own warnings are one line per request ("Invalid HTTP request
        # received.", "Unsupported upgrade request."): a client sending malformed
        # requests wrote ~2000 lines a second, synchronously, on the event loop, with the
        # access log off (a security review). One line per kind per PERIOD_S, saying how
        # many were held back; the request metrics count each (route "unparsed")
        throttle = None
        if isinstance(msg, str) and not args:  # uvicorn's are constant texts: at most 32
            throttle = _WARNINGS.get(msg)
            if throttle is None and len(_WARNINGS) < 32:
                throttle = _WARNINGS[msg] = Throttle()
        if throttle is None:
            self.logger.warning(msg, *args, **kwargs)
        elif (due := throttle.ready()) is not None:
            self.logger.warning("%s%s", msg, held_note(due), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)


class TimedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on how long a request takes to arrive
    (``CTR_READ_TIMEOUT_MS``, the served app's ``read_timeout_s``): uvicorn has none, so
    a client that sends part of a request's head or body, or opens a connection and
    sends nothing, held it for good (a few such clients hold a worker's sockets).

    The clock starts when the connection opens and again at each request's first byte;
    it stops at the request's last byte, while the app answers (uvicorn's keep-alive
    timeout then covers the wait for the next request). Past it the connection is
    closed, counted in ``ctr_errors_total{kind="request_timeout"}``: a request whose
    head had not all come, on a connection with nothing else in flight, gets a 408
    first; a request whose body had not all come is ended as a client that left (its
    handler sees the disconnect; status 499 in the request metrics); a connection that
    sent nothing is closed without a word, as an idle keep-alive one is. The times are
    read by :class:`ReadSweeper` every quarter of the timeout (at most every second), so
    a connection ends between the timeout and a quarter of it (or a second) later.

    Two more bounds uvicorn lacks: a request head longer than ``MAX_HEAD_BYTES`` is
    refused (431) before the parser reads more of it, and a connection whose client has
    read nothing of the answers for ``read_timeout`` (the transport's buffer full) is
    dropped, counted as ``write_timeout``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = _read_timeout(self.config)
        # loop.time() when the request now arriving began to (or the connection opened);
        # None while none is: what ReadSweeper looks at, no timer per request
        self.read_started: float | None = None
        self.reading = False  # a request's bytes have begun to come, not all yet
        self.head_done = False  # and its head has all come
        self.head_bytes = 0  # of the head now arriving (MAX_HEAD_BYTES)
        # of the head now parsed, as the parser gives it (its request line and headers):
        # a head that begins and ends in one read behind another request is not counted
        # by data_received's scan, which stops at the first head's end
        self.parsed_head = 0
        self.head_over = False  # the parse stopped on a head past MAX_HEAD_BYTES
        self.hosts = 0  # Host header lines of the head now parsed
        # the parse stopped on a head refused for what it says (:meth:`check_head`):
        # its status, error kind, field and detail
        self.bad_head: tuple[int, str, str, str] | None = None
        self.head_tail = b""  # the last bytes of a head's read so far (its end may straddle)
        self.framing_bytes = 0  # the message's non-body bytes after its head
        self.fed_body = 0  # body bytes the parser gave in the current read
        self.running_cycle: RequestResponseCycle | None = None  # the one whose task runs
        self.discarding = False  # refused: what comes is read and dropped until closed
        # a refusal (a malformed request's 400, a long head's 431) held until the
        # requests before it on the connection are answered (:meth:`refuse`)
        self.pending: Callable[[], None] | None = None
        # a graceful shutdown began while the connection was idle: it reads on a moment
        # (SHUTDOWN_LINGER_S) before it closes (:meth:`shutdown`)
        self.stopping = False
        self.linger: asyncio.TimerHandle | None = None
        self.write_paused_at: float | None = None  # loop.time() the transport filled up
        self.logger = _ParseLog(self, self.logger)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.read_timeout > 0:
            self.read_started = self.loop.time()
            ReadSweeper.of(self).start()

    def connection_lost(self, exc: Exception | None) -> None:
        self.read_started = None
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        # every request still being answered learns its client left (uvicorn marks only
        # the newest): a pipelined request's answer written to the closed transport was
        # a RuntimeError, a 500 and a traceback, where the client had gone (499)
        for cycle in (self.running_cycle, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.scope[CLIENT_GONE] = True  # type: ignore[typeddict-unknown-key]
                cycle.message_event.set()
                # a fast route's request (serve_direct, or through ASGI: SERVE_TASK)
                # stops its work: it held its in-flight place, Redis read and graph
                # call for nobody, refusing live clients meanwhile (an overload
                # review); any other route's task is left to end as uvicorn ends it
                task = getattr(cycle, FRONT_TASK, None) or cycle.scope.get(SERVE_TASK)
                if task is not None and not cycle.response_started:
                    task.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading = True
        self.head_done = False
        self.parsed_head = 0
        self.hosts = 0
        self.framing_bytes = 0
        if self.read_timeout > 0:
            self.read_started = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if self.discarding:  # refused: read on only so that the refusal is not reset
            return
        in_body = self.reading and self.head_done
        if not in_body:  # a head is arriving (or may begin): counted before the parser
            tail = self.head_tail  # a head's end may straddle two reads: look there first
            if tail and (tail + data[:3]).find(b"\r\n\r\n") >= 0:
                end = 0
            else:
                end = data.find(b"\r\n\r\n")
            self.head_bytes += len(data) if end < 0 else end
            self.head_tail = data[-3:] if len(data) >= 3 else (tail + data)[-3:]
            if self.head_bytes > MAX_HEAD_BYTES:
                self.head_too_large()
                return
        self.fed_body = 0
        super().data_received(data)
        if in_body:  # what was not body: chunk sizes, trailers (their headers too)
            self.framing_bytes += len(data) - self.fed_body
            if self.framing_bytes > MAX_FRAMING_BYTES and not self.transport.is_closing():
                m.ERRORS.labels("header_too_large").inc()
                self.transport.close()  # the request is in flight: no answer to give

    def on_body(self, body: bytes) -> None:
        self.fed_body += len(body)
        super().on_body(body)

    def refuse(self, answer: Callable[[], None]) -> None:
        """Stop reading the request now arriving, refused: ``answer`` it at once, or,
        where requests before it on the connection are still being answered
        (pipelined), once they are (:meth:`on_response_complete`): closing at once
        dropped their answers, and the client read the refusal as the first one's."""
        self.discarding = True  # read on and drop what comes: no more requests parsed
        self.read_started = None  # no read timeout's 408 after this answer
        if self.busy():
            self.pending = answer
        else:
            answer()

    def head_too_large(self) -> None:
        """A head past ``MAX_HEAD_BYTES``: refused before the parser sees more of it
        (httptools joins a header's pieces one copy at a time: a 64 MB header held the
        event loop for seconds), with a 431 (once the requests before it on the
        connection are answered), and the connection closed."""
        m.ERRORS.labels("header_too_large").inc()
        detail = f"the request's head is longer than {MAX_HEAD_BYTES} bytes"
        self.refuse_head(431, "header_too_large", detail)

    def refuse_head(self, status: int, kind: str, detail: str, field: str = "headers") -> None:
        """Stop reading the head now arriving and answer it ``status`` (:meth:`refuse`:
        after the requests before it on the connection), then close."""
        started = self.read_started
        self.reading = False
        self._unset_keepalive_if_required()  # nor uvicorn's keep-alive close mid-linger
        self.refuse(lambda: self._send_refusal(started, status, kind, detail, field))

    def _send_refusal(
        self, started: float | None, status: int, kind: str, detail: str, field: str = "headers"
    ) -> None:
        """Answer a head refused before any route (:func:`_refusal`) and close."""
        self.count_refusal(status, 0.0 if started is None else self.loop.time() - started)
        self.transport.write(
            _refusal(self.server_state.default_headers, status, kind, detail, field)
        )
        # a close with the client's bytes unread would reset the connection, and the
        # client might lose the answer: end the writing side, read on and drop what
        # comes, and close once the client does (or after LINGER_S)
        self.discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.write_paused_at = self.loop.time()
        if self.read_timeout > 0:
            ReadSweeper.of(self).start()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused_at = None

    def write_timed_out(self) -> None:
        """The client has read none of what the service wrote for ``read_timeout``
        (the socket's buffers full): the connection is dropped, what it held with it
        (uvicorn would wait for good; answers pile up in memory)."""
        self.write_paused_at = None
        m.ERRORS.labels("write_timeout").inc()
        # every request of the connection learns its client left: the one waiting for
        # the buffer to drain writes nothing (uvicorn marks only the newest cycle)
        cycles = [self.running_cycle, self.cycle, *(c for c, _ in self.pipeline)]
        for cycle in cycles:
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        self.transport.abort()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.running_cycle = cycle
        if cycle.waiting_for_100_continue:
            _close_unless_continued(cycle)
        super()._start_asgi_task(cycle, app)

    def on_url(self, url: bytes) -> None:
        self.parsed_head += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            # a chunked body's trailer field (counted in MAX_FRAMING_BYTES), not a header
            # (RFC 9110 6.5.1): uvicorn appends it to the request's header list, which
            # is the scope's, so a trailer parsed before the handler read the headers
            # (in the head's read, or behind a pipelined request) counted as one: an
            # X-API-Key trailer opened protected scoring (HTTP review, session 45)
            return
        self.parsed_head += len(name) + len(value) + 4
        if len(name) == 4 and name.lower() == b"host":
            self.hosts += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parsed_head > MAX_HEAD_BYTES:  # stops the parse: send_400_response
            self.head_over = True
            raise HeadTooLarge
        self.check_head()
        self.head_bytes = 0
        self.head_tail = b""
        super().on_headers_complete()
        # done once uvicorn has made the request's cycle: a head it refuses (a URL
        # httptools cannot parse) is a malformed head (send_400_response), not a body
        self.head_done = True
        if self.stopping and self.cycle is not None:  # came while the connection lingered
            self.cycle.keep_alive = False  # answered, then closed

    def check_head(self) -> None:
        """Refuse a head HTTP/1.1 says no server may answer (RFC 9112 2.3, 3.2): an
        HTTP version other than 1.0 and 1.1 (505: httptools parses ``HTTP/2.0`` and
        ``HTTP/0.9``, answered as HTTP/1.1 by uvicorn; other versions are its 400), two or more
        ``Host`` lines, or none in an HTTP/1.1 request (400; uvicorn answered both, and
        a proxy in front may have routed by another Host than the service read). Raised
        in the parser's callback, so the parse stops there (:meth:`send_400_response`)."""
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            detail = f"HTTP/{version[:10]} is not served: send HTTP/1.1 (or 1.0)"
            self.bad_head = (505, "http_version_not_supported", "HTTP-version", detail)
        elif self.hosts > 1:
            detail = f"the request has {self.hosts} Host headers: send exactly one"
            self.bad_head = (400, "bad_host", "Host", detail)
        elif self.hosts == 0 and version == "1.1":
            detail = "an HTTP/1.1 request must have a Host header"
            self.bad_head = (400, "bad_host", "Host", detail)
        else:
            return
        raise BadHead

    def shutdown(self) -> None:
        """A graceful shutdown (SIGTERM) begins. uvicorn closed an idle keep-alive
        connection at once: a request its client had already sent, in the socket unread
        or on its way, was lost to a reset, with no answer (a review: 24 of 180 requests
        in flight when a 3-worker service was stopped under load; behind a load balancer
        each a 502). An idle connection is read on for ``SHUTDOWN_LINGER_S``: a request
        that comes is answered with ``connection: close``; none, it closes. A connection
        with a request being answered closes after its answer, as uvicorn's."""
        self.stopping = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        elif self.linger is None and not self.transport.is_closing():
            self.linger = self.loop.call_later(SHUTDOWN_LINGER_S, self._end_idle)

    def _end_idle(self) -> None:
        self.linger = None
        cycle = self.cycle
        if self.reading or (cycle is not None and not cycle.response_complete):
            return  # a request came: closed after its answer (or by the read timeout)
        self.transport.close()

    def on_message_complete(self) -> None:
        self.reading = False
        self.read_started = None
        self.head_bytes = 0
        self.head_tail = b""
        super().on_message_complete()

    def refusing(self) -> str | None:
        """Why the protocol stopped the parse of the head now arriving (on purpose, not
        malformed), or None."""
        if self.head_over:
            return f"431 header_too_large: longer than {MAX_HEAD_BYTES} bytes"
        if self.bad_head is not None:
            status, kind, _, detail = self.bad_head
            return f"{status} {kind}: {detail}"
        return None

    def send_400_response(self, msg: str) -> None:
        if self.head_over:  # not malformed: too long (on_headers_complete)
            self.head_over = False
            self.head_too_large()
            return
        if self.bad_head is not None:  # not malformed: refused (check_head)
            status, kind, field, detail = self.bad_head
            self.bad_head = None
            self.refuse_head(status, kind, detail, field)
            return
        if self.head_done:  # a body: its request's cycle was made with its head
            self.malformed_body(msg)
            return
        # a malformed head, behind requests still being answered (pipelined) or not: its
        # 400 follows their answers (:meth:`refuse`), counted as the other refusals of a
        # head (it was in no metric: its log line, now throttled, was all)
        send = super().send_400_response
        started = self.read_started

        def answer() -> None:
            self.count_refusal(400, 0.0 if started is None else self.loop.time() - started)
            send(msg)

        self.refuse(answer)

    def malformed_body(self, msg: str) -> None:
        """The parser refused the body of the request now arriving (a bad chunk size):
        the 400, and the connection closed. The only request in flight: at once (its
        handler, waiting for the body, sees the close and records the 400). Queued
        behind requests still being answered (pipelined): the 400 follows their answers
        (:meth:`refuse`), and the request is taken out of the queue, never to answer
        (its handler is run at once with nobody to answer, so that it records the 400 on
        its own route); an immediate close had dropped their answers, and the client read
        the 400 as the first one's."""
        cycle = self.cycle
        cycle.scope[MALFORMED_BODY] = True  # type: ignore[typeddict-unknown-key]
        send = super().send_400_response
        if not (self.pipeline and self.pipeline[0][0] is cycle):
            send(msg)
            return
        self.refuse(lambda: send(msg))  # held: busy() while it is still in the queue
        _, app = self.pipeline.popleft()  # then out of it: uvicorn never starts it
        cycle.disconnected = True  # nothing written, no 100 Continue, no access line
        cycle.waiting_for_100_continue = False
        cycle.message_event.set()
        # uvicorn's own start (ASGI): not the connection's running request
        HttpToolsProtocol._start_asgi_task(self, cycle, app)
        self.flow.resume_reading()  # read on and drop what comes (refuse)

    def on_response_complete(self) -> None:
        if self.pending is not None and not self.pipeline:
            answer, self.pending = self.pending, None
            self.server_state.total_requests += 1  # as uvicorn's own end of a response
            answer()
            return
        # after a head asking to switch protocols (Upgrade: h2c, ...) the parser reads
        # no more HTTP on this connection: close it once it is answered, and any request
        # queued before it (uvicorn kept it open, a pipelined request after it never
        # answered, until the keep-alive timeout)
        if self.parser is not None and self.parser.should_upgrade() and not self.pipeline:
            self.transport.close()
        super().on_response_complete()
        if self.reading and self.read_started is not None:
            # the clock of a request still arriving counts from when nothing else on
            # the connection is in flight: uvicorn stops reading behind a queued request
            self.read_started = self.loop.time()

    def busy(self) -> bool:
        """Another request of this connection is in flight (its answer not written):
        the request now arriving waits behind it, and uvicorn may have stopped reading
        meanwhile, so its clock does not run."""
        if self.pipeline:  # this request's head came in while an earlier one ran
            return True
        # self.cycle is the previous request's until this one's head is complete; the
        # scan of a read may refuse a head before the parser has begun it (head_done
        # still the previous request's)
        arriving = self.reading and self.head_done  # this request's body: its own cycle
        cycle = self.cycle
        return not arriving and cycle is not None and not cycle.response_complete

    def timed_out(self) -> None:
        """The request took longer than ``read_timeout`` to arrive, with nothing else of
        its connection in flight: close (class doc)."""
        self.read_started = None
        if self.transport.is_closing() or self.discarding:
            return
        if self.reading:
            m.ERRORS.labels("request_timeout").inc()
            if not self.head_done:
                self.count_refusal(408, self.read_timeout)
                self.transport.write(_timeout_answer(self.server_state.default_headers,
                                                     self.read_timeout))  # fmt: skip
            elif self.cycle is not None:  # the app waits for the body: it records the 408
                self.cycle.scope[READ_TIMED_OUT] = True  # type: ignore[typeddict-unknown-key]
        self.transport.close()

    def count_refusal(self, status: int, seconds: float = 0.0) -> None:
        """A request refused before any route (its head not all read, or refused for
        what it says: :meth:`check_head`):
        ``ctr_request_duration_seconds{route="unparsed", method="other"}``."""
        m.REQUEST(UNPARSED, "other", str(status)).observe(seconds)


def _close_unless_continued(cycle: RequestResponseCycle) -> None:
    """A request with ``Expect: 100-continue`` answered before its body was asked for
    (a 413, 415, 401, 403 or 405 from its head alone) while its body has not all come
    closes its connection once answered, with ``connection: close``: its client was
    never sent 100 Continue and may never send the body, which the parser still waits
    for; kept open, the next request on the connection was read as that body (HTTP
    review, session 45; Go's net/http closes too). A body already all read (or none, a
    GET) leaves nothing in doubt: the connection is kept (diff review). ``cycle.send``
    is wrapped for this request only, until its answer starts."""
    send = cycle.send

    async def send_closing(message: Any) -> None:
        if message["type"] == "http.response.start":
            cycle.__dict__.pop("send", None)  # no cycle <-> closure loop left for the gc
            if cycle.waiting_for_100_continue and cycle.more_body:
                cycle.keep_alive = False
        await send(message)

    cycle.send = send_closing  # type: ignore[method-assign]


class BadHead(Exception):
    """Raised by the parser's callback for a head :meth:`TimedProtocol.check_head`
    refuses (the parser then stops, and uvicorn calls ``send_400_response``)."""


class HeadTooLarge(Exception):
    """Raised by the parser's callback for a head past ``MAX_HEAD_BYTES`` (the parser
    then stops, and uvicorn calls :meth:`TimedProtocol.send_400_response`)."""


class ReadSweeper:
    """One per server (kept on uvicorn's server state, beside its set of connections):
    while any connection is open, every ``interval`` seconds (a quarter of the read
    timeout, at most 1 s) it ends the :class:`TimedProtocol` connections whose request
    has been arriving for longer than their read timeout. A request so costs two
    attribute writes, not a timer armed and cancelled."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, connections: set[Any], timeout: float
    ) -> None:
        self.loop = loop
        self.connections = connections
        self.interval = min(1.0, max(timeout / 4, 0.01))
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, conn: TimedProtocol) -> ReadSweeper:
        state = conn.server_state
        sweeper = getattr(state, "ctr_read_sweeper", None)
        if sweeper is None:
            sweeper = cls(conn.loop, state.connections, conn.read_timeout)
            state.ctr_read_sweeper = sweeper  # type: ignore[attr-defined]
        return sweeper

    def start(self) -> None:
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.sweep)

    def sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        for conn in list(self.connections):
            paused = getattr(conn, "write_paused_at", None)
            if paused is not None and now - paused > conn.read_timeout:
                try:
                    conn.write_timed_out()
                except Exception:
                    log.exception("dropping a connection that reads nothing failed")
                continue
            started = getattr(conn, "read_started", None)
            if started is not None and now - started > conn.read_timeout and not conn.busy():
                try:
                    conn.timed_out()
                except Exception:  # one connection's failure must not stop the sweeps
                    log.exception("closing a connection past its read timeout failed")
        if self.connections:  # none open: the next connection starts it again
            self.start()


def _timeout_answer(default_headers: list[tuple[bytes, bytes]], timeout_s: float) -> bytes:
    """The 408 for a request whose head did not all come in time."""
    detail = (f"the request's headers did not all arrive within {timeout_s * 1000:.0f} ms "
              "(CTR_READ_TIMEOUT_MS)")  # fmt: skip
    return _refusal(default_headers, 408, "request_timeout", detail)


def _refusal(
    default_headers: list[tuple[bytes, bytes]],
    status: int,
    kind: str,
    detail: str,
    field: str = "headers",
) -> bytes:
    """An answer the protocol gives before any request reached the app (its head did
    not all come, or is too large): the service's error body naming the headers, with a
    request ID of its own (no header of the request's was read), and the connection
    closed."""
    from service.asgi import orjson_response  # the error bodies' one writer

    rid = request_id(None)
    body = orjson_response(
        {"error": kind, "field": field, "detail": detail, "request_id": rid}, status
    )
    content = [STATUS_LINE[status]]
    for name, value in [*default_headers, *body.raw_headers]:
        content.extend((name, b": ", value, b"\r\n"))
    content.extend((HEADER, b": ", rid.encode(), b"\r\nconnection: close\r\n\r\n", body.body))
    return b"".join(content)


# a cycle's attribute: the serve_direct task answering it (TimedProtocol.connection_lost)
FRONT_TASK = "ctr_front_task"


class FrontProtocol(TimedProtocol):
    """uvicorn's httptools protocol (with :class:`TimedProtocol`'s read timeout); a fast
    route's request is served by :func:`serve_direct` (module docstring)."""

    warned = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.front, self.proxy = _front_of(self.config) if SUPPORTED else (None, None)
        if not SUPPORTED and not FrontProtocol.warned:
            FrontProtocol.warned = True
            log.warning(
                "uvicorn %s lacks what service.front builds on: every request goes "
                "through ASGI (set CTR_HTTP_FRONT=false to silence this)",
                uvicorn.__version__,
            )

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        front = self.front
        if front is not None and app is self.app:  # not the concurrency limit's 503
            scope = cycle.scope
            handler = front.fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                self.running_cycle = cycle  # as TimedProtocol's, which this path skips
                coro = serve_direct(handler, cycle, self.proxy, front.allowed_origins)
                if self.config.reset_contextvars:  # as uvicorn's own (its option)
                    task = self.loop.create_task(coro, context=contextvars.Context())
                else:
                    task = self.loop.create_task(coro)
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
                setattr(cycle, FRONT_TASK, task)  # cancelled if the client goes first
                return
        super()._start_asgi_task(cycle, app)


async def serve_direct(
    handler: Handler,
    cycle: RequestResponseCycle,
    proxy: ProxyHeadersMiddleware | None,
    allowed: frozenset[str] = frozenset(),
) -> None:
    """One request to a fast route, answered as :class:`~service.app.ScoringApp`
    answers it through ASGI and uvicorn's ``run_asgi`` ends it (``tests/test_front.py``
    compares the bytes); ``allowed``: ``CTR_ALLOWED_ORIGINS``, whose pages' answers
    carry the CORS headers."""
    scope = cycle.scope
    headers = request_headers(scope)
    rid = request_id(headers.get("x-request-id"))
    extra = [(HEADER, rid.encode())]
    if allowed:
        extra += cors_headers(allowed, headers.get("origin"))
    token = CURRENT.set(rid)
    if proxy is not None and cycle.access_log and cycle.access_logger.isEnabledFor(INFO):
        await proxy(scope, None, None)  # the client and scheme the access log shows
    start = time.perf_counter()
    status = 500
    bug: Exception | None = None  # a bug whose 500 is being written
    try:
        try:
            # uvicorn's receive: it answers Expect: 100-continue and resumes reading
            response = await answer(handler, headers, cycle.receive)
        except Exception as exc:
            # a bug: the app's 500 (nothing has been sent yet), then raised on, as
            # ScoringApp raises it to uvicorn
            bug = exc
            await _write(cycle, internal_error_response(exc), extra)
            raise
        if response is None:
            status = gone_status(scope)  # nobody to answer; counted, not logged as an error
        else:
            sent = await _write(cycle, response, extra)
            status = response.status_code if sent else CLIENT_CLOSED
            if sent:
                written(response)
    except asyncio.CancelledError as exc:
        if bug is not None:  # while a bug's 500 waited: as below
            await _end_as_uvicorn(cycle, exc)
            return
        if scope.get(CLIENT_GONE) and not cycle.response_started:
            # the connection went (the client, or the read timeout or the parser's 400
            # closing it): the work stopped, nothing to write
            status = gone_status(scope)
            return
        # the end of a graceful shutdown's wait: the request is not served. The app's
        # 503 (its request ID, Retry-After: another worker takes a retry) where nothing
        # was sent yet; uvicorn's run_asgi answered a plain-text 500 and logged a
        # traceback of the cancellation
        if not cycle.response_started:
            status = 503
            await _write(cycle, shutdown_response(), extra)
        else:
            cycle.transport.close()
        return
    except BaseException as exc:
        await _end_as_uvicorn(cycle, exc)
        return
    finally:
        cycle.on_response = lambda: None  # as run_asgi: the request is over
        m.REQUEST(scope["path"], scope["method"], str(status)).observe(time.perf_counter() - start)
    # reset on a normal return only, as ScoringApp.__call__ does
    CURRENT.reset(token)


async def _end_as_uvicorn(cycle: RequestResponseCycle, exc: BaseException) -> None:
    """What uvicorn's run_asgi does with an app that raised (a bug's exception after its
    500): its traceback (this request's ID on it), then its own 500 if nothing was sent
    yet, else the connection closed."""
    log.error("Exception in ASGI application\n", exc_info=exc)
    if not cycle.response_started:
        await cycle.send_500_response()
    else:
        cycle.transport.close()


async def _write(
    cycle: RequestResponseCycle, response: Response, extra: list[tuple[bytes, bytes]]
) -> bool:
    """The response's head and body in one write, as uvicorn's ``send`` writes them for
    a ``Content-Length`` response to a POST (the ``extra`` headers, ``X-Request-ID``
    first, last, as ScoringApp adds them); then the request is complete (keep-alive,
    or the connection closed; the next pipelined request). False where the client had
    gone: nothing written."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected or cycle.transport.is_closing():
        return False
    cycle.response_started = True
    # answered without asking for a body that has not all come (_close_unless_continued)
    held_back = cycle.waiting_for_100_continue and cycle.more_body
    cycle.waiting_for_100_continue = False
    scope = cycle.scope
    status = response.status_code
    if cycle.access_log:
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )
    content = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        content.extend((name, b": ", value, b"\r\n"))
    for name, value in response.raw_headers:
        content.extend((name, b": ", value, b"\r\n"))
    for name, value in extra:
        content.extend((name, b": ", value, b"\r\n"))
    # False once a graceful shutdown has begun, or where the client still holds its
    # body back (_close_unless_continued)
    keep_alive = cycle.keep_alive and not held_back
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    content.append(response.body)
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True
