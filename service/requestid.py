"""Request IDs: 32 hex characters, unique across the workers of a deployment.

``uuid.uuid4().hex`` reads the kernel's random source on every request (3 µs here), and
that system call lets go of the GIL: the ORT thread, waiting for it with a finished
graph call, takes it then, and the event loop waits to get it back. Instead each process
draws its random bits once (again in a forked child) and counts: the ID is 64 random
bits, then the count passed through a random bijection of 64-bit numbers (an odd
multiplier and a mask), so the IDs do not plainly show a worker's request count. Two
processes share an ID only if their first 64 random bits match.

A client's own ``X-Request-ID`` is kept instead where it is a plain token
(:func:`given`); either way the ID is the response's ``X-Request-ID`` header, the
``request_id`` of its body (errors included) and a field of every log record made while
the request is served (:func:`install_log_records`)."""

from __future__ import annotations

import itertools
import logging
import os
import re
from contextvars import ContextVar
from typing import Any

_MASK = (1 << 64) - 1


class RequestIds:
    """``next()``: this process's next request ID."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        words = os.urandom(16)
        self.mult = int.from_bytes(words[:8], "little") | 1  # odd: a bijection mod 2**64
        self.xor = int.from_bytes(words[8:], "little")
        self.count = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{((next(self.count) * self.mult) & _MASK) ^ self.xor:016x}"


REQUEST_IDS = RequestIds()


# the request being served: set where a request comes in (``service.app``), read by the
# response body, error bodies and every log record made while it is served
CURRENT: ContextVar[str | None] = ContextVar("ctr_request_id", default=None)

# the longest X-Request-ID kept; longer ones are replaced (Heroku's router has 200 too)
MAX_LENGTH = 200
# printable ASCII without space, '"' and '\': as is in JSON, in a header and in a log line
_GIVEN = re.compile(rf"[!#-\[\]-~]{{1,{MAX_LENGTH}}}")
HEADER = b"x-request-id"


def given(value: str | None) -> str | None:
    """A client's ``X-Request-ID`` (its header's text), where it can be kept as the
    request's ID: 1 to :data:`MAX_LENGTH` printable ASCII characters other than space,
    ``"`` and ``\\`` (a UUID, a W3C ``traceparent``, an AWS trace ID all are). None for
    anything else: the service then draws its own, and its answer says which ID it used."""
    if value is not None and _GIVEN.fullmatch(value) is not None:
        return value
    return None


def request_id(value: str | None) -> str:
    """The ID of a request whose ``X-Request-ID`` header is ``value`` (None: absent)."""
    return given(value) or REQUEST_IDS.next()


def install_log_records() -> None:
    """Every log record made from now on, by any logger, carries ``request_id``: the ID of
    the request being served where it was made (the event loop's task), else None. Log
    formats can show it as ``%(request_id)s``; ``service.logs``' formatters do. Idempotent.
    (So ``extra={"request_id": ...}`` cannot be passed to a log call: logging refuses
    to overwrite a record's attribute.)"""
    prior = logging.getLogRecordFactory()
    if getattr(prior, "ctr_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = prior(*args, **kwargs)
        record.request_id = CURRENT.get()
        return record

    factory.ctr_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
