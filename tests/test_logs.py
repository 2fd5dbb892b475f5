"""The log formats (``service.logs``, ``CTR_LOG_FORMAT``): JSON lines that always parse
and carry the request's ID, and uvicorn's set-up with access lines that name it.
``tests/test_workers.py::test_log_lines_name_their_request`` runs both under `ctr serve`."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings

import pytest

from service.logs import (
    AccessFormatter,
    JsonFormatter,
    ServerFormatter,
    TextFormatter,
    route_stray_output,
    uvicorn_log_config,
)


def record(
    msg: str, *args: object, name: str = "ctr.service", **extra: object
) -> logging.LogRecord:
    r = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def failed(
    msg: str, exc: Exception, name: str = "ctr.service", **extra: object
) -> logging.LogRecord:
    """A record made while ``exc`` was being handled, with its traceback."""
    try:
        raise exc
    except type(exc):
        r = record(msg, name=name, **extra)
        r.exc_info = sys.exc_info()
    return r


def test_json_lines_carry_the_fields_and_the_request() -> None:
    doc = json.loads(JsonFormatter().format(record("hello %s", "there", request_id="r-1")))
    assert doc["message"] == "hello there" and doc["request_id"] == "r-1"
    assert doc["level"] == "WARNING" and doc["logger"] == "ctr.service"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert json.loads(JsonFormatter().format(record("idle")))["request_id"] is None


def test_json_lines_hold_tracebacks_and_odd_text_on_one_line() -> None:
    r = failed("failed\nsecond line \ud800", ValueError("boom"), request_id="r-2")
    line = JsonFormatter().format(r)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "failed\nsecond line \ud800"
    assert "ValueError: boom" in doc["exc_info"] and doc["request_id"] == "r-2"


def test_an_access_line_names_its_request_in_both_formats() -> None:
    args = ("127.0.0.1:5000", "POST", "/v1/score", "1.1", 200)
    r = record('%s - "%s %s HTTP/%s" %d', *args, name="uvicorn.access", request_id="a-1")
    text = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(r)
    assert text == '127.0.0.1:5000 - "POST /v1/score HTTP/1.1" 200 OK request_id=a-1'
    doc = json.loads(JsonFormatter().format(r))
    assert (doc["client"], doc["method"], doc["path"], doc["status"]) == args[:3] + (200,)
    assert doc["request_id"] == "a-1"


def test_the_text_line_names_the_request_before_a_traceback() -> None:
    r = failed("failed", ValueError("x"), request_id="r-1")
    first, _, rest = TextFormatter().format(r).partition("\n")
    assert first == "WARNING:ctr.service:failed request_id=r-1"
    assert rest.startswith("Traceback") and "ValueError: x" in rest
    assert TextFormatter().format(record("idle")) == "WARNING:ctr.service:idle"


def test_uvicorns_own_lines_name_the_request_they_were_made_in() -> None:
    r = failed("Exception in ASGI application\n", KeyError("x"), "uvicorn.error", request_id="e-1")
    r.levelno, r.levelname = logging.ERROR, "ERROR"
    first, _, rest = (
        ServerFormatter("%(levelprefix)s %(message)s", use_colors=False).format(r).partition("\n")
    )
    assert first == "ERROR:    Exception in ASGI application request_id=e-1"
    assert "KeyError: 'x'" in rest
    idle = record("Started server process", name="uvicorn.error")
    assert ServerFormatter("%(message)s").format(idle) == "Started server process"


def test_uvicorns_set_up_takes_the_formatters() -> None:
    text, js = uvicorn_log_config("text"), uvicorn_log_config("json")
    assert text["formatters"]["access"]["()"] == "service.logs.AccessFormatter"
    assert text["formatters"]["default"]["()"] == "service.logs.ServerFormatter"
    assert {f["()"] for f in js["formatters"].values()} == {"service.logs.JsonFormatter"}
    assert text["loggers"] == js["loggers"]  # the same loggers, levels and handlers


def test_a_call_whose_arguments_do_not_fit_is_still_one_json_line() -> None:
    line = JsonFormatter().format(record("count %d", "not a number", request_id="r-3"))
    doc = json.loads(line)
    assert doc["message"] == "count %d" and doc["request_id"] == "r-3"
    assert "TypeError" in doc["format_error"] and "not a number" in doc["format_error"]


def test_json_mode_routes_warnings_and_thread_deaths_through_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What Python writes to stderr past logging would not be JSON."""
    hook = threading.excepthook
    try:
        route_stray_output("text")
        assert threading.excepthook is hook  # text: as they were
        route_stray_output("json")
        with caplog.at_level(logging.WARNING):
            warnings.warn("an old call", DeprecationWarning, stacklevel=1)

            def die() -> None:
                raise RuntimeError("thread fault")

            t = threading.Thread(target=die, name="doomed")
            t.start()
            t.join()
        by = {r.name: r for r in caplog.records}
        assert "an old call" in by["py.warnings"].getMessage()
        died = by["ctr.thread"]
        assert died.getMessage() == "exception in thread doomed"
        assert died.exc_info is not None and died.exc_info[0] is RuntimeError
    finally:
        threading.excepthook = hook
        logging.captureWarnings(False)
