"""Serving a request through ASGI: the fast route answered before the middleware stack
(:func:`timed_serve`), the request-timing middleware, and the CORS middleware that
compares origins as the service does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics as m
from service.asgi import (
    ANSWERED,
    CLIENT_CLOSED,
    CLIENT_GONE,
    SERVE_TASK,
    Handler,
    body_chunks,
    gone_status,
    request_headers,
    written,
)
from service.errors import CorsRefused, OriginNotAllowed, ServiceError
from service.handlers import error_response, internal_error_response, shutdown_response
from service.settings import origin_key

# request methods counted by name; any other (a client's own token) as "other", so that
# clients cannot grow the metric's label set
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def timed_serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    start = time.perf_counter()
    status = 500
    scope[SERVE_TASK] = asyncio.current_task()  # type: ignore[typeddict-unknown-key]
    try:
        status = await _serve(handler, scope, receive, send)
    except asyncio.CancelledError:  # SERVE_TASK's, as its client went: nothing to answer
        if not scope.get(CLIENT_GONE):
            raise
        status = gone_status(scope)
    finally:
        m.REQUEST(scope["path"], scope["method"], str(status)).observe(time.perf_counter() - start)


class ServingMiddleware:
    """Request duration by route template, method and status (pure ASGI, low overhead).

    ``fast`` routes are answered here, as :class:`~service.app.ScoringApp` answers its
    ``fast_routes`` (``ctr bench-path`` measures the two places against each other)."""

    def __init__(
        self,
        app: ASGIApp,
        fast: dict[tuple[str, str], Handler] | None = None,
        named: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.fast = fast or {}
        # paths FastAPI serves without a route object in the scope (its docs and schema):
        # labelled as themselves, not "unmatched", which is for unknown paths
        self.named = named

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is not None:
            await timed_serve(handler, scope, receive, send)
            return
        start = time.perf_counter()
        code = {"status": 500, "started": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                code["status"] = message["status"]
                code["started"] = 1
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # the end of a graceful shutdown's wait: the app's 503 with its request ID
            # where nothing was sent yet (uvicorn answered a plain-text 500), as the
            # fast route does (service.front.serve_direct)
            if code["started"]:
                raise
            code["status"] = 503
            await shutdown_response()(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.named else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            m.REQUEST(route, method, str(code["status"])).observe(time.perf_counter() - start)


async def answer(handler: Handler, headers: dict[str, str], receive: Receive) -> Response | None:
    """``handler``'s response to the request, or the domain error's it raised; None if
    the client went away before its body was read (nobody to answer). Any other
    exception is raised on: a bug."""
    try:
        return await handler(headers.get, body_chunks(receive))
    except ServiceError as exc:
        return error_response(exc)
    except ClientDisconnect:
        return None


async def _serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> int:
    # the request's ID (CURRENT) and its header: ScoringApp's, which comes in first
    try:
        response = await answer(handler, request_headers(scope), receive)
        if response is None:
            return gone_status(scope)  # counted, not logged as a server error
    except asyncio.CancelledError:
        if scope.get(CLIENT_GONE):  # its connection went (TimedProtocol): timed_serve's
            raise
        # the end of a graceful shutdown's wait, before anything was sent: the app's
        # 503, not uvicorn's plain-text 500 (as ServingMiddleware and the front do)
        response = shutdown_response()
    except Exception as exc:
        # a bug: the app's 500 (nothing has been sent yet), then raised for the server's
        # log, as Starlette's error middleware does
        await internal_error_response(exc)(scope, receive, send)
        # answered, logged and counted: not again by the error middleware of a stack
        # this route was answered in (`ctr bench-path`)
        with contextlib.suppress(AttributeError):
            setattr(exc, ANSWERED, True)
        raise
    await response(scope, receive, send)
    if scope.get(CLIENT_GONE):  # nobody read it: a client gone, and no impression
        return CLIENT_CLOSED
    written(response)
    return response.status_code


# what a refused preflight asked for, as Starlette names it -> the header that asked
PREFLIGHT_FIELDS = {
    "origin": "Origin",
    "method": "Access-Control-Request-Method",
    "headers": "Access-Control-Request-Headers",
    "private-network": "Access-Control-Request-Private-Network",
}


class OriginCORS(CORSMiddleware):
    """Starlette's CORS with origins compared as the service compares them
    (:func:`~service.settings.origin_key`: case, a trailing slash, a default port): a
    preflight from ``https://Tools.example.com:443`` was refused while the request it
    announced was served. A refused preflight answers the service's JSON error body
    naming the header (403 ``origin_not_allowed`` as the request would get, else 400
    ``cors_refused``), not Starlette's plain text."""

    def is_allowed_origin(self, origin: str) -> bool:
        return origin_key(origin) in self.allow_origins

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        said = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        asked = [PREFLIGHT_FIELDS.get(f, f) for f in said.split(", ")]
        origin = request_headers.get("origin", "")
        if asked[0] == "Origin":
            exc: ServiceError = OriginNotAllowed(
                f"requests from web pages of origin {origin[:100]!r} are not served (a "
                "page could change or read users' data): add it to CTR_ALLOWED_ORIGINS",
                "Origin",
            )
        else:
            exc = CorsRefused(
                f"the preflight asks for a method or headers this service does not take "
                f"({', '.join(asked)}): methods {', '.join(self.allow_methods)}; headers "
                f"{', '.join(sorted(self.allow_headers))}",
                asked[0],
            )
        answer = error_response(exc)
        for name, value in response.headers.items():  # the CORS headers it had
            if name.startswith("access-control-") or name == "vary":
                answer.headers[name] = value
        return answer
