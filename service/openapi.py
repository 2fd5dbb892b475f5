"""The OpenAPI schema: request and response bodies from the pydantic models, with the
ID length limit in force (``CTR_MAX_ID_LENGTH``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.requestid import MAX_LENGTH as REQUEST_ID_MAX
from service.schemas import (
    EventRequest,
    EventResponse,
    ReloadRequest,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
)


def body_schema(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
    }


ID_FIELDS = frozenset({"user_id", "item_id", "event_id"})


def id_limits(node: Any, max_len: int) -> None:
    """Set ``maxLength`` of every ID property (its string form, where it may be an
    integer too) to the limit in force (CTR_MAX_ID_LENGTH), and say what that limit is
    for the integer form: its decimal text counts (no numeric bounds: at the default of
    256 they would be 256-digit numbers, past what many clients' number types hold)."""
    if isinstance(node, dict):
        for k, v in node.get("properties", {}).items():
            if k not in ID_FIELDS or not isinstance(v, dict):
                continue
            for form in [v, *v.get("anyOf", [])]:
                if isinstance(form, dict) and "maxLength" in form:
                    form["maxLength"] = max_len
                elif isinstance(form, dict) and form.get("type") == "integer":
                    form["description"] = (
                        f'used as its decimal string (13 is "13"), which may be at most '
                        f"{max_len} characters, a leading '-' included"
                    )
        for v in node.values():
            id_limits(v, max_len)
    elif isinstance(node, list):
        for v in node:
            id_limits(v, max_len)


API_KEY_SCHEME = "ApiKey"
# the routes a key guards: always where CTR_API_KEY is set (events, reload), or only
# with CTR_PROTECT_SCORING (score; an explain request needs it either way)
KEYED = {"/v1/events": "post", "/admin/reload": "post"}
SCORE = ("/v1/score", "post")
# open routes whose answers show more to a key holder: a model load's error text
KEY_SHOWS_MORE = (("/readyz", "get"), ("/readyz", "head"), ("/v1/models", "get"))


def declare_headers(schema: dict[str, Any], key_set: bool, protect_scoring: bool) -> None:
    """What the schema's bodies do not say: the ``X-API-Key`` header as a security
    scheme on the routes that take it (required where the service requires it, optional
    elsewhere, so that /docs can send it and generated clients know it), the optional
    ``X-Request-ID`` request header, and ``Retry-After`` on every 503."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[API_KEY_SCHEME] = {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "CTR_API_KEY: /v1/events and /admin/reload where it is set; "
        "/v1/score with CTR_PROTECT_SCORING, and for explain wherever it is set; "
        "optional on /readyz and /v1/models, whose answers then show a load's error text",
    }  # fmt: skip
    paths = schema.get("paths", {})
    keyed = [(path, method, key_set) for path, method in KEYED.items()]
    keyed.append((*SCORE, key_set and protect_scoring))
    # open routes that show more to a key holder (a load's error text)
    keyed += [(path, method, False) for path, method in KEY_SHOWS_MORE]
    for path, method, required in keyed:
        op = paths.get(path, {}).get(method)
        if op is not None:
            need = [{API_KEY_SCHEME: []}]
            op["security"] = need if required else [{}, *need]
    for ops in paths.values():
        for method, op in ops.items():
            if not isinstance(op, dict) or method not in ("get", "post", "head"):
                continue
            params = op.setdefault("parameters", [])
            if not any(p.get("name", "").lower() == "x-request-id" for p in params):
                params.append({
                    "name": "X-Request-ID", "in": "header", "required": False,
                    "schema": {"type": "string", "maxLength": REQUEST_ID_MAX},
                    "description": "the request's ID, echoed back and in the log lines "
                    "(one is drawn where it is missing or not a printable token)",
                })  # fmt: skip
            busy = op.get("responses", {}).get("503")
            if isinstance(busy, dict):
                busy.setdefault("headers", {})["Retry-After"] = {
                    "schema": {"type": "integer"},
                    "description": "seconds to wait before retrying",
                }


def install_openapi(
    app: FastAPI, max_id_length: int, key_set: bool = False, protect_scoring: bool = False
) -> None:
    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (
            ScoreRequest,
            EventRequest,
            ScoreResponse,
            EventResponse,
            ReloadRequest,
            ReloadResponse,
        ):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for k, v in js.pop("$defs", {}).items():
                comps.setdefault(k, v)
            comps[model.__name__] = js
        id_limits(comps, max_id_length)
        declare_headers(schema, key_set, protect_scoring)
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
