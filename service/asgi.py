"""ASGI plumbing shared by the serving paths: the request's headers and body chunks,
the scope keys the front door sets, the CORS headers of every answer, the JSON response
writer and what runs once a response is written (its ``write`` stage)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from service import metrics as m
from service.settings import origin_key

# the clock of the per-stage timings (ctr_stage_duration_seconds); `ctr bench-path` sets
# it to time.thread_time for a while to split the event loop's CPU by stage; read here
# at each call, as ``asgi.STAGE_CLOCK``, by service.routes and service.scoring too
STAGE_CLOCK: Callable[[], float] = time.perf_counter


# the status recorded for a request whose client went away before its body was read
# (nginx's convention); no response is sent
CLIENT_CLOSED = 499
# set in a request's scope by service.front when the service closed the connection
# because the body did not all arrive within CTR_READ_TIMEOUT_MS: recorded as 408, not 499
READ_TIMED_OUT = "ctr.read_timed_out"
# set likewise when the HTTP parser refused the request's body (a bad chunk size, ...):
# the client got the protocol's 400, recorded as such, not 499
MALFORMED_BODY = "ctr.malformed_body"
# set in a request's scope by service.front when its connection was lost before its
# answer was all written: uvicorn's send to a gone client is silent, so the plain
# protocol's answer would count 200 and log its impression (service.serving._serve)
CLIENT_GONE = "ctr.client_gone"
# set in a fast route's scope when it is answered through ASGI (uvicorn's own protocol,
# ``CTR_HTTP_FRONT=false``): the task answering it, which service.front.TimedProtocol
# cancels when the connection goes before the answer has begun (as the front's)
SERVE_TASK = "ctr.serve_task"
# set on an unexpected exception once its 500 has been sent
ANSWERED = "ctr_answered"


def gone_status(scope: Scope) -> int:
    """The status recorded for a request that ended with its connection closed before
    its body was read: 408 when the service closed it (the read timeout), 400 when the
    parser refused the body (the protocol's 400 was the answer), else 499."""
    if scope.get(READ_TIMED_OUT):
        return 408
    return 400 if scope.get(MALFORMED_BODY) else CLIENT_CLOSED


def orjson_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


Handler = Callable[[Callable[[str], str | None], AsyncIterator[bytes]], Awaitable[Response]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` (lower case) header of a request, as text; None if absent."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def with_id(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, with the ``extra`` headers (``X-Request-ID``, and the CORS headers of
    :func:`cors_headers`, unless the response has them already: a preflight's) added to
    the response's start."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ())]
            if len(extra) > 1 and any(k.lower() == CORS_ORIGIN for k, _ in headers):
                headers.append(extra[0])
            else:
                headers += extra
            message = {**message, "headers": headers}
        await send(message)

    return send_with_id


def request_headers(scope: Scope) -> dict[str, str]:
    """A request's headers by (lower-case) name, the first of repeated ones (as
    Starlette's ``Headers.get``); a repeated ``Content-Encoding``'s values joined by
    commas, as HTTP reads a list header (:func:`header_reader`)."""
    headers: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.decode("latin-1")
        if name == "content-encoding" and name in headers:
            headers[name] += ", " + v.decode("latin-1")
        else:
            headers.setdefault(name, v.decode("latin-1"))
    return headers


def header_reader(request: Request) -> Callable[[str], str | None]:
    """``request``'s headers as :func:`request_headers` reads them: the first of repeated
    ones, a repeated ``Content-Encoding``'s values joined (``identity`` then ``gzip`` is
    a gzip body)."""

    def get(name: str) -> str | None:
        if name == "content-encoding":
            values = request.headers.getlist(name)
            return ", ".join(values) if values else None
        return request.headers.get(name)

    return get


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks from ASGI ``receive``; ``ClientDisconnect`` if the
    client goes away first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


# what a page of a CTR_ALLOWED_ORIGINS origin may read of an answer besides its body
CORS_EXPOSED = ["x-request-id", "retry-after"]


CORS_ORIGIN = b"access-control-allow-origin"


def cors_headers(allowed: frozenset[str], origin: str | None) -> list[tuple[bytes, bytes]]:
    """The CORS headers of every answer to a page of a ``CTR_ALLOWED_ORIGINS`` origin
    (``allowed``), its errors, a shutdown's 503 and a bug's 500 included: without them
    the browser keeps the answer from the page. Empty for another origin, or none."""
    if origin is None or origin_key(origin) not in allowed:
        return []
    return [
        (CORS_ORIGIN, origin.encode("latin-1")),
        (b"access-control-expose-headers", ", ".join(CORS_EXPOSED).encode()),
        (b"vary", b"Origin"),
    ]


# a response's attribute: what to do once it is written to the client (the impression
# log's entry), run by whoever writes it (:func:`written`)
AFTER_WRITE = "ctr_after_write"
# a scored response's attribute: when its body was built (STAGE_CLOCK), where the
# ``write`` stage begins
WRITE_FROM = "ctr_write_from"


def written(response: Response) -> None:
    """``response`` reached the client: the ``write`` stage of a scored one (from its
    body built to its bytes handed to the socket: the deadline check, the access-log
    line, the write), then its :data:`AFTER_WRITE` action, if any."""
    since = getattr(response, WRITE_FROM, None)
    if since is not None:
        m.STAGE("write").observe(STAGE_CLOCK() - since)
    action = getattr(response, AFTER_WRITE, None)
    if action is not None:
        action()
