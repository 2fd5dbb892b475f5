"""One test per row of the bad-input table in docs/api.md: a 4xx naming the field."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.validate import long_integer
from tests.helpers import REDIS_URL, Built, build_bundle, missing

C = [{"item_id": "i1"}, {"item_id": "i2"}]


def serve(tmp: Any, **settings: Any) -> Iterator[TestClient]:
    """The app on a fresh DIN bundle in ``tmp``, with these settings."""
    built: Built = build_bundle(tmp, "din")
    s = Settings(models_dir=str(built.models_dir), model_name=built.config.name,
                 redis_url=REDIS_URL, **settings)  # fmt: skip
    with TestClient(create_app(s)) as c:
        yield c


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from serve(tmp_path_factory.mktemp("bad"), max_candidates=50, max_body_bytes=20_000)


def check(r: Any, status: int, field: str | None, error: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field, body
    if error:
        assert body["error"] == error
    assert body["detail"]


ROWS: list[tuple[str, Any, int, str | None]] = [
    ("wrong type user_id", {"user_id": 5.5, "candidates": C}, 422, "user_id"),
    ("wrong type candidates", {"user_id": "u1", "candidates": "i1"}, 422, "candidates"),
    ("wrong type item_id", {"user_id": "u1", "candidates": [{"item_id": []}]}, 422,
     "candidates[0].item_id"),
    ("wrong type feature", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"cate_id": {"x": 1}}}]}, 422, "candidates[0].features.cate_id"),
    ("missing user_id", {"candidates": C}, 422, "user_id"),
    ("empty candidates", {"user_id": "u1", "candidates": []}, 422, "candidates"),
    ("too many candidates", {"user_id": "u1",
     "candidates": [{"item_id": f"i{k}"} for k in range(51)]}, 422, "candidates"),
    ("duplicate candidate", {"user_id": "u1", "candidates": [*C, {"item_id": "i1"}]}, 422,
     "candidates[2].item_id"),
    ("unknown top-level field", {"user_id": "u1", "candidates": C, "topk": 3}, 422, "topk"),
    ("unknown candidate field", {"user_id": "u1", "candidates": [{"item_id": "i1", "x": 1}]},
     422, "candidates[0].x"),
    ("very long id", {"user_id": "u" * 300, "candidates": C}, 422, "user_id"),
    ("control chars in id", {"user_id": "u\x00x", "candidates": C}, 422, "user_id"),
    ("C1 control chars in id", {"user_id": "u1", "candidates": [C[0], {"item_id": "i\x9b1"}]},
     422, "candidates[1].item_id"),
    ("empty id", {"user_id": "", "candidates": C}, 422, "user_id"),
    ("top_k zero", {"user_id": "u1", "candidates": C, "top_k": 0}, 422, "top_k"),
    ("top_k negative", {"user_id": "u1", "candidates": C, "top_k": -3}, 422, "top_k"),
    ("top_k float", {"user_id": "u1", "candidates": C, "top_k": 2.5}, 422, "top_k"),
    ("top_k boolean", {"user_id": "u1", "candidates": C, "top_k": True}, 422, "top_k"),
    ("top_k string", {"user_id": "u1", "candidates": C, "top_k": "3"}, 422, "top_k"),
    ("explain not bool", {"user_id": "u1", "candidates": C, "explain": "yes"}, 422, "explain"),
    ("body not an object", [1, 2], 422, "body"),
    ("dense feature as a string", {"user_id": "u1", "candidates": [C[0], {"item_id": "i2",
     "features": {"item_price": "3.5"}}]}, 422, "candidates[1].features.item_price"),
    ("dense feature as a boolean", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"item_price": True}}]}, 422, "candidates[0].features.item_price"),
    ("dense feature as the string NaN", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"item_price": "NaN"}}]}, 422, "candidates[0].features.item_price"),
    # past 2**64 orjson would read these as floats (1e24), losing digits, past the range check
    ("25-digit integer feature", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"cate_id": 10**24 - 1}}]}, 422, "candidates[0].features.cate_id"),
    ("25-digit integer in the context", {"user_id": "u1", "candidates": C,
     "context": {"user_age": 10**24}}, 422, "context.user_age"),
    # a string value is held to the ID length, under a key the model ignores too
    ("long string feature", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"cate_id": "c" * 257}}]}, 422, "candidates[0].features.cate_id"),
    ("long string under an unused context key", {"user_id": "u1", "candidates": C,
     "context": {"not_a_feature": "v" * 300}}, 422, "context.not_a_feature"),
    # below -2**63 orjson reads a 19-digit literal as a float too (-2**63 - 1 as -2**63)
    ("19-digit negative integer feature", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"cate_id": -(2**63) - 1}}]}, 422, "candidates[0].features.cate_id"),
    ("19-digit negative integer in the context", {"user_id": "u1", "candidates": C,
     "context": {"user_age": -(10**19) + 1}}, 422, "context.user_age"),
    # 2**63 is 19 digits: orjson reads it exactly (as an int), the range check refuses it
    ("integer feature of 2**63", {"user_id": "u1", "candidates": [{"item_id": "i1",
     "features": {"cate_id": 2**63}}]}, 422, "candidates[0].features.cate_id"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "field"), ROWS, ids=[r[0] for r in ROWS])
def test_score_bad_input(
    client: TestClient, name: str, body: Any, status: int, field: str | None
) -> None:
    check(client.post("/v1/score", json=body), status, field, "bad_request")


def test_wrong_type_and_missing_field_details_say_what_is_wanted(client: TestClient) -> None:
    """A missing candidate list read "candidates must be a list", and a float ID "must
    be a string", though integers are taken (as their decimal strings)."""
    r = client.post("/v1/score", json={"user_id": "u1"})
    check(r, 422, "candidates", "bad_request")
    assert r.json()["detail"] == "candidates is required"
    for body, field in (({"user_id": 5.5, "candidates": C}, "user_id"),
                        ({"user_id": "u1", "candidates": [{"item_id": 1.5}]},
                         "candidates[0].item_id")):  # fmt: skip
        r = client.post("/v1/score", json=body)
        check(r, 422, field, "bad_request")
        assert r.json()["detail"] == f"{field} must be a string or an integer"
    r = client.post("/v1/events", json={"event_id": "e1", "user_id": True, "item_id": "i1",
                                          "timestamp": 1})
    assert r.status_code == 422 and r.json()["detail"] == "user_id must be a string or an integer"


def test_a_lower_id_length_limit_is_enforced_and_published(tmp_path: Any) -> None:
    """``CTR_MAX_ID_LENGTH`` bounds user, item and event IDs, and the OpenAPI schema says
    the same limit."""
    for c in serve(tmp_path, max_id_length=8):
        assert c.post("/v1/score", json={"user_id": "u" * 8, "candidates": C}).status_code == 200
        check(c.post("/v1/score", json={"user_id": "u" * 9, "candidates": C}), 422, "user_id",
              "bad_request")  # fmt: skip
        long_item = {"user_id": "u1", "candidates": [C[0], {"item_id": "i" * 9}]}
        check(c.post("/v1/score", json=long_item), 422, "candidates[1].item_id", "bad_request")
        event = {"user_id": "u1", "event_id": "e" * 9, "item_id": "i1", "timestamp": 10.0}
        check(c.post("/v1/events", json=event), 422, "event_id", "bad_request")
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        text = json.dumps(schemas)
        assert '"maxLength": 8' in text and '"maxLength": 256' not in text
        # an ID may be an integer too, as the service reads it (13 is "13")
        for model, name in (("ScoreRequest", "user_id"), ("Candidate", "item_id"),
                            ("EventRequest", "event_id")):  # fmt: skip
            forms = schemas[model]["properties"][name]["anyOf"]
            ints = [f for f in forms if f.get("type") == "integer"]
            assert len(ints) == 1 and "at most 8 characters" in ints[0]["description"]
            assert {"type": "string", "minLength": 1, "maxLength": 8} in forms
        assert c.post("/v1/score", json={"user_id": 12345678, "candidates": C}).status_code == 200
        check(c.post("/v1/score", json={"user_id": -12345678, "candidates": C}), 422, "user_id",
              "bad_request")  # fmt: skip


def test_openapi_lists_the_error_answers(client: TestClient) -> None:
    """Every status a route documents in docs/api.md is in its OpenAPI responses."""
    paths = client.get("/openapi.json").json()["paths"]
    codes = {p: set(ops[next(iter(ops))]["responses"]) for p, ops in paths.items()}
    common = {"400", "401", "403", "408", "413", "415", "422", "431"}
    assert common | {"200", "500", "503"} <= codes["/v1/score"]
    assert common | {"202", "500", "503"} <= codes["/v1/events"]
    assert {"200", "503"} <= codes["/readyz"] and {"200", "503"} <= codes["/v1/models"]
    assert common | {"200", "409"} <= codes["/admin/reload"]
    # every route with a body answers a web page's request of another origin with a 403
    # (session 38); the admin route's also says admin_disabled
    for path in ("/v1/score", "/v1/events", "/admin/reload"):
        said = paths[path]["post"]["responses"]["403"]["description"]
        assert "origin_not_allowed" in said and ("admin_disabled" in said) == path.startswith("/a")


def test_openapi_operation_ids_are_unique(client: TestClient) -> None:
    """OpenAPI requires it (client generators break on a repeat): GET and HEAD of the
    health routes were one route, and so one ID."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of a duplicate while it builds
        paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert {"get", "head"} <= set(paths["/healthz"]) and {"get", "head"} <= set(paths["/readyz"])


def test_malformed_json(client: TestClient) -> None:
    r = client.post("/v1/score", content=b'{"user_id": "u1", "candidates": [', headers={
        "content-type": "application/json"})  # fmt: skip
    check(r, 400, "body", "malformed_json")


@pytest.mark.parametrize(
    ("raw", "long"),
    [
        (b'{"a": 99999999999999999999999}', True),
        (b'{"a": [1, -99999999999999999999999]}', True),
        (b'{"x": "a\\\\", "y": 99999999999999999999999}', True),  # after an escaped \\
        (b'{"user_id": "12345678901234567890123"}', False),  # a 20-digit ID string
        (b'{"x": "a\\"99999999999999999999999"}', False),  # inside a string, after \"
        (b'{"x": 0.00024069652516689466}', False),  # a fraction's digits
        (b'{"x": 12345678901234567890.5}', False),  # a float's integer part
        (b'{"x": 1.5e000000000000000000003}', False),  # an exponent
        (b'{"x": 1234567890123456789}', False),  # 19 digits: orjson reads it exactly
        (b'{"x": -9223372036854775809}', True),  # below -2**63: orjson would round it
        (b'{"x": [-9999999999999999999]}', True),
        (b'{"x": "-9223372036854775809"}', False),  # in a string
        (b'{"x": -1234567890123456789.5}', False),  # a float's integer part
    ],
)
def test_only_literals_orjson_would_round_take_the_exact_parse(raw: bytes, long: bool) -> None:
    """The exact (slower) parse is for integer literals orjson would round; a 20-digit ID
    in a string or a long fraction keeps the fast one."""
    assert long_integer(raw) is long
    assert json.loads(raw) is not None  # each case is valid JSON


def test_an_open_string_of_escaped_quotes_does_not_hold_the_loop() -> None:
    """The long-integer scan runs on the event loop before any key check: a string left
    open, full of ``\\"``, made it quadratic (each quote began a scan to the end: 7 s for
    32 KB, hours for a 1 MB body). Not a timing test: the old scan of this body would
    not end within the hour, the new one takes milliseconds; 120 s only catches a hang."""
    import threading

    got: list[bool] = []
    digits = b'{"a": "' + b"1" * 20 + b'"} '  # the pre-filter's 20 digits, in a string
    for evil in (
        b'"' + b'\\"' * 500_000 + b"1" * 20,  # 1 MB, not JSON
        digits + b'"' + b'\\"' * 500_000 + b"\\",  # a lone backslash last
    ):
        scan = threading.Thread(target=lambda e=evil: got.append(long_integer(e)), daemon=True)
        scan.start()
        scan.join(120)
    assert got == [False, False], "the scan of a 1 MB open string did not end"
    # the same as a request: the 400 of any body that does not parse
    assert long_integer(b'{"a": "' + b'\\"' * 10 + b" 123456789012345678901}") is False


def test_an_open_string_body_is_a_400(client: TestClient) -> None:
    raw = b'{"user_id": "u1", "x": "' + b'\\"' * 5_000 + b"1" * 20
    check(client.post("/v1/score", content=raw), 400, "body", "malformed_json")
    check(client.post("/v1/events", content=raw), 400, "body", "malformed_json")


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_json_that_is_not_utf8_is_a_400(client: TestClient, path: str, encoding: str) -> None:
    """RFC 8259: JSON between systems is UTF-8, without a byte-order mark. Python's json
    would guess the encoding of bytes; the service does not."""
    body = {"user_id": "u1", "candidates": C} if path == "/v1/score" else EVENT
    raw = json.dumps(body).encode(encoding)
    check(client.post(path, content=raw), 400, "body", "malformed_json")
    good = client.post(path, content=json.dumps(body).encode("utf-8"))
    assert good.status_code in (200, 202), good.text


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
@pytest.mark.parametrize("depth", [2_000, 9_000])
def test_deeply_nested_json_is_a_400(client: TestClient, path: str, depth: int) -> None:
    # orjson stops at 1024 levels and Python's json at its recursion limit: still a 400
    raw = b'{"user_id": "u1", "context": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    check(client.post(path, content=raw), 400, "body", "malformed_json")
    check(client.post(path, content=b"[" * depth), 400, "body", "malformed_json")


def test_client_gone_before_the_body_is_not_a_server_error(client: TestClient) -> None:
    """A client that disconnects mid-body gets no answer, and it is not a 500."""
    from service import metrics as m

    def count(status: str) -> float:
        v = m.REQUEST_DURATION.labels("/v1/score", "POST", status)
        return sum(s.value for s in v.collect()[0].samples if s.name.endswith("_count"))

    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b'{"user_id": "u1", "cand', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
        "scheme": "http", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    before_499, before_500 = count("499"), count("500")
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    assert sent == []  # nobody to answer
    assert count("499") == before_499 + 1 and count("500") == before_500


def test_empty_body(client: TestClient) -> None:
    """0 bytes: no body (422, as docs/api.md says); whitespace alone is JSON that does
    not parse (400), on both routes that read one."""
    check(client.post("/v1/score", content=b""), 422, "body")
    check(client.post("/v1/score", content=b"  \r\n"), 400, "body", "malformed_json")
    check(client.post("/v1/events", content=b"   "), 400, "body", "malformed_json")


def test_body_over_size_limit(client: TestClient) -> None:
    big = {"user_id": "u1", "candidates": [{"item_id": "i" + "9" * 200} for _ in range(120)]}
    check(client.post("/v1/score", json=big), 413, "body", "payload_too_large")


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
def test_a_content_length_of_5000_digits_is_too_large(client: TestClient, path: str) -> None:
    """uvicorn refuses such a header itself; another server may pass it on, and ``int()``
    refuses a number past 4,300 digits (a 500)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "scheme": "http", "headers": [(b"content-length", b"9" * 5000)],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 413, sent


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_name_the_field(client: TestClient, literal: str) -> None:
    raw = (
        '{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"item_price": '
        + literal
        + "}}]}"
    )
    r = client.post("/v1/score", content=raw.encode(), headers={"content-type": "application/json"})
    check(r, 422, "candidates[0].features.item_price")
    ctx = '{"user_id": "u1", "candidates": [{"item_id": "i1"}], "context": {"hour": ' + literal
    r = client.post("/v1/score", content=(ctx + "}}").encode())
    check(r, 422, "context.hour")


def test_integer_ids_are_their_decimal_strings(client: TestClient) -> None:
    as_int = client.post(
        "/v1/score", json={"user_id": 5, "candidates": [{"item_id": 7}, {"item_id": 8}]}
    )
    as_str = client.post(
        "/v1/score", json={"user_id": "5", "candidates": [{"item_id": "7"}, {"item_id": "8"}]}
    )
    assert as_int.status_code == 200, as_int.text
    strip = as_int.json()["items"]
    assert strip == as_str.json()["items"]
    assert {it["item_id"] for it in strip} == {"7", "8"}
    dup = client.post(
        "/v1/score", json={"user_id": 5, "candidates": [{"item_id": 7}, {"item_id": "7"}]}
    )
    check(dup, 422, "candidates[1].item_id")  # the same item twice
    # past 64 bits too, exactly (orjson alone reads these as floats), whatever else the
    # body holds (a 300-digit top_k made the old parse exact, and only then)
    big = {"user_id": 2**70, "candidates": [{"item_id": 2**64}, {"item_id": 10**24 - 1}]}
    for extra in ({}, {"top_k": 10**300}):
        r = client.post("/v1/score", json={**big, **extra})
        assert r.status_code == 200, r.text
        got = {it["item_id"] for it in r.json()["items"]}
        assert got == {"18446744073709551616", "999999999999999999999999"}


def test_odd_unicode_ids_are_fine(client: TestClient) -> None:
    body = {
        "user_id": "用户-🙂-\u200b-é",
        "candidates": [{"item_id": "ítem-𝔘"}, {"item_id": "i1"}, {"item_id": "\ufeffbom"}],
    }
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200
    assert r.json()["cold_start"] is True
    assert {it["item_id"] for it in r.json()["items"]} == {"ítem-𝔘", "i1", "\ufeffbom"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user_id": "u1", "candidates": [{"item_id": "i1"}], "zz\\ud800": 1}', "zz\\ud800"),
        (
            b'{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"k\\ud800": 1}}]}',
            "candidates[0].features.k\\ud800",
        ),
        (
            b'{"user_id": "u1", "candidates": '
            b'[{"item_id": "i1", "features": {"cate_id": "\\udc00"}}]}',
            "candidates[0].features.cate_id",
        ),
        (
            b'{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"item_price": '
            + b"1" * 400
            + b"}}]}",
            "candidates[0].features.item_price",
        ),
    ],
    ids=["surrogate-top-key", "surrogate-feature-key", "surrogate-value", "huge-int"],
)
def test_unserialisable_input_is_a_4xx(client: TestClient, raw: bytes, field: str) -> None:
    """Input the JSON parser takes but no string or number type can hold: a 422 naming
    where it is (a lone surrogate is shown escaped), never a 400 for the whole body."""
    check(client.post("/v1/score", content=raw), 422, field, "bad_request")


def test_admin_disabled_without_a_key(client: TestClient) -> None:
    r = client.post("/admin/reload", json={})
    assert r.status_code == 403 and r.json()["error"] == "admin_disabled"


def test_lone_surrogate_rejected(client: TestClient) -> None:
    raw = b'{"user_id": "u\\ud800", "candidates": [{"item_id": "i1"}]}'
    check(client.post("/v1/score", content=raw), 422, "user_id", "bad_request")


EVENT = {"user_id": "u1", "event_id": "e1", "item_id": "i1", "timestamp": 10.0}
EVENT_ROWS: list[tuple[str, Any, str]] = [
    ("missing event_id", {k: v for k, v in EVENT.items() if k != "event_id"}, "event_id"),
    ("missing timestamp", {k: v for k, v in EVENT.items() if k != "timestamp"}, "timestamp"),
    ("negative timestamp", {**EVENT, "timestamp": -1}, "timestamp"),
    ("string timestamp", {**EVENT, "timestamp": "yesterday"}, "timestamp"),
    ("millisecond timestamp", {**EVENT, "timestamp": 1764000000000}, "timestamp"),
    ("bad type", {**EVENT, "type": 7}, "type"),
    ("type of 33 characters", {**EVENT, "type": "t" * 33}, "type"),
    ("control character in type", {**EVENT, "type": "click\u0000"}, "type"),
    ("bad features", {**EVENT, "features": [1, 2]}, "features"),
    ("unknown field", {**EVENT, "extra": 1}, "extra"),
    ("long item id", {**EVENT, "item_id": "x" * 1000}, "item_id"),
    ("surrogate feature", {**EVENT, "features": {"cate_id": "\ud800"}}, "features.cate_id"),
    ("huge int feature", {**EVENT, "features": {"x": 10**400}}, "features.x"),
    ("25-digit integer feature", {**EVENT, "features": {"cate_id": 10**24}}, "features.cate_id"),
    (
        "19-digit negative integer feature",
        {**EVENT, "features": {"cate_id": -(2**63) - 1}},
        "features.cate_id",
    ),
    # held to the ID length before the size of all features (CTR_EVENT_MAX_BYTES)
    ("long string feature", {**EVENT, "features": {"big": "b" * 5000}}, "features.big"),
    ("300-digit integer timestamp", {**EVENT, "timestamp": 10**300}, "timestamp"),
    ("timestamp past a float's range", {**EVENT, "timestamp": 10**400}, "timestamp"),
]


@pytest.mark.parametrize(("name", "body", "field"), EVENT_ROWS, ids=[r[0] for r in EVENT_ROWS])
def test_bad_event(client: TestClient, name: str, body: Any, field: str) -> None:
    raw = json.dumps(body).encode()  # ASCII escapes, so lone surrogates can be sent
    check(client.post("/v1/events", content=raw), 422, field)


def test_values_at_the_limits_are_taken(client: TestClient) -> None:
    """The limits docs/api.md gives are inclusive: a feature of -2**63 or 2**63 - 1 is
    scored, an event type of 32 characters is stored (one past either is a 422, above)."""
    for value in (2**63 - 1, -(2**63)):
        body = {"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"cate_id": value}}],
                "context": {"user_age": value}}  # fmt: skip
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, (value, r.text)
    user = f"limits-{uuid.uuid4().hex}"
    r = client.post("/v1/events", json={**EVENT, "user_id": user, "type": "t" * 32})
    assert r.status_code == 202 and r.json()["appended"] is True, r.text


def test_a_features_object_holds_at_most_256_keys(client: TestClient) -> None:
    """Each key is checked on the event loop before the deadline runs: 90,000 context
    keys in a 1 MB body held it 184 ms (a security review, session 47). 256 keys are
    taken; one more is a 422 naming the object, in a score's context and features and in
    an event's features."""
    from service.validate import MAX_FEATURE_KEYS

    assert MAX_FEATURE_KEYS == 256  # the figure docs/api.md gives, and the OpenAPI
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model, prop in (("Candidate", "features"), ("ScoreRequest", "context"),
                        ("EventRequest", "features")):  # fmt: skip
        field = schemas[model]["properties"][prop]
        limit = field.get("maxProperties") or [a.get("maxProperties") for a in field["anyOf"]]
        assert MAX_FEATURE_KEYS in (limit if isinstance(limit, list) else [limit]), field
    many = {f"k{j}": j for j in range(256)}
    over = {**many, "k256": 1}
    ok = {"user_id": "u1", "candidates": [{"item_id": "i1", "features": many}], "context": many}
    assert client.post("/v1/score", json=ok).status_code == 200
    check(client.post("/v1/score", json={**ok, "context": over}), 422, "context", "bad_request")
    body = {**ok, "candidates": [{"item_id": "i0"}, {"item_id": "i1", "features": over}]}
    check(client.post("/v1/score", json=body), 422, "candidates[1].features", "bad_request")
    event = {**EVENT, "user_id": f"keys-{uuid.uuid4().hex}", "features": over}
    check(client.post("/v1/events", json=event), 422, "features", "bad_request")


def test_numbers_are_checked_where_the_model_reads_them() -> None:
    """A candidate's item-side dense keys and the context's user-side dense keys must be
    numbers; the same key elsewhere (the model does not read it there) is not checked."""
    from service.errors import BadRequest
    from service.validate import check_numbers

    dense = (frozenset({"item_price"}), frozenset({"minutes"}))
    check_numbers([{"item_price": 3}, None, {"minutes": "x"}], {"item_price": "3.5"}, dense)
    check_numbers([{"item_price": 2.5}], {"minutes": None}, dense)
    for features, context, field in (
        ([{"item_price": 1.0}, {"item_price": "1"}], {}, "candidates[1].features.item_price"),
        ([None], {"minutes": True}, "context.minutes"),
        ([{"item_price": False}], {}, "candidates[0].features.item_price"),
    ):
        with pytest.raises(BadRequest) as err:
            check_numbers(features, context, dense)
        assert err.value.field == field


def test_an_event_from_the_future_is_a_422(client: TestClient) -> None:
    """The behaviour list is kept in time order: an event stamped days ahead would stay
    the newest for good (and `keep` of them would shut out every real event). Up to
    CTR_EVENT_MAX_FUTURE_S (300 s) ahead is clock skew, and is taken."""
    import time

    user = f"future-{time.time_ns()}"
    ahead = {**EVENT, "user_id": user, "timestamp": time.time() + 86_400}
    check(client.post("/v1/events", json=ahead), 422, "timestamp")
    skewed = {**EVENT, "user_id": user, "event_id": "e2", "timestamp": time.time() + 60}
    r = client.post("/v1/events", json=skewed)
    assert r.status_code == 202 and r.json()["appended"] is True, r.text


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from serve(tmp_path_factory.mktemp("keyed"), api_key="k3y")


KEY = {"X-API-Key": "k3y"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": ["x"]}, "version"),
        ({"version": True}, "version"),
        ({"version": 1.5}, "version"),
        ({"version": -1}, "version"),
        ({"versoin": "1"}, "versoin"),
        ({"": "1"}, "\"\""),  # an empty key: said as the scoring body says it
        ([1], "body"),
        # int() reads these as 1 or as no version: not folder names
        ({"version": "01"}, "version"),
        ({"version": "\uff11"}, "version"),
        ({"version": ""}, "version"),
    ],
    ids=[
        "wrong-type",
        "bool",
        "fraction",
        "negative",
        "misspelt-field",
        "empty-key",
        "not-an-object",
        "leading-zero",
        "full-width-digit",
        "empty",
    ],
)
def test_bad_reload_body(keyed: TestClient, body: Any, field: str) -> None:
    r = keyed.post("/admin/reload", json=body, headers=KEY)
    check(r, 422, field, "bad_request")
    if field == "version":
        # what a version is: -1 and 1.5 read "Input should be a valid string" (numbers
        # are taken)
        assert "a version number (digits, no leading zero) or 'latest'" in r.json()["detail"]
        assert "valid string" not in r.json()["detail"]
        assert "Value error" not in r.json()["detail"]  # pydantic's prefix, not ours
    if field == "versoin":  # as the scoring body says it (pydantic's "Extra inputs...")
        assert r.json()["detail"] == "unknown field 'versoin'"
    # the key is checked first: a caller without it learns nothing about the body
    check(keyed.post("/admin/reload", json=body), 401, "X-API-Key", "unauthorized")


def test_reload_body_optional_and_malformed(keyed: TestClient) -> None:
    r = keyed.post("/admin/reload", headers=KEY)  # no body: the newest version
    assert r.status_code == 200 and r.json()["version"] == "1", r.text
    r = keyed.post("/admin/reload", content=b'{"version": ', headers=KEY)
    check(r, 400, "body", "malformed_json")
    for version in (1, "1"):  # a JSON number or a string
        r = keyed.post("/admin/reload", json={"version": version}, headers=KEY)
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
    schema = keyed.get("/openapi.json").json()["components"]["schemas"]["ReloadRequest"]
    types = {t["type"] for t in schema["properties"]["version"]["anyOf"]}
    assert types == {"string", "integer", "null"}  # as the endpoint takes it


def test_empty_api_key_is_no_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`CTR_API_KEY=` (set, empty) must not let a request without the header through."""
    built: Built = build_bundle(tmp_path, "din")
    monkeypatch.setenv("CTR_API_KEY", "")
    s = Settings(models_dir=str(built.models_dir), model_name=built.config.name,
                 redis_url=REDIS_URL)  # fmt: skip
    assert s.api_key is None
    with TestClient(create_app(s)) as c:
        check(c.post("/admin/reload", json={}), 403, "X-API-Key", "admin_disabled")
        check(c.post("/admin/reload", json={}, headers={"X-API-Key": ""}), 403, "X-API-Key")


def test_an_api_key_from_a_file_matches_without_its_newline(tmp_path: Any) -> None:
    """A secret mounted from a file ends in a newline, which no header can carry (servers
    strip the blanks around a value): kept, the key matched nothing, ever."""
    for c in serve(tmp_path, api_key=" k3y\n"):
        assert c.post("/admin/reload", json={}, headers=KEY).status_code == 200
        check(c.post("/admin/reload", json={}, headers={"X-API-Key": "k3"}), 401, "X-API-Key")


def test_a_non_ascii_api_key_matches_its_utf8_bytes(tmp_path: Any) -> None:
    for c in serve(tmp_path, api_key="clé-ü"):
        ok = c.post("/admin/reload", json={}, headers={"X-API-Key": "clé-ü".encode()})
        assert ok.status_code == 200, ok.text
        bad = c.post("/admin/reload", json={}, headers={"X-API-Key": b"cle-u"})
        check(bad, 401, "X-API-Key", "unauthorized")


def test_an_unknown_method_is_counted_as_other(client: TestClient) -> None:
    """A client's own method token does not become a metric label of its own."""
    from service import metrics as m

    def count(method: str) -> float:
        v = m.REQUEST_DURATION.labels("/healthz", method, "405")
        return sum(s.value for s in v.collect()[0].samples if s.name.endswith("_count"))

    before = count("other")
    assert client.request("BREW", "/healthz").status_code == 405
    assert count("other") == before + 1
    samples = m.REQUEST_DURATION.collect()[0].samples
    assert not any(s.labels.get("method") == "BREW" for s in samples)


@pytest.mark.parametrize(
    "ctype", [None, "application/x-www-form-urlencoded", "text/plain", "application/json"]
)
def test_bodies_are_read_as_json_whatever_their_content_type(
    client: TestClient, ctype: str | None
) -> None:
    """As docs/api.md says: `curl -d` without `-H 'content-type: application/json'` (which
    sends a form type) is answered like any JSON body, on every route that reads one."""
    headers = {} if ctype is None else {"content-type": ctype}
    score = {"user_id": "u1", "candidates": C}
    r = client.post("/v1/score", content=json.dumps(score), headers=headers)
    assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text
    user = f"ct-{uuid.uuid4().hex}"  # a fresh user: the event is new whatever ran before
    event = {"user_id": user, "event_id": "e1", "item_id": "i1", "timestamp": 10.0}
    r = client.post("/v1/events", content=json.dumps(event), headers=headers)
    assert r.status_code == 202 and r.json()["appended"] is True, r.text
    bad = client.post("/v1/score", content=b'{"user_id": "u1"}', headers=headers)
    check(bad, 422, "candidates", "bad_request")


def test_a_lone_surrogate_in_a_context_value_is_named(client: TestClient) -> None:
    """Sent as JSON's escape (json.dumps writes it so; httpx cannot encode it raw)."""
    body = {"user_id": "u1", "candidates": C, "context": {"not_a_feature": "\ud800"}}
    r = client.post("/v1/score", content=json.dumps(body))
    check(r, 422, "context.not_a_feature", "bad_request")


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate, gzip", "br"])
def test_a_compressed_body_is_a_415_naming_the_header(
    client: TestClient, path: str, encoding: str
) -> None:
    """Read as JSON a gzip body is only malformed (orjson's message spoke of surrogates):
    the header is named instead. ``identity`` (no encoding) is read as before."""
    import gzip

    score = {"user_id": "u1", "candidates": C}
    r = client.post(path, content=gzip.compress(json.dumps(score).encode()),
                    headers={"content-encoding": encoding})  # fmt: skip
    check(r, 415, "Content-Encoding", "unsupported_encoding")
    assert encoding in r.json()["detail"]
    plain = {"content-encoding": "identity"}
    ok = client.post("/v1/score", content=json.dumps(score), headers=plain)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
def test_a_repeated_content_encoding_is_read_as_its_list(client: TestClient, path: str) -> None:
    """HTTP joins a repeated list header: ``identity`` then ``gzip`` is a gzip body (only
    the first was read: the gzip bytes parsed as JSON, a 400 malformed_json), and
    ``identity, identity`` is no encoding (a 415 before)."""
    import gzip

    score = {"user_id": "u1", "candidates": C}
    twice = [("content-encoding", "identity"), ("content-encoding", "gzip")]
    r = client.post(path, content=gzip.compress(json.dumps(score).encode()), headers=twice)
    check(r, 415, "Content-Encoding", "unsupported_encoding")
    assert "identity, gzip" in r.json()["detail"]
    same = [("content-encoding", "identity"), ("content-encoding", "identity, identity")]
    ok = client.post("/v1/score", content=json.dumps(score), headers=same)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
def test_a_content_length_with_leading_zeros_is_its_number(client: TestClient, path: str) -> None:
    """``Content-Length: 000…091`` is 91 (HTTP's 1*DIGIT); its 20 characters were
    taken for a number past any limit (a 413)."""
    body = json.dumps({"user_id": "u1", "candidates": C} if path == "/v1/score" else EVENT)
    raw = body.encode()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    length = str(len(raw)).zfill(24).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"content-length", length), (b"content-type", b"application/json")],
    }  # fmt: skip
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] in (200, 202), sent


@pytest.mark.parametrize("path", ["/v1/score/", "/v1/events/", "/v1/models/"])
def test_a_trailing_slash_is_an_unknown_path(client: TestClient, path: str) -> None:
    """A 404, as docs/api.md says of unknown paths; Starlette redirected (307) to the
    path without the slash, naming http:// whatever the client had used."""
    r = client.request("GET" if "models" in path else "POST", path, content=b"{}",
                       follow_redirects=False)  # fmt: skip
    assert r.status_code == 404, (r.status_code, r.headers)
    assert "location" not in r.headers


def test_a_version_past_int_digits_is_no_version() -> None:
    """``int()`` refuses a string past 4,300 digits: /admin/reload answered a 422 with
    Python's own message (set_int_max_str_digits); it is no version, as ``02`` is not."""
    from pydantic import ValidationError

    from ctr.bundle import version_of
    from service.schemas import ReloadRequest

    assert version_of("9" * 5000) is None
    assert version_of("9" * 4300) == int("9" * 4300)
    with pytest.raises(ValidationError) as info:
        ReloadRequest(version="9" * 5000)
    assert "a version number" in str(info.value) and "4300" not in str(info.value)


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
def test_an_upgrade_request_whose_body_did_not_come_is_a_400(client: TestClient, path: str) -> None:
    """uvicorn's parser reads no body after a head that asks to switch protocols: the
    app saw an empty body and answered "body is empty". An ``Upgrade`` request without
    its body now names the header; one whose body did come (as through a server that
    reads it) is served. The real parser's case: ``tests/test_read_timeout.py``."""
    score = {"user_id": "u1", "candidates": C}
    asks = {"upgrade": "h2c", "connection": "Upgrade, HTTP2-Settings"}
    check(client.post(path, content=b"", headers=asks), 400, "Upgrade", "unsupported_upgrade")
    r = client.post("/v1/score", content=json.dumps(score), headers=asks)
    assert r.status_code == 200, r.text



def test_explain_needs_the_key_where_one_is_set(keyed: TestClient) -> None:
    """``explain`` lists the user's own behaviours: with CTR_API_KEY set it needs the
    key even where scoring is open (a security review read a user's history with it)."""
    body = {"user_id": "u1", "candidates": C, "explain": True}
    check(keyed.post("/v1/score", json=body), 401, "X-API-Key", "unauthorized")
    assert keyed.post("/v1/score", json=body, headers=KEY).status_code == 200
    plain = {"user_id": "u1", "candidates": C}
    assert keyed.post("/v1/score", json=plain).status_code == 200  # scoring stays open


def test_a_fused_graph_file_outside_the_bundle_is_refused(tmp_path: Any) -> None:
    """A manifest's fused ``file`` was joined to the bundle's folder as given: a path
    out of it loaded a graph from elsewhere."""
    from ctr.bundle import MANIFEST, BundleError, load_bundle

    built: Built = build_bundle(tmp_path, "din")
    folder = built.models_dir / built.config.name / str(built.version)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("fused") is None:
        missing("no fused graph exported here (no C++ compiler)")
    manifest["fused"]["file"] = "../../" + manifest["fused"]["file"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a file name"):
        load_bundle(built.models_dir, built.config.name, built.version).fused_bytes()


def test_the_load_test_report_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("lt_run", ROOT / "loadtest" / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run._shown("LOCUST_API_KEY", "topsecret") == "***"
    assert run._shown("LOCUST_ZIPF_A", "1.1") == "1.1"
    assert run._without_password("http://me:pw@h:8000/x") == "http://h:8000/x"
    assert run._shown("LOCUST_HOST", "http://me:pw@h:8000") == "http://h:8000"


@pytest.mark.parametrize(
    ("host", "local"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("10.1.2.3", False), ("api.example", False)],
)  # fmt: skip
def test_the_open_service_warning_knows_loopback(host: str, local: bool) -> None:
    from service.app import _loopback

    assert _loopback(host) is local


def test_openapi_declares_the_key_request_id_and_retry_after(tmp_path: Any) -> None:
    """The schema named none of the headers the API reads or sends: /docs could not
    send X-API-Key (every "Try it out" on events and reload was a 401), and generated
    clients left it out. The key is a security scheme, required where the service
    requires it."""
    for c in serve(tmp_path / "open", api_key="k"):
        spec = c.get("/openapi.json").json()
        scheme = spec["components"]["securitySchemes"]["ApiKey"]
        assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
        paths = spec["paths"]
        assert paths["/v1/events"]["post"]["security"] == [{"ApiKey": []}]
        assert paths["/admin/reload"]["post"]["security"] == [{"ApiKey": []}]
        assert paths["/v1/score"]["post"]["security"] == [{}, {"ApiKey": []}]  # open scoring
        # open, but a key holder reads a load's error text there: /docs must send it
        for path, method in (("/readyz", "get"), ("/readyz", "head"), ("/v1/models", "get")):
            assert paths[path][method]["security"] == [{}, {"ApiKey": []}], (path, method)
        # every 503 says Retry-After (a reload's too: a body buffer over its cap), and
        # /readyz's 503 has the body it answers with
        reload_busy = paths["/admin/reload"]["post"]["responses"]["503"]
        assert "Retry-After" in reload_busy["headers"]
        for code in ("200", "503"):
            ready = paths["/readyz"]["get"]["responses"][code]["content"]["application/json"]
            assert ready["schema"] == {"$ref": "#/components/schemas/ReadyBody"}
        real = c.get("/readyz").json()
        assert set(real) == set(spec["components"]["schemas"]["ReadyBody"]["properties"])
        for path in ("/v1/score", "/v1/events", "/healthz"):
            for op in paths[path].values():
                names = [p["name"] for p in op.get("parameters", [])]
                assert "X-Request-ID" in names, (path, names)
        busy = paths["/v1/events"]["post"]["responses"]["503"]
        assert "Retry-After" in busy["headers"]
        # a reload's 409 has its `serving`, and a version is a name the route takes
        comps = spec["components"]["schemas"]
        assert "serving" in comps["ReloadConflict"]["properties"]
        (text,) = [f for f in comps["ReloadRequest"]["properties"]["version"]["anyOf"]
                   if f.get("type") == "string"]  # fmt: skip
        assert text["pattern"] == "^(latest|0|[1-9][0-9]*)$"
        # a wrong method on the health routes lists both methods they take
        for path in ("/healthz", "/readyz"):
            r = c.put(path)
            assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    for c in serve(tmp_path / "closed", api_key="k", protect_scoring=True):
        paths = c.get("/openapi.json").json()["paths"]
        assert paths["/v1/score"]["post"]["security"] == [{"ApiKey": []}]


def test_the_docs_paths_are_labelled_as_themselves(client: TestClient) -> None:
    """FastAPI serves its docs and schema without a route in the scope: they were
    counted as route="unmatched", which is for unknown paths."""
    from service import metrics as m

    def count(route: str) -> float:
        v = m.REQUEST_DURATION.labels(route, "GET", "200")
        return sum(s.value for s in v.collect()[0].samples if s.name.endswith("_count"))

    before = {p: count(p) for p in ("/docs", "/openapi.json", "unmatched")}
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == 200
    assert count("/docs") == before["/docs"] + 1
    assert count("/openapi.json") == before["/openapi.json"] + 1
    assert count("unmatched") == before["unmatched"]


def test_the_native_runner_note_says_why_not_when_turned_off(tmp_path: Any) -> None:
    """/v1/models' native_runner_note was null with CTR_NATIVE_RUNNER=false, where the
    README says it says why not (user_tracking's why_not names its setting)."""
    for c in serve(tmp_path, native_runner=False):
        models = c.get("/v1/models").json()
        assert models["native_runner"] is False or models["native_runner"] is None
        assert models["native_runner_note"] == "CTR_NATIVE_RUNNER=false"


def test_notes_with_paths_are_for_key_holders(tmp_path: Any) -> None:
    """/v1/models showed its notes (a custom-op library's path, a compiler's output)
    to anyone, where model_error and fallback.error are hidden from callers without
    the key."""
    for c in serve(tmp_path, native_runner=False, api_key="k"):
        hidden = c.get("/v1/models").json()
        assert hidden["native_runner_note"] == "hidden: send X-API-Key to read it"
        shown = c.get("/v1/models", headers={"X-API-Key": "k"}).json()
        assert shown["native_runner_note"] == "CTR_NATIVE_RUNNER=false"
        assert shown["graph_note"] is None and hidden["graph_note"] is None  # none: null


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"protect_scoring": True}, "CTR_PROTECT_SCORING=true needs CTR_API_KEY"),
        ({"protect_scoring": True, "api_key": " \n"}, "CTR_PROTECT_SCORING=true needs"),
        ({"allowed_origins": "*"}, "'*' is not an origin to allow"),
        ({"allowed_origins": "https://a.example, null"}, "'null' is not an origin"),
        # as the service compares origins: lower case, no trailing slash
        ({"allowed_origins": "*/"}, "'*/' is not an origin to allow"),
        ({"allowed_origins": "NULL"}, "'NULL' is not an origin"),
        ({"allowed_origins": "null/"}, "'null/' is not an origin"),
        ({"model_name": "../../outside/evil"}, "must be a model name"),
        ({"model_name": "din/1"}, "must be a model name"),
    ],
)
def test_settings_that_would_open_or_escape_are_refused(
    settings: dict, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blank key with CTR_PROTECT_SCORING left scoring, explain and events open (one
    warning); "*" in CTR_ALLOWED_ORIGINS was a wildcard to the GET routes' CORS answer
    and nothing to the service's own check; a model name with a path loaded a bundle
    from outside the store. Each refused at start, naming the setting."""
    from ctr.cli import main
    from service.app import create_app
    from service.settings import Settings

    with pytest.raises(ValueError, match=re.escape(says)):
        create_app(Settings(**settings))
    env = {f"CTR_{k.upper()}": str(v) for k, v in settings.items()}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["serve", "--port", "0"]) == 2  # refused before any worker starts
        assert says in capsys.readouterr().err
        # the commands that only read Redis settings are not refused by them
        assert Settings().redis_url


# ---- session 38 (security review): requests web pages send are refused ------------------


def test_a_request_a_web_page_sends_is_refused_unless_its_origin_is_allowed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies are read as JSON whatever their Content-Type, so a page open in a browser
    beside a key-less service could POST a text/plain "simple request" (no CORS
    preflight): append behaviours to any user's history and, through DNS rebinding,
    read them back with ``explain``. Browsers send ``Origin`` with every POST; API
    clients send none."""
    from service.front import FrontProtocol
    from tests.server_thread import ServerThread

    event = {"user_id": "u5", "event_id": "csrf-1", "item_id": "i_evil", "timestamp": 1e9}
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain", **KEY}
    # listed as people write them: case, a trailing slash, the scheme's default port
    settings = {"allowed_origins": "https://Ranking.Example.com:443/, http://x:81",
                "api_key": "k3y"}  # fmt: skip
    for c in serve(tmp_path, **settings):
        for path, body in (("/v1/score", {"user_id": "u5", "candidates": C, "explain": True}),
                           ("/v1/events", event), ("/admin/reload", {})):  # fmt: skip
            r = c.post(path, content=json.dumps(body), headers=page)
            check(r, 403, "Origin", "origin_not_allowed")
            assert "CTR_ALLOWED_ORIGINS" in r.json()["detail"]
        check(c.post("/v1/events", json=event, headers={"Origin": "null", **KEY}), 403, "Origin")
        assert c.post("/v1/events", json=event, headers=KEY).status_code == 202  # no Origin
        for origin in ("https://ranking.example.com", "http://x:81/"):  # as browsers send them
            r = c.post("/v1/score", json={"user_id": "u5", "candidates": C},
                       headers={"Origin": origin})  # fmt: skip
            assert r.status_code == 200, r.text
        score = {"user_id": "u5", "candidates": C}
        for origin, host, status in [
            ("http://localhost:8000", "localhost:8000", 200),  # /docs' "Try it out"
            ("http://127.0.0.1:8000", "127.0.0.1:8000", 200),
            ("http://[::1]:8000", "[::1]:8000", 200),
            ("http://rebind.evil.example:8000", "rebind.evil.example:8000", 403),  # rebinding
            ("http://localhost:8000", "localhost:9000", 403),  # another service's page
            ("http://localhost.evil.example:8000", "localhost.evil.example:8000", 403),
        ]:
            r = c.post("/v1/score", json=score, headers={"Origin": origin, "Host": host})
            assert r.status_code == status, (origin, host, r.text)
        spec = c.get("/openapi.json").json()["paths"]
        assert "origin_not_allowed" in spec["/v1/score"]["post"]["responses"]["403"]["description"]
        # a listed page may read its answers: the preflight its JSON and key need, and
        # the CORS headers on the answers (score answered before the middleware too)
        tool = "https://ranking.example.com"
        for path in ("/v1/score", "/v1/events", "/admin/reload"):
            pre = c.options(path, headers={"Origin": tool, "Access-Control-Request-Method":
                                           "POST", "Access-Control-Request-Headers":
                                           "content-type, x-api-key"})  # fmt: skip
            assert pre.status_code == 200, (path, pre.text)
            assert pre.headers["access-control-allow-origin"] == tool
            assert "x-api-key" in pre.headers["access-control-allow-headers"].lower()
        # the preflight compares origins as the request does (Starlette's compared them
        # exactly: a 400 for a page whose request is served; review, session 40), and a
        # refused one answers the JSON error body naming the header
        asks = {"Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-api-key"}  # fmt: skip
        for origin in ("https://RANKING.example.com:443", "http://X:81/"):
            pre = c.options("/v1/score", headers={"Origin": origin, **asks})
            assert pre.status_code == 200, (origin, pre.text)
            assert c.post("/v1/score", json=score, headers={"Origin": origin}).status_code == 200
        pre = c.options("/v1/score", headers={"Origin": "https://evil.example", **asks})
        check(pre, 403, "Origin", "origin_not_allowed")
        assert "access-control-allow-origin" not in pre.headers
        pre = c.options("/v1/score", headers={"Origin": tool, **asks,
                                              "Access-Control-Request-Method": "PUT"})
        check(pre, 400, "Access-Control-Request-Method", "cors_refused")
        assert pre.headers["access-control-allow-origin"] == tool  # the page may read it
        pre = c.options("/v1/score", headers={"Origin": tool, **asks,
                                              "Access-Control-Request-Headers": "x-secret"})
        check(pre, 400, "Access-Control-Request-Headers", "cors_refused")
        assert "x-api-key" in pre.json()["detail"]
        r = c.post("/v1/score", json=score, headers={"Origin": tool})
        assert r.headers["access-control-allow-origin"] == tool and "Origin" in r.headers["vary"]
        assert "x-request-id" in r.headers["access-control-expose-headers"]
        r = c.post("/v1/events", json={**event, "event_id": "cors-2"}, headers={"Origin": tool,
                                                                              **KEY})  # fmt: skip
        assert r.status_code == 202 and r.headers["access-control-allow-origin"] == tool
        assert "access-control-allow-origin" not in c.post("/v1/score", json=score).headers
        bad = c.post("/v1/score", json={"user_id": "u5"}, headers={"Origin": tool})  # its errors
        check(bad, 422, "candidates", "bad_request")
        assert bad.headers["access-control-allow-origin"] == tool
        app = c.app
    with ServerThread(app, http=FrontProtocol) as s:  # the front's own scoring route too
        import httpx

        body = json.dumps({"user_id": "u5", "candidates": C})
        check(httpx.post(f"{s.url}/v1/score", content=body, headers=page), 403, "Origin")
        assert httpx.post(f"{s.url}/v1/score", content=body).status_code == 200
        r = httpx.post(f"{s.url}/v1/score", content=body, headers={"Origin": tool})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == tool
        # a bug's 500 (and the shutdown's 503, written the same way) readable by the page
        import service.routes as routes_mod
        from service import metrics as m

        def bug(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(routes_mod, "score_input", bug)
        r = httpx.post(f"{s.url}/v1/score", content=body, headers={"Origin": tool})
        assert r.status_code == 500 and r.headers["access-control-allow-origin"] == tool
        monkeypatch.undo()

        def preflights() -> float:  # counted on their route, not as unknown paths
            return sum(x.value for metric in m.REQUEST_DURATION.collect() for x in metric.samples
                       if x.name.endswith("_count") and x.labels.get("route") == "/v1/score"
                       and x.labels.get("method") == "OPTIONS")  # fmt: skip

        before = preflights()
        pre = httpx.options(f"{s.url}/v1/score", headers={
            "Origin": tool, "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert pre.status_code == 200 and preflights() == before + 1
    for c in serve(tmp_path / "none"):  # no origin listed: no CORS at all, as before
        assert c.options("/v1/score", headers={"Origin": tool, "Access-Control-Request-Method":
                                               "POST"}).status_code == 405  # fmt: skip


def test_top_k_written_as_a_whole_float_is_taken(client: TestClient) -> None:
    """The OpenAPI says integer, which JSON Schema admits 2.0 as: a client writing every
    number as a float got a 422 its schema said it would not (session 37's note)."""
    body = {"user_id": "u1", "candidates": [*C, {"item_id": "i3"}]}
    for k in (2.0, 2):
        r = client.post("/v1/score", json={**body, "top_k": k})
        assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text
    check(client.post("/v1/score", json={**body, "top_k": 2.5}), 422, "top_k", "bad_request")
    check(client.post("/v1/score", json={**body, "top_k": 0.0}), 422, "top_k", "bad_request")
