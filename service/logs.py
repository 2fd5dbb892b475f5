"""The service's log lines: each one made while a request is served names it
(``request_id``, see ``service.requestid``), as text (the default) or as one JSON object
a line (``CTR_LOG_FORMAT=json``), for log stores that index fields.

Text: the service's own lines are ``LEVEL:logger:message request_id=<id>``, uvicorn's as
uvicorn writes them with `` request_id=<id>`` at the end of those made inside a request:
its access lines (written as the response starts) and its traceback of an exception
that reached it (written in the request's task, after the app raised). JSON: every line,
uvicorn's included, is ``{"time", "level", "logger", "message", "request_id"}``, access
lines with ``client``, ``method``, ``path`` and ``status`` too, and ``exc_info`` where
a traceback goes with it."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from typing import Any, Literal

import orjson
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter as UvicornAccessFormatter
from uvicorn.logging import DefaultFormatter as UvicornDefaultFormatter

from ctr import traceback_on

LogFormat = Literal["text", "json"]


def with_id(text: str, record: logging.LogRecord) -> str:
    """``text`` (a formatted record) with `` request_id=<id>`` at the end of its first
    line (before a traceback's), where the record names a request."""
    rid = getattr(record, "request_id", None)
    if rid is None:
        return text
    head, sep, rest = text.partition("\n")
    return f"{head} request_id={rid}{sep}{rest}"


class _WithId(logging.Formatter):
    """A formatter's line, then the request's ID where one was being served
    (:func:`with_id`)."""

    def format(self, record: logging.LogRecord) -> str:
        return with_id(super().format(record), record)


class TextFormatter(_WithId):
    """The service's own lines: ``LEVEL:logger:message``, then the request's ID."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s:%(name)s:%(message)s")


class AccessFormatter(_WithId, UvicornAccessFormatter):
    """uvicorn's access line, then the request's ID."""


class ServerFormatter(_WithId, UvicornDefaultFormatter):
    """uvicorn's other lines (start-up, its traceback of an exception that reached it),
    then the request's ID where one was being served."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
            bad = None
        except Exception as exc:  # a call whose arguments do not fit its format
            message, bad = str(record.msg), f"{type(exc).__name__}: {exc}; args {record.args!r}"
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "request_id": getattr(record, "request_id", None),
        }
        if bad is not None:  # as a field: logging's own multi-line report is not JSON
            doc["format_error"] = bad
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _, status = args
            doc.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # a lone surrogate in a message: json escapes it
            return json.dumps(doc, default=str)


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The service's formatter for ``CTR_LOG_FORMAT``."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def route_stray_output(fmt: LogFormat) -> None:
    """With ``json``, what Python would write to stderr past logging goes through it
    instead, as JSON lines: ``warnings`` (logger ``py.warnings``) and an exception that
    ends a thread (logger ``ctr.thread``, with its traceback). Text leaves both as they
    are."""
    if fmt != "json":
        return
    logging.captureWarnings(True)
    if getattr(threading.excepthook, "ctr_logs", False):
        return

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        logging.getLogger("ctr.thread").error(
            "exception in thread %s",
            name,
            exc_info=exc_info,  # type: ignore[arg-type]
        )

    excepthook.ctr_logs = True  # type: ignore[attr-defined]
    threading.excepthook = excepthook


class StartupErrorFilter(logging.Filter):
    """A worker whose start-up raised one of the project's own errors (a bundle that
    does not load, ``CTR_REQUIRE_GPU`` without a GPU): uvicorn logs Starlette's whole
    traceback of it, 30 lines above the one that says what is wrong, which the service
    has logged already. It is cut to its last line, the error. Other exceptions (a bug,
    a library's) keep their traceback, as does every one with ``CTR_TRACEBACK=1``."""

    HEAD = "Traceback (most recent call last):"
    OWN = ("service.", "ctr.", "training.")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if record.args or not isinstance(msg, str) or not msg.startswith(self.HEAD):
            return True
        last = next((line for line in reversed(msg.splitlines()) if line.strip()), "")
        name, sep, text = last.partition(": ")
        if sep and name.startswith(self.OWN) and " " not in name:
            short = name.rpartition(".")[2]
            record.msg = f"start-up failed: {short}: {text} (CTR_TRACEBACK=1 for the traceback)"
        return True


def uvicorn_log_config(fmt: LogFormat) -> dict[str, Any]:
    """uvicorn's own logging set-up (``ctr serve``), with access lines that name the
    request, and every line JSON for ``json``; a start-up error of the project's own is
    one line (:class:`StartupErrorFilter`) unless ``CTR_TRACEBACK`` is on."""
    config = copy.deepcopy(LOGGING_CONFIG)
    if not traceback_on():
        config.setdefault("filters", {})["startup"] = {"()": f"{__name__}.StartupErrorFilter"}
        config["handlers"]["default"].setdefault("filters", []).append("startup")
    formatters = config["formatters"]
    if fmt == "json":
        formatters["default"] = {"()": f"{__name__}.JsonFormatter"}
        formatters["access"] = {"()": f"{__name__}.JsonFormatter"}
    else:
        formatters["default"]["()"] = f"{__name__}.ServerFormatter"
        formatters["access"]["()"] = f"{__name__}.AccessFormatter"
    return config
