"""Fuzzing: schemathesis against the service's own OpenAPI schema (no 5xx but the
documented 503s), and hypothesis properties of request parsing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.errors import BadRequest
from service.settings import Settings
from service.validate import parse_event, parse_score
from tests.helpers import REDIS_URL, build_bundle
from tests.server_thread import ServerThread


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    built = build_bundle(tmp_path_factory.mktemp("fuzz"), "din")
    s = Settings(
        models_dir=str(built.models_dir), model_name=built.config.name, redis_url=REDIS_URL
    )
    with ServerThread(create_app(s)) as srv:
        yield srv.url


def test_openapi_fuzz_finds_no_server_errors(server_url: str) -> None:
    """Every operation of the service's own schema, ~40 generated cases each."""
    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    seen = []
    for result in schema.get_all_operations():
        op = result.ok()
        seen.append(f"{op.method.upper()} {op.path}")

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(base_url=server_url, timeout=30)
            assert response.status_code < 500, (case.path, case.body, response.text)
            if response.status_code >= 400:
                assert response.json().get("error"), response.text

        run()
    assert {"POST /v1/score", "POST /v1/events", "GET /readyz"} <= set(seen)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    obj=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "user_id": json_values,
                "candidates": st.lists(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries(
                            {"item_id": json_values}, optional={"features": json_values}
                        ),
                    ),
                    max_size=5,
                ),
            },
            optional={"top_k": json_values, "explain": json_values, "context": json_values},
        ),
    )
)
@settings(max_examples=300, deadline=None)
def test_parse_score_accepts_or_names_a_field(obj: Any) -> None:  # fmt: skip
    """Any JSON value either parses into a consistent request or raises BadRequest with a
    field; never another exception."""
    try:
        req = parse_score(obj, max_candidates=10, max_id_len=64)
    except BadRequest as exc:
        assert exc.field and exc.message
        return
    assert 1 <= len(req.item_ids) <= 10
    assert len(set(req.item_ids)) == len(req.item_ids)
    assert req.top_k is None or req.top_k > 0
    assert all(0 < len(i) <= 64 for i in [req.user_id, *req.item_ids])


@given(
    obj=st.dictionaries(
        st.sampled_from(
            ["user_id", "event_id", "item_id", "features", "type", "timestamp", "other"]
        ),
        json_values,
    )
)
@settings(max_examples=300, deadline=None)
def test_parse_event_accepts_or_names_a_field(obj: Any) -> None:  # fmt: skip
    try:
        ev = parse_event(obj, max_id_len=64)
    except BadRequest as exc:
        assert exc.field
        return
    assert ev.timestamp >= 0 and ev.event_id and ev.user_id and ev.item_id


@pytest.mark.parametrize("ts", [-1, -0.0001, 1e12, 1e12 + 1, 1.7e15, float("inf")])
def test_parse_event_refuses_timestamps_outside_unix_seconds(ts: float) -> None:
    """Below 0 or from 1e12 on (milliseconds, not seconds) is refused, naming the field,
    whatever the future-time check would say; the bounds themselves are exact."""
    body = {"user_id": "u", "event_id": "e", "item_id": "i", "timestamp": ts}
    with pytest.raises(BadRequest) as exc:
        parse_event(body, max_id_len=64)
    assert exc.value.field == "timestamp"
    for ok in (0, 0.0, 1e12 - 1, 1764000000.5):
        assert parse_event({**body, "timestamp": ok}, max_id_len=64).timestamp == ok
