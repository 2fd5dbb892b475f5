"""What a route checks of a request before serving it: the body read within its limits
(the page's origin, the encodings, the size, the bytes still arriving), the API key; and
what of a load error a caller may read."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from typing import Any

from service.errors import (
    AdminDisabled,
    OriginNotAllowed,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedEncoding,
    UnsupportedUpgrade,
)
from service.settings import origin_key
from service.state import State
from service.validate import parse_json


async def read_body(
    header: Callable[[str], str | None], chunks: AsyncIterator[bytes], limit: int, state: State
) -> bytes:
    """The request body's bytes; ``header(name)`` reads a (lower-case) request header.
    The bytes of all bodies still arriving are counted in ``state.body_bytes``: past
    ``CTR_MAX_BODY_BUFFER_BYTES`` the request is refused (503 ``overloaded``), as many
    connections each holding a stalled body up to the size limit grew the worker
    without bound (``CTR_MAX_IN_FLIGHT`` counts a request once its body is read). A
    request a web page sent from an origin not in ``CTR_ALLOWED_ORIGINS`` is refused
    before its body is read (cross-site request forgery, DNS rebinding).
    A body sent compressed (``Content-Encoding`` other than ``identity``) is refused
    before it is read: read as JSON it would only be malformed. A request that asks to
    switch protocols (``Upgrade``) and whose body did not come is refused too: uvicorn's
    parser reads no body after such a head (whatever ``Connection`` headers made it one),
    which would otherwise be answered as an empty body."""
    origin = header("origin")  # browsers send it with every POST (same-origin ones too)
    if origin is not None and not _origin_allowed(origin, header("host"), state):
        raise OriginNotAllowed(
            f"requests from web pages of origin {origin[:100]!r} are not served (a page "
            "could change or read users' data): add it to CTR_ALLOWED_ORIGINS",
            "Origin",
        )
    coding = header("transfer-encoding")  # "gzip, chunked": the parser undoes only chunked
    if coding is not None and any(
        c.strip().lower() not in ("", "chunked", "identity") for c in coding.split(",")
    ):
        raise UnsupportedEncoding(
            f"Transfer-Encoding {coding!r} is not supported: send the body uncompressed, "
            "with a Content-Length or chunked",
            "Transfer-Encoding",
        )
    encoding = header("content-encoding")  # a list: "identity, gzip" is a gzip body
    if encoding is not None and any(
        coding.strip().lower() not in ("", "identity") for coding in encoding.split(",")
    ):
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
            "Content-Encoding",
        )
    length = header("content-length")
    if length is not None and length.isascii() and length.isdigit():
        # 20 digits and more are over any limit (and past 4,300 int() would refuse them);
        # leading zeros are HTTP's too
        digits = length.lstrip("0")
        if len(digits) > 19 or int(digits or "0") > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", "body")
    body = bytearray()
    cap = state.settings.max_body_buffer_bytes
    try:
        async for chunk in chunks:
            body.extend(chunk)
            state.body_bytes += len(chunk)
            if len(body) > limit:
                raise PayloadTooLarge(f"body is larger than {limit} bytes", "body")
            if state.body_bytes > cap:
                raise Overloaded(
                    f"request bodies still arriving hold more than {cap} bytes "
                    "(CTR_MAX_BODY_BUFFER_BYTES)",
                    None,
                )
    finally:
        state.body_bytes -= len(body)
    if header("upgrade") is not None and (
        not body or (length is not None and length.strip().lstrip("0") != str(len(body) or ""))
    ):
        raise UnsupportedUpgrade(
            "a request asking to switch protocols (Upgrade) is not served, and its body did "
            "not reach the service: send it as plain HTTP/1.1, without Upgrade",
            "Upgrade",
        )
    return bytes(body)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _origin_allowed(origin: str, host: str | None, state: State) -> bool:
    """``origin`` is in ``CTR_ALLOWED_ORIGINS``, or is the service's own page on a
    loopback name (``/docs``' "Try it out" at ``http://localhost:8000``). Another own
    origin is not enough: a DNS-rebinding page is same-origin with the service under its
    own host name, which ``Host`` then carries."""
    origin = origin_key(origin)
    if origin in state.allowed_origins:
        return True
    scheme, _, authority = origin.partition("://")
    name = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    return (
        scheme in ("http", "https")
        and host is not None
        and authority == host.strip().lower()
        and name in LOOPBACK_NAMES
    )


async def read_json(
    header: Callable[[str], str | None],
    chunks: AsyncIterator[bytes],
    limit: int,
    state: State,
    empty: Any = ...,
) -> Any:
    """The request body as JSON; ``header(name)`` reads a (lower-case) request header;
    ``state.codec``'s C walk looks for repeated keys (None: Python does). An empty body
    is an error unless ``empty`` is given: then it stands for it."""
    body = await read_body(header, chunks, limit, state)
    if not body and empty is not ...:
        return empty
    return parse_json(body, state.codec)


def check_key(state: State, header: Callable[[str], str | None], admin: bool = False) -> None:
    key = state.settings.api_key
    if key is None:
        if admin:
            raise AdminDisabled("admin endpoints need CTR_API_KEY to be set", "X-API-Key")
        return
    given = header("x-api-key") or ""
    # header values arrive as latin-1 text: back to the bytes sent, against the key's UTF-8
    if not hmac.compare_digest(given.encode("latin-1"), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key", "X-API-Key")


HIDDEN_ERROR = "hidden: send X-API-Key to read it"


def hide_refusal(
    described: dict[str, Any], note: Callable[[str | None], str | None]
) -> dict[str, Any]:
    """``/v1/models``' ``user_tracking`` with Redis's refusal shown to key holders only
    (it may name an ACL user or a command)."""
    if described.get("refused"):
        described["refused"] = note(described["refused"])
    return described


def key_holder(state: State, header: Callable[[str], str | None]) -> bool:
    """Whether the caller may read a load error's text (file paths, the store's layout):
    anyone where no ``CTR_API_KEY`` is set, else who sends it."""
    try:
        check_key(state, header)
    except Unauthorized:
        return False
    return True


def load_errors(state: State, header: Callable[[str], str | None]) -> dict[str, Any]:
    """``model_error``, ``fallback`` and ``reload_error`` as ``/readyz`` and
    ``/v1/models`` show them: their error text only to a key holder (the health routes
    need no key)."""
    error, fallback, reload = state.model_error, state.fallback, state.reload_error
    if not key_holder(state, header):
        error = None if error is None else HIDDEN_ERROR
        fallback = None if fallback is None else {**fallback, "error": HIDDEN_ERROR}
        reload = None if reload is None else {**reload, "error": HIDDEN_ERROR}
    return {"model_error": error, "fallback": fallback, "reload_error": reload}
