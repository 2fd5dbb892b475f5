"""Domain errors and their HTTP mapping."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    kind = "internal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(ServiceError):
    status = 422
    kind = "bad_request"


class ModelNotReady(ServiceError):
    status = 503
    kind = "model_not_ready"


class StoreUnavailable(ServiceError):
    status = 503
    kind = "store_unavailable"


class StoreDataError(ServiceError):
    """Redis answered with an error about the data (a key of another type than the
    service writes): not retryable until the key is fixed."""

    status = 500
    kind = "store_data_error"


class StoreRefused(ServiceError):
    """Redis refuses the service's credentials or commands (NOPERM, NOAUTH, WRONGPASS,
    protected mode): configuration, which no retry outlasts."""

    status = 500
    kind = "store_refused"


class Unauthorized(ServiceError):
    status = 401
    kind = "unauthorized"


class PayloadTooLarge(BadRequest):
    status = 413
    kind = "payload_too_large"


class UnsupportedEncoding(BadRequest):
    status = 415
    kind = "unsupported_encoding"


class UnsupportedUpgrade(BadRequest):
    status = 400
    kind = "unsupported_upgrade"


class MalformedJSON(BadRequest):
    status = 400
    kind = "malformed_json"


class Overloaded(ServiceError):
    status = 503
    kind = "overloaded"


class DeadlineExceeded(ServiceError):
    status = 503
    kind = "deadline_exceeded"


class ShuttingDown(ServiceError):
    """A request still in flight when the worker's graceful shutdown ran out of time
    (cancelled): not served, safe to retry elsewhere."""

    status = 503
    kind = "shutting_down"


SHUTDOWN_DETAIL = "the worker shut down before this request was answered: retry"


class NonFiniteScore(ServiceError):
    """The graph returned NaN/inf for a candidate: never served as a score."""

    status = 500
    kind = "non_finite_score"


class AdminDisabled(ServiceError):
    status = 403
    kind = "admin_disabled"


class CorsRefused(ServiceError):
    """A CORS preflight from a listed origin that asks for a method or a header this
    service does not take (the request it announces would be refused too)."""

    status = 400
    kind = "cors_refused"


class OriginNotAllowed(ServiceError):
    """A request a web page sent (it carries ``Origin``) from an origin not in
    ``CTR_ALLOWED_ORIGINS``: a page open in a browser beside a key-less service could
    append to any user's history, and through DNS rebinding read it back."""

    status = 403
    kind = "origin_not_allowed"
