"""The OpenAPI schema: request and response bodies from the pydantic models, with the
ID length limit in force (``CTR_MAX_ID_LENGTH``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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


def install_openapi(app: FastAPI, max_id_length: int) -> None:
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
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
