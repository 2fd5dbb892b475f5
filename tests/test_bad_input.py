"""One test per row of the bad-input table in docs/api.md: a 4xx naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers import REDIS_URL, Built, build_bundle

C = [{"item_id": "i1"}, {"item_id": "i2"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    built: Built = build_bundle(tmp_path_factory.mktemp("bad"), "din")
    s = Settings(
        models_dir=str(built.models_dir),
        model_name=built.config.name,
        redis_url=REDIS_URL,
        max_candidates=50,
        max_body_bytes=20_000,
    )
    with TestClient(create_app(s)) as c:
        yield c


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
    ("empty id", {"user_id": "", "candidates": C}, 422, "user_id"),
    ("top_k zero", {"user_id": "u1", "candidates": C, "top_k": 0}, 422, "top_k"),
    ("top_k negative", {"user_id": "u1", "candidates": C, "top_k": -3}, 422, "top_k"),
    ("top_k float", {"user_id": "u1", "candidates": C, "top_k": 2.5}, 422, "top_k"),
    ("explain not bool", {"user_id": "u1", "candidates": C, "explain": "yes"}, 422, "explain"),
    ("body not an object", [1, 2], 422, "body"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "field"), ROWS, ids=[r[0] for r in ROWS])
def test_score_bad_input(
    client: TestClient, name: str, body: Any, status: int, field: str | None
) -> None:
    check(client.post("/v1/score", json=body), status, field)


def test_malformed_json(client: TestClient) -> None:
    r = client.post("/v1/score", content=b'{"user_id": "u1", "candidates": [', headers={
        "content-type": "application/json"})  # fmt: skip
    check(r, 400, "body", "malformed_json")


def test_empty_body(client: TestClient) -> None:
    check(client.post("/v1/score", content=b""), 422, "body")


def test_body_over_size_limit(client: TestClient) -> None:
    big = {"user_id": "u1", "candidates": [{"item_id": "i" + "9" * 200} for _ in range(120)]}
    check(client.post("/v1/score", json=big), 413, "body", "payload_too_large")


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
    "raw",
    [
        b'{"user_id": "u1", "candidates": [{"item_id": "i1"}], "zz\\ud800": 1}',
        b'{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"k\\ud800": 1}}]}',
        b'{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"cate_id": "\\udc00"}}]}',
        b'{"user_id": "u1", "candidates": [{"item_id": "i1", "features": {"item_price": '
        + b"1" * 400
        + b"}}]}",
    ],
    ids=["surrogate-top-key", "surrogate-feature-key", "surrogate-value", "huge-int"],
)
def test_unserialisable_input_is_a_4xx(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/score", content=raw)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"]


def test_admin_disabled_without_a_key(client: TestClient) -> None:
    r = client.post("/admin/reload", json={})
    assert r.status_code == 403 and r.json()["error"] == "admin_disabled"


def test_lone_surrogate_rejected(client: TestClient) -> None:
    raw = b'{"user_id": "u\\ud800", "candidates": [{"item_id": "i1"}]}'
    r = client.post("/v1/score", content=raw)
    assert r.status_code in (400, 422)
    assert r.json()["field"] in ("body", "user_id")


EVENT = {"user_id": "u1", "event_id": "e1", "item_id": "i1", "timestamp": 10.0}
EVENT_ROWS: list[tuple[str, Any, str]] = [
    ("missing event_id", {k: v for k, v in EVENT.items() if k != "event_id"}, "event_id"),
    ("missing timestamp", {k: v for k, v in EVENT.items() if k != "timestamp"}, "timestamp"),
    ("negative timestamp", {**EVENT, "timestamp": -1}, "timestamp"),
    ("string timestamp", {**EVENT, "timestamp": "yesterday"}, "timestamp"),
    ("bad type", {**EVENT, "type": 7}, "type"),
    ("bad features", {**EVENT, "features": [1, 2]}, "features"),
    ("unknown field", {**EVENT, "extra": 1}, "extra"),
    ("long item id", {**EVENT, "item_id": "x" * 1000}, "item_id"),
    ("surrogate feature", {**EVENT, "features": {"cate_id": "\ud800"}}, "features.cate_id"),
    ("huge int feature", {**EVENT, "features": {"x": 10**400}}, "features.x"),
]


@pytest.mark.parametrize(("name", "body", "field"), EVENT_ROWS, ids=[r[0] for r in EVENT_ROWS])
def test_bad_event(client: TestClient, name: str, body: Any, field: str) -> None:
    raw = json.dumps(body).encode()  # ASCII escapes, so lone surrogates can be sent
    check(client.post("/v1/events", content=raw), 422, field)


def test_bad_reload_body(client: TestClient) -> None:
    r = client.post("/admin/reload", json={"version": ["x"]})
    assert r.status_code == 422 and r.json()["field"] == "version"
