"""Pydantic models that document the API in OpenAPI (validation on the hot path is in
``validate``; both describe the same shapes)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ctr.bundle import version_of
from service.requestid import MAX_LENGTH
from service.validate import MAX_FEATURE_KEYS, MAX_TIMESTAMP

Scalar = str | int | float | bool | None
# an ID: a string, or an integer read as its decimal string (13 and "13" are one ID; the
# answers give it back as that string)
Id = Annotated[str, Field(min_length=1, max_length=256)] | int


# the most keys an object of features may hold, as the hand-rolled check refuses past it
KEYS_AT_MOST: dict[str, Any] = {"maxProperties": MAX_FEATURE_KEYS}


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Id
    features: dict[str, Scalar] | None = Field(
        None,
        description="item features; any missing are looked up in Redis",
        json_schema_extra=KEYS_AT_MOST,
    )


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u42",
                    "candidates": [
                        {"item_id": "i9", "features": {"cate_id": "c3"}},
                        {"item_id": "i17"},
                    ],
                    "context": {"hour": 13},
                    "top_k": 100,
                    "explain": False,
                }
            ]
        },
    )
    user_id: Id
    candidates: list[Candidate] = Field(min_length=1, description="at most CTR_MAX_CANDIDATES")
    context: dict[str, Scalar] | None = Field(None, json_schema_extra=KEYS_AT_MOST)
    top_k: int | None = Field(None, gt=0)
    explain: bool | None = False


class Attended(BaseModel):
    item_id: str | None
    weight: float


class ScoredItem(BaseModel):
    item_id: str
    probability: float
    rank: int
    attention: list[Attended] | None = None


REQUEST_ID = (
    "the request's ID, also in the X-Request-ID response header: the request's own "
    f"X-Request-ID where it is 1 to {MAX_LENGTH} printable ASCII characters other than "
    "space, '\"' and '\\', else one the service drew (32 hex characters); log lines "
    "about the request name it (request_id=<it>)"
)


class ModelRef(BaseModel):
    name: str
    version: str


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "din", "version": "3"},
                    "request_id": "5f0c…",
                    "degraded": False,
                    "cold_start": False,
                    "items": [{"item_id": "i9", "probability": 0.031, "rank": 1}],
                }
            ]
        }
    )
    model: ModelRef
    request_id: str = Field(description=REQUEST_ID)
    degraded: bool
    cold_start: bool
    items: list[ScoredItem]


class EventRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u42",
                    "event_id": "e-000123",
                    "item_id": "i9",
                    "features": {"cate_id": "c3"},
                    "type": "click",
                    "timestamp": 1764000000.0,
                }
            ]
        },
    )
    user_id: Id
    event_id: Id
    item_id: Id
    features: dict[str, Scalar] | None = Field(None, json_schema_extra=KEYS_AT_MOST)
    type: str = Field("click", min_length=1, max_length=32)
    timestamp: float = Field(ge=0, lt=MAX_TIMESTAMP, description="unix seconds, not ms")


class EventResponse(BaseModel):
    appended: bool
    duplicate: bool
    ignored: bool | None = Field(
        None, description="true when CTR_SEQUENCE_EVENT_TYPES leaves this event type out"
    )
    outside_window: bool | None = Field(
        None,
        description="true when the event is older than every behaviour kept (the newest "
        "CTR_SEQUENCE_KEEP by timestamp): nothing is stored, its event_id included (a retry "
        "answers the same)",
    )


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    detail: str
    request_id: str | None = Field(None, description=REQUEST_ID)


class ReloadConflict(ErrorBody):
    """A 409 of the reload route: the version that could not be loaded, and what the
    worker serves instead."""

    serving: str | None = Field(
        None, description="the version the worker still serves (null: none loaded)"
    )


class ReadyFallback(BaseModel):
    """The start-up fallback: the newest version did not load, an older one serves."""

    newest: str = Field(description="the newest version, which did not load")
    error: str = Field(description="why (hidden unless the request sends X-API-Key)")


class ReloadError(BaseModel):
    """A load that failed while a model served on: what was asked, why, when."""

    version: str = Field(description="the version asked for (a number or 'latest')")
    error: str = Field(description="why (hidden unless the request sends X-API-Key)")
    at: float = Field(description="when, as unix time")


class ReadyBody(BaseModel):
    """``/readyz``'s answer, 200 (ready) or 503 (not: what is missing false)."""

    ready: bool
    degraded: bool = Field(description="Redis does not answer: scoring serves without it")
    model: bool = Field(description="a model is loaded")
    model_error: str | None = Field(
        description="why the model did not load (hidden unless the request sends X-API-Key)"
    )
    fallback: ReadyFallback | None
    reload_error: ReloadError | None = Field(
        description="the last load that failed while a model served (a reload, a "
        "broadcast's, a fallback's retry); null once one loads"
    )
    redis: bool


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None,
        description="a version number (7 or \"7\") or 'latest' (default)",
        # what the validator below accepts: a JSON number becomes its string
        json_schema_extra={
            "anyOf": [
                {"type": "string", "pattern": "^(latest|0|[1-9][0-9]*)$"},
                {"type": "integer", "minimum": 0},
                {"type": "null"},
            ]
        },
    )

    @field_validator("version", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        """A version sent as a JSON number, as ``/v1/models`` and the store number them."""
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a negative one is refused below, as its text would be
        if value is not None and not isinstance(value, str):  # 1.5, true, a list...
            kind = {bool: "boolean", float: "number", list: "array", dict: "object"}.get(
                type(value), type(value).__name__)  # fmt: skip
            raise ValueError(f"a version number (digits, no leading zero) or 'latest', not a "
                             f"JSON {kind}")  # fmt: skip
        return value

    @field_validator("version")
    @classmethod
    def _version_name(cls, value: str | None) -> str | None:
        """``latest`` or a version as its folder is named (``7``, not ``07``, ``""`` or a
        full-width ``７``, which ``int()`` would take for another folder's number)."""
        if value is None or value == "latest" or version_of(value) is not None:
            return value
        raise ValueError("a version number (digits, no leading zero) or 'latest'")


class ReloadResponse(BaseModel):
    name: str
    version: str
    peers_notified: int | None = Field(
        description="other workers that received the version to load (null: Redis could "
        "not be reached, or CTR_RELOAD_CHANNEL is empty; this worker reloaded all the same)"
    )
