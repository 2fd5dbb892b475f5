"""The log formats (``service.logs``, ``CTR_LOG_FORMAT``): JSON lines that always parse
and carry the request's ID, and uvicorn's set-up with access lines that name it.
``tests/test_workers.py::test_log_lines_name_their_request`` runs both under `ctr serve`."""

from __future__ import annotations

import json
import logging
import sys

from service.logs import AccessFormatter, JsonFormatter, TextFormatter, uvicorn_log_config


def record(
    msg: str, *args: object, name: str = "ctr.service", **extra: object
) -> logging.LogRecord:
    r = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_json_lines_carry_the_fields_and_the_request() -> None:
    doc = json.loads(JsonFormatter().format(record("hello %s", "there", request_id="r-1")))
    assert doc["message"] == "hello there" and doc["request_id"] == "r-1"
    assert doc["level"] == "WARNING" and doc["logger"] == "ctr.service"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert json.loads(JsonFormatter().format(record("idle")))["request_id"] is None


def test_json_lines_hold_tracebacks_and_odd_text_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        r = record("failed\nsecond line \ud800", request_id="r-2")
        r.exc_info = sys.exc_info()
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
    try:
        raise ValueError("x")
    except ValueError:
        r = record("failed", request_id="r-1")
        r.exc_info = sys.exc_info()
    first, _, rest = TextFormatter().format(r).partition("\n")
    assert first == "WARNING:ctr.service:failed request_id=r-1"
    assert rest.startswith("Traceback") and "ValueError: x" in rest
    assert TextFormatter().format(record("idle")) == "WARNING:ctr.service:idle"


def test_uvicorns_set_up_takes_the_formatters() -> None:
    text, js = uvicorn_log_config("text"), uvicorn_log_config("json")
    assert text["formatters"]["access"]["()"] == "service.logs.AccessFormatter"
    assert text["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"
    assert {f["()"] for f in js["formatters"].values()} == {"service.logs.JsonFormatter"}
    assert text["loggers"] == js["loggers"]  # the same loggers, levels and handlers
