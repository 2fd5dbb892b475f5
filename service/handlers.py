"""The service's error answers (one JSON body for every error, with the request's ID)
and the FastAPI exception handlers that give them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import metrics as m
from service.asgi import ANSWERED, gone_status, orjson_response
from service.errors import SHUTDOWN_DETAIL, BadRequest, ServiceError, ShuttingDown
from service.requestid import CURRENT
from service.validate import MAX_DETAIL, safe_field

log = logging.getLogger("ctr.service")


def error_response(exc: ServiceError) -> Response:
    """The JSON error body for a domain error (counted in ``ctr_errors_total``), with
    the ID of the request it answers."""
    m.ERRORS.labels(exc.kind).inc()
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    field = safe_field(exc.field) if exc.field else exc.field
    body = {
        "error": exc.kind,
        "field": field,
        "detail": safe_field(exc.message, MAX_DETAIL),
        "request_id": CURRENT.get(),
    }
    return orjson_response(body, exc.status, headers)


def shutdown_response() -> Response:
    """The answer to a request the graceful shutdown cancelled before it was answered
    (503 ``shutting_down``, Retry-After), logged as such; uvicorn's own was a plain-text
    500 without the request's ID, and a traceback of the cancellation."""
    log.warning("request cancelled by the shutdown before it was answered")
    return error_response(ShuttingDown(SHUTDOWN_DETAIL))


def internal_error_response(exc: Exception) -> Response:
    """The 500 for a bug: the same JSON body as every error, no internals in it. Logged
    here in one line that names the request (the server logs the traceback after)."""
    log.error("internal error answered with a 500: %s: %s", type(exc).__name__, exc)
    return error_response(
        ServiceError(f"internal error ({type(exc).__name__}); see the service log")
    )


def bad_request(errors: Sequence[Any], skip: int = 0) -> BadRequest:
    """The first of pydantic's ``errors`` as a 422 naming its field (the path after the
    first ``skip`` parts of its location)."""
    first = errors[0] if errors else {}
    path = ".".join(str(p) for p in first.get("loc", ())[skip:])
    if first.get("type") == "extra_forbidden":  # as the scoring body's (validate.py)
        name = path or '""'
        return BadRequest(f"unknown field {name!r}", name)
    field = path or "body"
    # a validator's own message, without pydantic's "Value error, " before it
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return BadRequest(f"{field}: {msg}", field)


def routing_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's 404 (no such path) or 405 (a method the path does not take) in the
    body every error of the service has (FastAPI's was ``{"detail": "Not Found"}``,
    without the request's ID: the one answer a client could not read as the others).
    Not counted in ``ctr_errors_total``: a scanner's paths are no service error (the
    request metrics time them under the route ``unmatched``)."""
    path = safe_field(str(request.scope.get("path", "")), 200)
    if exc.status_code == 404:
        kind, detail = "not_found", f"no such path: {path} (the API is listed at /docs)"
    else:
        allow = (exc.headers or {}).get("Allow", "")
        kind = "method_not_allowed"
        detail = f"{safe_field(request.method, 20)} is not allowed on {path}" + (
            f": use {allow}" if allow else ""
        )
    body = {"error": kind, "field": None, "detail": detail, "request_id": CURRENT.get()}
    return orjson_response(body, exc.status_code, exc.headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(bad_request(exc.errors(), skip=1))  # loc[0]: body, query…

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """An unknown path's 404 or a method's 405 (:func:`routing_error`), a 405's
        ``Allow`` naming every method the path takes: the route that matched first
        names its own (GET and HEAD are two routes here, to keep their OpenAPI operation
        IDs apart, and Allow said GET only)."""
        if exc.status_code == 405:
            path = request.scope.get("path")
            methods = {
                m for r in app.router.routes if getattr(r, "path", None) == path
                for m in (getattr(r, "methods", None) or ())
            }  # fmt: skip
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        if exc.status_code in (404, 405):
            return routing_error(request, exc)
        return await http_exception_handler(request, exc)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=gone_status(request.scope))  # not sent: it has gone

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        """A bug, not a domain error: the same JSON body as every error, with no internals
        in it (Starlette's error middleware re-raises it after, so the server logs the
        traceback)."""
        if getattr(exc, ANSWERED, False):  # a fast route's, answered in the stack: not sent
            return Response(status_code=500)
        return internal_error_response(exc)
