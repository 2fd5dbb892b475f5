"""The event loop's lag (``ctr_event_loop_lag_seconds``, ``CTR_LOOP_LAG_INTERVAL_MS``):
a stall of the loop shows as a late timer, and the watcher runs only when asked for."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service import metrics as m
from service.app import create_app
from service.settings import Settings
from tests.helpers import Built, build_and_load, settings_for

NAME = "ctr_event_loop_lag_seconds"


def _sample(suffix: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{NAME}{suffix}", labels) or 0.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_and_load(tmp_path_factory.mktemp("lag"), "din")


def test_a_stalled_loop_shows_as_a_late_timer() -> None:
    count, quick = _sample("_count"), _sample("_bucket", le="0.1")

    async def main() -> None:
        watcher = asyncio.create_task(m.watch_loop_lag(0.01))
        await asyncio.sleep(0.05)  # a few prompt timers
        time.sleep(0.3)  # a blocking call on the loop: the timer due meanwhile runs late
        await asyncio.sleep(0.05)
        watcher.cancel()

    asyncio.run(main())
    observed = _sample("_count") - count
    late = observed - (_sample("_bucket", le="0.1") - quick)
    assert observed >= 4 and late == 1  # one timer ran late, by more than 0.1 s
    assert _sample("_sum") >= 0.2
    # and the worker's worst of the last 30 s is that one
    assert REGISTRY.get_sample_value("ctr_event_loop_lag_max_seconds") >= 0.2


def test_the_worst_lag_is_the_largest_of_the_window() -> None:
    worst = m.WorstLag(30.0)
    assert worst.add(0.0, 0.1) == 0.1
    assert worst.add(1.0, 0.05) == 0.1
    assert worst.add(2.0, 0.07) == 0.1
    assert worst.add(29.9, 0.01) == 0.1  # 0.1 was seen 29.9 s ago: still in
    assert worst.add(30.0, 0.01) == 0.07  # 30 s ago: out; 0.05 was never the largest
    assert worst.add(32.0, 0.02) == 0.02  # 0.07 (at 2.0) out too
    assert worst.add(33.0, 0.5) == 0.5
    assert len(worst.kept) == 1  # nothing smaller than a later value is kept


def test_the_service_watches_its_loop_only_when_asked(built: Built) -> None:
    with TestClient(create_app(settings_for(built, loop_lag_interval_ms=10))) as c:
        time.sleep(0.1)  # the app's loop runs in the client's thread meanwhile
        first = _sample("_count")
        time.sleep(0.2)
        body = c.get("/metrics").text
        assert _sample("_count") - first >= 5  # about 20 due; a busy machine runs fewer
        assert f"{NAME}_bucket" in body
    with TestClient(create_app(settings_for(built, loop_lag_interval_ms=0))) as c:
        before = _sample("_count")
        time.sleep(0.2)
        assert c.get("/healthz").status_code == 200
        assert _sample("_count") == before
        # the worst lag is unknown, not 0
        assert math.isnan(REGISTRY.get_sample_value("ctr_event_loop_lag_max_seconds"))


def test_a_timer_run_early_counts_as_no_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop rounds timers to whole milliseconds, so one may run a little early: that is
    0, never a negative lag (which would lower the histogram's sum, a counter)."""
    real_sleep = asyncio.sleep
    total = _sample("_sum")

    async def early(seconds: float) -> None:
        await real_sleep(seconds / 4)

    async def main() -> None:
        monkeypatch.setattr(m.asyncio, "sleep", early)
        watcher = asyncio.create_task(m.watch_loop_lag(0.2))
        await real_sleep(0.25)
        watcher.cancel()

    before = _sample("_count")
    asyncio.run(main())
    assert _sample("_count") - before >= 3
    assert _sample("_sum") == total


@pytest.mark.parametrize("bad", ["1", "9", "12.5", "-1"])
def test_an_interval_uvloop_cannot_keep_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="loop_lag_interval_ms"):
        Settings(loop_lag_interval_ms=bad)
    assert Settings(loop_lag_interval_ms="10").loop_lag_interval_ms == 10
