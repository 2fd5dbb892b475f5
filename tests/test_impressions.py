"""The impression log (``CTR_IMPRESSION_STREAM``, ``service/impressions.py``), against the
real app on a real exported bundle and a real Redis: every scored response is added to
the stream as served; errors are not; shutdown writes what is queued; a Redis that does
not answer drops entries (counted) and never fails a request. ``ctr impressions`` reads
the stream back, labels each ranked item by the user's later behaviours and prints the
served model's online AUC."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis import Redis

from service import impressions as imp_mod
from service.app import create_app
from service.impression_read import Impression, ImpressionReader, OnlineEval, summary
from service.impressions import ImpressionLog
from tests.helpers import REDIS_URL, Built, build_bundle, loaded_redis, settings_for, wait_for
from tests.redis_proc import private_redis

STREAM = "test:impressions"
AGE_S = 600.0  # how far back _age re-dates the logged entries: past a 60 s click window


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("impressions"), "din")


@pytest.fixture
def redis_db(built: Built) -> Iterator[Redis]:
    client = loaded_redis(built)
    client.delete(STREAM)
    yield client
    client.delete(STREAM)


def _logged() -> float:
    return REGISTRY.get_sample_value("ctr_impressions_logged_total") or 0.0


def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("ctr_impressions_dropped_total", {"reason": reason}) or 0.0


def _items(built: Built, n: int) -> list[str]:
    return built.frame["item_id"].astype(str).unique().tolist()[:n]


def _body(user: str, items: list[str], **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "candidates": [{"item_id": i} for i in items], **extra}


def _age(client: Redis, by_s: float = AGE_S) -> None:
    """The stream's entries re-dated ``by_s`` earlier (their ``ts``; IDs and the rest
    kept), as if scored that long ago: a click window shorter than that has closed for
    ``ctr impressions``, which leaves a row whose window is still open out (pending)."""
    entries = client.xrange(STREAM)
    client.delete(STREAM)
    for entry_id, fields in entries:
        client.xadd(STREAM, {**fields, "ts": repr(float(fields["ts"]) - by_s)}, id=entry_id)


def _impressions(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[dict, str]:
    """``ctr impressions`` on the test stream with a 60 s click window (a later
    ``--window-s`` in ``flags`` wins): its JSON summary and its stderr; it ended 0."""
    from ctr.cli import main

    args = ["impressions", "--redis-url", REDIS_URL, "--stream", STREAM, "--window-s", "60"]
    assert main([*args, *flags]) == 0
    printed = capsys.readouterr()
    return json.loads(printed.out), printed.err


def test_each_scored_response_is_logged_as_served(built: Built, redis_db: Redis) -> None:
    items = _items(built, 12)
    sent = [
        _body("u1", items),
        _body("u2", items[:5], context={"hour": 13, "not_a_feature": "kept"}),
        _body("u3", items, top_k=4),
    ]
    before = _logged()
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        t0 = time.time()
        answers = [c.post("/v1/score", json=b) for b in sent]
        t1 = time.time()
        assert all(r.status_code == 200 for r in answers)
        # an error answer is no impression
        assert c.post("/v1/score", json={"user_id": "u1", "candidates": []}).status_code == 422
        wait_for(lambda: redis_db.xlen(STREAM) == 3, "three entries in the stream", 5)
    entries = redis_db.xrange(STREAM)
    assert len(entries) == 3 and _logged() == before + 3
    for (_, fields), body, answer in zip(entries, sent, answers, strict=True):
        assert fields["user_id"] == body["user_id"]
        assert fields["response"] == answer.text  # byte for byte what the caller got
        assert orjson.loads(fields["context"]) == body.get("context", {})
        assert t0 <= float(fields["ts"]) <= t1
    assert len(orjson.loads(entries[2][1]["response"])["items"]) == 4  # top_k: what was served


def test_shutdown_writes_what_is_queued(
    built: Built, redis_db: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imp_mod, "FLUSH_S", 60.0)  # the writer would not wake before the end
    items = _items(built, 6)
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        for k in range(5):
            assert c.post("/v1/score", json=_body(f"u{k}", items)).status_code == 200
        assert redis_db.xlen(STREAM) == 0  # all five still queued
    assert redis_db.xlen(STREAM) == 5


def test_a_redis_that_does_not_answer_holds_entries_and_fails_no_request(built: Built) -> None:
    """Nothing listens at port 1: every response is degraded (no store), its impression
    is held for another try; at shutdown what could not be written is dropped, counted;
    no request failed."""
    before = _dropped("redis") + _dropped("shutdown")
    s = settings_for(built, impression_stream=STREAM, redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(s)) as c:
        for k in range(3):
            r = c.post("/v1/score", json=_body(f"u{k}", _items(built, 5)))
            assert r.status_code == 200 and r.json()["degraded"] is True
        log = c.app.state.ctr.impressions  # type: ignore[attr-defined]
        wait_for(lambda: log.failures >= 2, "two failed writes", 10)
        assert len(log.queue) == 3  # all held for the next try
    assert _dropped("redis") + _dropped("shutdown") == before + 3


@pytest.mark.parametrize("back_after_s", [0.5, None])
def test_shutdown_tries_again_within_its_time(
    back_after_s: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown's first failed write ended the writer: a Redis away for a moment (a
    restart, a CLIENT PAUSE) lost every queued impression, with no log line (the
    counter dies with the process). Writes are now tried again until CLOSE_S; what is
    still lost is said in the log."""
    import logging

    from redis.asyncio import Redis as AsyncRedis

    async def scenario(rp: Any) -> tuple[int, int]:
        client = AsyncRedis.from_url(rp.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        log = ImpressionLog(client, STREAM, 1000, queue=100)
        log.start()
        rp.stop()
        for k in range(5):
            log.add(f"u{k}", {}, b'{"items": []}')
        closing = asyncio.create_task(log.close())
        if back_after_s is not None:
            await asyncio.sleep(back_after_s)
            await asyncio.to_thread(rp.start)  # same port
        await closing
        await client.aclose()
        return log.lost_at_shutdown, (rp.client().xlen(STREAM) if back_after_s else 0)

    with private_redis() as rp, caplog.at_level(logging.WARNING):
        lost, written = asyncio.run(scenario(rp))
    if back_after_s is not None:
        assert (lost, written) == (0, 5)
        assert "at shutdown" not in caplog.text
    else:
        assert lost == 5 and "impression log: 5 entries not written" in caplog.text


def test_a_redis_that_comes_back_gets_every_entry(built: Built) -> None:
    """Writes that fail while Redis is down are tried again: once it is back, every
    impression of the outage is in the stream, none dropped."""
    with private_redis() as rp:
        before = _dropped("redis") + _dropped("queue_full")
        failed = REGISTRY.get_sample_value("ctr_impression_write_failures_total") or 0.0
        s = settings_for(built, redis_url=rp.url, impression_stream=STREAM)
        with TestClient(create_app(s)) as c:
            rp.stop()
            for k in range(4):
                assert c.post("/v1/score", json=_body(f"u{k}", _items(built, 5))).status_code == 200
            log = c.app.state.ctr.impressions  # type: ignore[attr-defined]
            wait_for(lambda: log.failures >= 1, "a failed write", 10)
            assert REGISTRY.get_sample_value("ctr_impression_write_failures_total") >= failed + 1
            rp.start()
            wait_for(lambda: rp.client().xlen(STREAM) == 4, "the held impressions written", 15)
            # the writer marks the write done once Redis's answer is read, a moment after
            # the entries are in the stream (read at once, it flaked in a session-39 run)
            wait_for(lambda: log.failures == 0, "the write counted as done", 5)
            assert len(log.queue) == 0 and rp.client().xlen(STREAM) == 4
        assert _dropped("redis") + _dropped("queue_full") == before


def test_the_queue_is_bounded_and_sampled() -> None:
    log = ImpressionLog(Redis.from_url(REDIS_URL), STREAM, 100, queue=2)  # type: ignore[arg-type]
    before = _dropped("queue_full")
    for k in range(3):
        log.add(f"u{k}", {}, b"{}")
    assert len(log.queue) == 2 and _dropped("queue_full") == before + 1
    random.seed(3)
    half = ImpressionLog(Redis.from_url(REDIS_URL), STREAM, 100, queue=10_000, sample=0.25)  # type: ignore[arg-type]
    for k in range(4000):
        half.add(f"u{k}", {}, b"{}")
    assert 850 < len(half.queue) < 1150


def test_the_queue_is_bounded_in_bytes_and_a_huge_context_keeps_the_models_keys() -> None:
    """A security review logged 0.9 MB per entry (a context of 4,300 keys) and grew a
    worker by 1.6 MB per queued entry while Redis was paused: the queue is bounded in
    bytes too, and a context over MAX_CONTEXT_BYTES keeps only the keys the model reads."""
    log = ImpressionLog(Redis.from_url(REDIS_URL), STREAM, 100, queue=10_000,  # type: ignore[arg-type]
                        queue_bytes=50_000)  # fmt: skip
    before = _dropped("queue_full")
    for k in range(10):
        log.add(f"u{k}", {}, b"x" * 9_000)
    assert len(log.queue) == 5 and _dropped("queue_full") == before + 5
    assert log.queued_bytes == 5 * (9_000 + 2)
    big = {f"k{i:05d}": "v" * 200 for i in range(100)} | {"hour": 13}
    log.queue.clear()
    log.queued_bytes = 0
    log.add("u1", big, b"{}", read={"hour"})
    logged = orjson.loads(log.queue[0][2])
    assert logged == {"hour": 13, "_truncated": len(orjson.dumps(big))}
    small = {"hour": 13, "not_a_feature": "kept"}
    log.add("u2", small, b"{}", read={"hour"})
    assert orjson.loads(log.queue[1][2]) == small  # under the limit: all of it, as sent


def _pairwise_auc(rows: list[Any]) -> float:
    pos = [r.probability for r in rows if r.label]
    neg = [r.probability for r in rows if not r.label]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_ctr_impressions_labels_by_later_behaviours(
    built: Built, redis_db: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctr.cli import main

    items = _items(built, 10)
    user = "u7"
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        served = c.post("/v1/score", json=_body(user, items)).json()["items"]
        now = time.time() - AGE_S  # the scoring's time once _age has re-dated it
        ranked = [it["item_id"] for it in served]

        def event(item: str, ts: float, kind: str = "click") -> None:
            ev = {"user_id": user, "event_id": f"e-{item}-{kind}-{ts}", "item_id": item,
                  "type": kind, "timestamp": ts}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202

        event(ranked[0], now + 5)  # clicked after it was served: 1
        event(ranked[2], now + 20)  # 1
        event(ranked[1], now - 100)  # before the scoring: not this impression's click
        event(ranked[3], now + 10, "view")  # another type: not a click
        event(ranked[4], now + 90)  # past the 60 s window read below
        wait_for(lambda: redis_db.xlen(STREAM) == 1, "the impression written", 5)
    _age(redis_db)
    sync = Redis.from_url(REDIS_URL)
    try:
        rows = list(ImpressionReader(sync, STREAM, "item_id", 60.0, frozenset({"click"})))
    finally:
        sync.close()
    assert [r.item_id for r in rows] == ranked and [r.rank for r in rows] == list(range(1, 11))
    assert {r.item_id for r in rows if r.label} == {ranked[0], ranked[2]}
    assert all(r.user_id == user and r.request_id == rows[0].request_id for r in rows)
    got = summary(rows)
    assert got["rows"] == 10 and got["responses"] == 1 and got["clicks"] == 2
    assert got["auc"] == pytest.approx(_pairwise_auc(rows))
    assert got["observed_ctr"] == pytest.approx(0.2)
    assert got["calibration"] == pytest.approx(got["mean_pred"] / 0.2)
    assert got["gauc"] == pytest.approx(got["auc"])  # one user: GAUC is its AUC
    version = f"{rows[0].model}/{rows[0].version}"
    assert list(got["by_version"]) == [version]
    assert got["by_version"][version]["auc"] == got["auc"]

    out = tmp_path / "impressions.csv"
    args = ["impressions", "--redis-url", REDIS_URL, "--stream", STREAM, "--out", str(out),
            "--window-s", "60"]  # fmt: skip
    assert main(args) == 0
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert [t["item_id"] for t in table] == ranked
    assert sum(int(t["label"]) for t in table) == 2
    assert {t["label_status"] for t in table} == {"labelled"}  # scored AGE_S ago: none pending
    # every type counts with --types ''
    assert main([*args, "--types", ""]) == 0
    with out.open() as f:
        assert sum(int(t["label"]) for t in csv.DictReader(f)) == 3
    capsys.readouterr()
    # a misspelt item key or type labels every row 0: said on stderr, counted in the JSON
    assert main([*args, "--item-key", "itemid"]) == 0
    printed = capsys.readouterr()
    assert "warning: --item-key 'itemid': none of the 5 stored behaviours" in printed.err
    assert re.search(r"fields seen: [^)]*item_id, ts, type\)", printed.err)
    assert json.loads(printed.out)["behaviours"]["without_item_key"] == 5
    assert main([*args, "--types", "clicks"]) == 0
    printed = capsys.readouterr()
    assert "warning: --types clicks: none of the 5 stored behaviours" in printed.err
    assert "types seen: 'click', 'view'" in printed.err
    assert json.loads(printed.out)["behaviours"]["other_types"] == {"click": 4, "view": 1}
    assert main(args) == 0  # the right ones: no warning
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    # no --item-key: the served model's, from its manifest in the store
    assert main([*args, "--models-dir", str(built.models_dir)]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err and "note" not in printed.err
    store = tmp_path / "store"
    shutil.copytree(built.models_dir, store)
    path = store / rows[0].model / rows[0].version / "manifest.json"
    manifest = json.loads(path.read_text())
    item = next(f for f in manifest["config"]["features"] if f["name"] == "item_id")
    item["column"] = "sku"  # a model whose behaviours carry the ID under another field
    path.write_text(json.dumps(manifest))
    assert main([*args, "--models-dir", str(store)]) == 0
    assert "warning: --item-key 'sku': none of the 5" in capsys.readouterr().err
    assert main([*args, "--models-dir", str(tmp_path / "none")]) == 0  # no manifest there
    printed = capsys.readouterr()
    assert "note: --item-key item_id (the served model's manifest was not found" in printed.err
    assert "warning" not in printed.err
    assert json.loads(printed.out)["behaviours"] == {
        "stamped": 5, "without_item_key": 0, "counted": 4, "other_types": {"view": 1}}  # fmt: skip


def test_the_writer_flushes_without_waiting_for_a_full_batch(built: Built, redis_db: Redis) -> None:
    """A queued entry reaches Redis within FLUSH_S of being queued, batch or not."""

    async def scenario() -> int:
        from redis.asyncio import Redis as AsyncRedis

        client = AsyncRedis.from_url(REDIS_URL)
        log = ImpressionLog(client, STREAM, 100, queue=100)
        task = asyncio.ensure_future(log.run())
        log.add("u1", {"hour": 1}, b'{"items": []}')
        await asyncio.sleep(imp_mod.FLUSH_S * 3)
        n = int(await client.xlen(STREAM))
        await log.close()
        task.cancel()
        await client.aclose()
        return n

    assert asyncio.run(scenario()) == 1


def test_a_response_past_its_deadline_is_no_impression(
    built: Built, redis_db: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 deadline_exceeded (the scoring finished, its deadline had passed) is not
    what the caller got: not logged."""
    import service.routes as routes_mod

    real = routes_mod.score_input

    def slow_parse(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return real(*args, **kwargs)

    s = settings_for(built, impression_stream=STREAM, request_timeout_ms=200)
    with TestClient(create_app(s)) as c:
        monkeypatch.setattr(routes_mod, "score_input", slow_parse)
        r = c.post("/v1/score", json=_body("u1", _items(built, 5)))
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded"
        monkeypatch.setattr(routes_mod, "score_input", real)
        assert c.post("/v1/score", json=_body("u2", _items(built, 5))).status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) >= 1, "the 200 written", 5)
    entries = redis_db.xrange(STREAM)
    assert [f["user_id"] for _, f in entries] == ["u2"]



def test_the_reader_pages_reads_a_retried_entry_once_and_skips_unreadable_ones(
    built: Built, redis_db: Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ten responses for five users, read three entries a page and two users' histories
    a round trip: every item is read once, labelled by its own user's click; an entry
    stored twice (a write retried after Redis had taken it) is read once; a foreign
    entry is skipped (two of them, not one and a repeat); the CLI prints the same
    counts."""
    from ctr.cli import main
    from service import impression_read

    monkeypatch.setattr(impression_read, "USERS_PER_TRIP", 2)
    items = _items(built, 6)
    users = [f"r{k}" for k in range(5)]
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        for user in users * 2:
            assert c.post("/v1/score", json=_body(user, items)).status_code == 200
        now = time.time() - AGE_S  # the scorings' time once _age has re-dated them
        for k, user in enumerate(users):  # user k clicks item k, after both scorings
            ev = {"user_id": user, "event_id": f"click-{user}", "item_id": items[k],
                  "type": "click", "timestamp": now + 5}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202
        wait_for(lambda: redis_db.xlen(STREAM) == 10, "the impressions written", 5)
    _age(redis_db)
    logged = redis_db.xrange(STREAM)
    redis_db.xadd(STREAM, logged[3][1])  # the same fields again: a retried write
    redis_db.xadd(STREAM, {"something": "else"})
    redis_db.xadd(STREAM, {"other": "thing"})  # also no ts, user or response: not a repeat
    sync = Redis.from_url(REDIS_URL)
    try:
        reader = ImpressionReader(sync, STREAM, "item_id", 60.0, frozenset({"click"}), page=3)
        rows = list(reader)
    finally:
        sync.close()
    assert (reader.entries, reader.duplicates, reader.unreadable) == (10, 1, 2)
    assert len(rows) == 60 and len({(r.entry, r.item_id) for r in rows}) == 60
    assert {(r.user_id, r.item_id) for r in rows if r.label} == {
        (u, items[k]) for k, u in enumerate(users)
    }
    assert sum(r.label for r in rows) == 10  # each click labels both of its user's scorings

    args = ["impressions", "--redis-url", REDIS_URL, "--stream", STREAM, "--window-s", "60"]
    assert main(args) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert (printed["entries"], printed["duplicates"], printed["unreadable"]) == (10, 1, 2)
    assert printed["rows"] == 60 and printed["clicks"] == 10 and printed["responses"] == 10
    assert printed["pending"] == 0 and printed["unreadable_histories"] == 0
    assert printed["auc"] == pytest.approx(summary(rows)["auc"])
    # each served version's offline test figures from its manifest, beside the online
    served = f"{rows[0].model}/{rows[0].version}"
    manifest = orjson.loads(
        (built.models_dir / rows[0].model / rows[0].version / "manifest.json").read_bytes()
    )
    assert main([*args, "--models-dir", str(built.models_dir)]) == 0
    offline = orjson.loads(capsys.readouterr().out)["by_version"][served]["offline"]
    assert offline["auc"] == manifest["metrics"]["test"]["auc"]
    assert main([*args, "--models-dir", str(built.models_dir / "elsewhere")]) == 0
    assert orjson.loads(capsys.readouterr().out)["by_version"][served]["offline"] is None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_row_whose_click_window_is_still_open_is_pending(
    built: Built, redis_db: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every row was labelled, those scored a moment before the read too: a response
    whose click had not come yet counted as unclicked, and the same impressions read
    again later had other labels (impressions review, session 39). A row scored less
    than ``--window-s`` before the command's start (Redis's clock) is pending now: in
    the CSV without a label, out of every figure, counted; a stream whose oldest entry
    is that young (every row pending) is a warning, naming the trimming when the
    stream has lost entries."""

    items = _items(built, 5)
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        assert c.post("/v1/score", json=_body("old", items)).status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) == 1, "the first impression written", 5)
        _age(redis_db)  # scored AGE_S ago: its 60 s window has closed
        assert c.post("/v1/score", json=_body("new", items)).status_code == 200
        now = time.time()
        for user, ts in (("old", now - AGE_S + 5), ("new", now + 5)):  # each clicks items[0]
            ev = {"user_id": user, "event_id": f"click-{user}", "item_id": items[0],
                  "type": "click", "timestamp": ts}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202
        wait_for(lambda: redis_db.xlen(STREAM) == 2, "the second impression written", 5)
    out = tmp_path / "rows.csv"
    got, err = _impressions(capsys, "--out", str(out))
    assert (got["rows"], got["responses"], got["clicks"]) == (5, 1, 1)  # the old entry's
    assert got["pending"] == 5  # the new one's rows
    assert got["entries"] == 2 and got["observed_ctr"] == pytest.approx(0.2)
    assert got["by_version"][next(iter(got["by_version"]))]["rows"] == 5
    assert got["now"] == pytest.approx(time.time(), abs=30)
    assert "pending" not in err  # one entry's window has closed: no warning
    table = _read_csv(out)
    assert len(table) == 10
    new = {(t["label"], t["label_status"]) for t in table if t["user_id"] == "new"}
    assert new == {("", "pending")}
    old = [(t["item_id"], t["label"], t["label_status"]) for t in table if t["user_id"] == "old"]
    assert sorted(old) == sorted((i, str(int(i == items[0])), "labelled") for i in items)
    # the reader alike, given the time to read at (None: every row labelled as it stands)
    sync = Redis.from_url(REDIS_URL)
    try:
        reader = ImpressionReader(sync, STREAM, "item_id", 60.0, now=time.time())
        rows = list(reader)
        labelled = list(ImpressionReader(sync, STREAM, "item_id", 60.0))
    finally:
        sync.close()
    assert reader.pending == 5 and [r.label for r in rows if r.user_id == "new"] == [None] * 5
    assert summary(rows)["rows"] == 5 and summary(labelled)["rows"] == 10
    # the stream trimmed to the entries of the last minute: every row pending, said
    redis_db.xtrim(STREAM, maxlen=1, approximate=False)
    got, err = _impressions(capsys)
    assert (got["rows"], got["pending"], got["by_version"]) == (0, 5, {})
    assert re.search(r"warning: the stream's oldest entry was scored \d+ s ago, within "
                     r"--window-s 60: every row is pending", err)  # fmt: skip
    assert "it has lost 1 of the 2 entries added" in err
    assert "raise CTR_IMPRESSION_MAXLEN" in err
    got, _ = _impressions(capsys, "--window-s", "0.001")  # a shorter window: labelled
    assert (got["rows"], got["pending"]) == (5, 0)


def test_a_history_redis_cannot_read_leaves_only_its_users_rows_out(
    built: Built, redis_db: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One user's history key of another type failed the whole command: the pipeline
    of histories raised WRONGTYPE, no figures, the CSV cut short (impressions review,
    session 39). That user's rows are now written without a label and left out of the
    figures, counted and named on stderr; every other row is read as before."""

    items = _items(built, 4)
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        for user in ("good", "bad"):
            assert c.post("/v1/score", json=_body(user, items)).status_code == 200
        ev = {"user_id": "good", "event_id": "click-good", "item_id": items[1], "type": "click",
              "timestamp": time.time() - AGE_S + 5}  # fmt: skip
        assert c.post("/v1/events", json=ev).status_code == 202
        wait_for(lambda: redis_db.xlen(STREAM) == 2, "the impressions written", 5)
    _age(redis_db)
    redis_db.delete("{u:bad}:seq")
    redis_db.set("{u:bad}:seq", "not a list")
    out = tmp_path / "rows.csv"
    got, err = _impressions(capsys, "--out", str(out))
    assert (got["rows"], got["responses"], got["clicks"]) == (4, 1, 1)
    assert got["unreadable_histories"] == 1 and got["unreadable_history_rows"] == 4
    assert got["pending"] == 0
    assert "warning: 1 user histories could not be read ('bad': WRONGTYPE" in err
    assert "their 4 rows have no label" in err
    table = _read_csv(out)
    assert [(t["label"], t["label_status"]) for t in table if t["user_id"] == "bad"] == [
        ("", "unreadable_history")
    ] * 4
    assert [t["label"] for t in table if t["user_id"] == "good"] == [
        str(int(t["item_id"] == items[1])) for t in table if t["user_id"] == "good"
    ]


def test_an_entry_with_a_field_name_that_is_not_utf8_is_unreadable(
    built: Built, redis_db: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A foreign entry whose field name is not UTF-8 crashed the command
    (UnicodeDecodeError): it is now an unreadable entry like any other foreign one, and
    a copy of it is read once (a duplicate)."""
    from ctr.cli import main

    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        assert c.post("/v1/score", json=_body("u1", _items(built, 3))).status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) == 1, "the impression written", 5)
    _age(redis_db)
    raw = Redis.from_url(REDIS_URL)  # bytes: the name as stored
    try:
        for _ in range(2):
            raw.xadd(STREAM, {b"\xff\xfe": b"v", b"ts": b"1"})
        reader = ImpressionReader(raw, STREAM, "item_id", 60.0)
        rows = list(reader)
    finally:
        raw.close()
    assert (reader.entries, reader.duplicates, reader.unreadable, len(rows)) == (1, 1, 1, 3)
    args = ["impressions", "--redis-url", REDIS_URL, "--stream", STREAM, "--window-s", "60"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["entries"], got["duplicates"], got["unreadable"], got["rows"]) == (1, 1, 1, 3)


def test_online_figures_per_version_match_the_offline_metrics() -> None:
    """OnlineEval's flat arrays give what ``training.metrics.evaluate`` gives on the
    rows themselves, over all rows and for each model version apart."""
    from training.metrics import evaluate

    rng = random.Random(3)
    rows = []
    for entry in range(40):
        version = "din/1" if entry % 3 else "din/2"
        user = f"u{rng.randrange(7)}"
        for rank in range(1, 6):
            rows.append(Impression(
                f"{entry}-0", 0.0, f"req{entry}", user, *version.split("/"), rank,
                f"i{rng.randrange(20)}", round(rng.random(), 2), False, False,
                int(rng.random() < 0.3),
            ))  # fmt: skip
    got = OnlineEval().add_all(rows).summary()

    def offline(rs: list[Impression]) -> dict[str, Any]:
        ev = evaluate([r.user_id for r in rs], [r.label for r in rs], [r.probability for r in rs])
        return {k: v for k, v in ev.items() if k != "n"}

    assert got["rows"] == 200 and got["responses"] == 40
    assert got["clicks"] == sum(r.label for r in rows)
    for key, value in offline(rows).items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert sorted(got["by_version"]) == ["din/1", "din/2"]
    for name, figures in got["by_version"].items():
        part = [r for r in rows if f"{r.model}/{r.version}" == name]
        assert figures["rows"] == len(part) and figures["responses"] == len(part) // 5
        for key, value in offline(part).items():
            assert figures[key] == pytest.approx(value, rel=1e-12), (name, key)


def test_a_failed_write_puts_back_no_more_than_the_bytes_bound() -> None:
    """A failed write put its batch back checking the entry count only: the queue went
    past its bytes bound by a batch."""
    from redis.asyncio import Redis as AsyncRedis

    log = ImpressionLog(AsyncRedis.from_url("redis://127.0.0.1:1/0"), STREAM, 100,  # type: ignore[arg-type]
                        queue=10_000, queue_bytes=50_000)  # fmt: skip
    for k in range(5):
        log.add(f"u{k}", {}, b"x" * 9_000)
    asyncio.run(log.flush())  # nothing answers at port 1: the batch goes back
    for k in range(5):  # meanwhile new ones filled the room
        log.add(f"v{k}", {}, b"x" * 9_000)
    assert log.queued_bytes <= 50_000
    assert log.queued_bytes == sum(len(e[2]) + len(e[3]) for e in log.queue)


def test_a_batch_redis_took_in_part_sends_again_only_what_it_refused() -> None:
    """Redis at ``maxmemory`` under ``noeviction`` takes a batch's first entries and
    refuses the rest (OOM): the whole batch went back to the queue and was sent again,
    its taken entries stored two or three times (fault review s42). Only the refused
    ones go back; every entry is in the stream once when memory is freed, and the
    logged count is what Redis took."""
    from redis.asyncio import Redis as AsyncRedis

    async def scenario(url: str) -> tuple[bool, int, int, bool, int]:
        sync = Redis.from_url(url)
        sync.config_set("maxmemory-policy", "noeviction")
        sync.config_set("maxmemory", int(sync.info("memory")["used_memory"]) + 150_000)
        client = AsyncRedis.from_url(url)
        log = ImpressionLog(client, STREAM, 100_000, queue=10_000)  # type: ignore[arg-type]
        for k in range(32):  # ~8 KB each: the limit is reached part-way through the batch
            log.add(f"u{k}", {}, b'{"request_id":"r%d"}' % k + b" " * 8_000)
        first = await log.flush()
        taken, back = sync.xlen(STREAM), len(log.queue)
        sync.config_set("maxmemory", 0)
        second = await log.flush()
        await client.aclose()
        return first, taken, back, second, sync.xlen(STREAM)

    logged = REGISTRY.get_sample_value("ctr_impressions_logged_total") or 0.0
    with private_redis() as rp:
        first, taken, back, second, total = asyncio.run(scenario(rp.url))
        ids = [orjson.loads(f["response"])["request_id"]
               for _, f in rp.client().xrange(STREAM)]  # fmt: skip
    assert first is False and 0 < taken < 32 and back == 32 - taken
    assert second is True and total == 32
    assert sorted(ids) == sorted(f"r{k}" for k in range(32))
    assert REGISTRY.get_sample_value("ctr_impressions_logged_total") == logged + 32


@pytest.mark.parametrize("bound", ["entries", "bytes"])
def test_a_failed_write_puts_its_oldest_entries_back_first_in_order(bound: str) -> None:
    """A failed write puts its batch back at the front of the queue, in order, ahead of
    the entries added while it was out; where the queue's bound (entries, or bytes)
    leaves room for part of it, the batch's oldest go back and its newest are dropped
    (counted)."""
    import socket

    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    async def scenario() -> list[str]:
        # a server that takes connections and never answers: the write times out
        with socket.create_server(("127.0.0.1", 0)) as silent:
            client = AsyncRedis(host="127.0.0.1", port=silent.getsockname()[1],
                                socket_timeout=0.3, retry=Retry(NoBackoff(), 0))  # fmt: skip
            # each entry holds 1,002 bytes: "{}" and its 1,000-byte response
            bounds = {"queue": 5} if bound == "entries" else {"queue": 100, "queue_bytes": 5_010}
            log = ImpressionLog(client, STREAM, 100, **bounds)  # type: ignore[arg-type]
            for k in range(4):
                log.add(f"u{k}", {}, b"x" * 1_000)
            writing = asyncio.create_task(log.flush())
            for _ in range(10_000):  # until the batch is out, its write waiting for an answer
                if not log.queue:
                    break
                await asyncio.sleep(0)
            assert not log.queue, "the flush took no batch"
            for k in range(3):
                log.add(f"v{k}", {}, b"x" * 1_000)
            assert await writing is False
            await client.aclose()
            assert log.queued_bytes == 5 * 1_002
            return [entry[1] for entry in log.queue]

    before = _dropped("redis")
    assert asyncio.run(scenario()) == ["u0", "u1", "v0", "v1", "v2"]
    assert _dropped("redis") == before + 2


def test_the_context_and_queue_bounds_are_inclusive() -> None:
    """A context of exactly MAX_CONTEXT_BYTES as JSON is logged whole (one byte more
    keeps only the keys the model reads); entries that fill the bytes bound exactly
    are queued (one byte more is dropped, counted)."""
    limit = imp_mod.MAX_CONTEXT_BYTES
    log = ImpressionLog(Redis.from_url(REDIS_URL), STREAM, 100, queue=10)  # type: ignore[arg-type]
    exact = {"k": "v" * (limit - len(orjson.dumps({"k": ""})))}
    assert len(orjson.dumps(exact)) == limit
    log.add("u1", exact, b"{}", read={"hour"})
    assert orjson.loads(log.queue[-1][2]) == exact
    over = {"k": exact["k"] + "v", "hour": 1}
    log.add("u2", over, b"{}", read={"hour"})
    assert orjson.loads(log.queue[-1][2]) == {"hour": 1, "_truncated": len(orjson.dumps(over))}
    full = ImpressionLog(Redis.from_url(REDIS_URL), STREAM, 100, queue=10, queue_bytes=200)  # type: ignore[arg-type]
    before = _dropped("queue_full")
    for k in range(2):
        full.add(f"u{k}", {}, b"x" * 98)  # 100 bytes each: "{}" and the response
    assert len(full.queue) == 2 and full.queued_bytes == 200
    full.add("u2", {}, b"")  # 2 bytes past the bound
    assert len(full.queue) == 2 and _dropped("queue_full") == before + 1


@pytest.mark.parametrize("plain", [False, True], ids=["front", "plain"])
def test_a_response_the_client_never_got_is_no_impression(
    built: Built, redis_db: Redis, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    """A client that gave up before its answer was written (its timeout shorter than
    the service's) was logged as shown, though the service counts it 499: ``ctr
    impressions`` labelled its rows unclicked, as the user never saw them, biasing the
    online figures against the slow requests (concurrency review, session 38). On the
    plain protocol (``CTR_HTTP_FRONT=false``) too, where uvicorn's send to a gone
    client is silent: it was counted 200 and logged (session 39)."""
    import socket

    import httpx

    import service.routes as routes_mod
    from service.front import FrontProtocol, TimedProtocol
    from tests.server_thread import ServerThread

    real = routes_mod.score_input

    def slow_parse(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return real(*args, **kwargs)

    def answered(status: str) -> float:
        return REGISTRY.get_sample_value(
            "ctr_request_duration_seconds_count",
            {"route": "/v1/score", "method": "POST", "status": status},
        ) or 0.0  # fmt: skip

    body = json.dumps(_body("u1", _items(built, 5))).encode()
    head = f"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
    app = create_app(settings_for(built, impression_stream=STREAM))
    with ServerThread(app, http=TimedProtocol if plain else FrontProtocol) as s:
        before = answered("499")
        monkeypatch.setattr(routes_mod, "score_input", slow_parse)
        for _ in range(3):  # sent, then gone before the answer
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(head.encode() + body)
                time.sleep(0.05)
        wait_for(lambda: answered("499") - before == 3, "the three counted 499", 5)
        monkeypatch.setattr(routes_mod, "score_input", real)
        time.sleep(imp_mod.FLUSH_S * 3)
        assert redis_db.xlen(STREAM) == 0
        r = httpx.post(f"{s.url}/v1/score", content=body)
        assert r.status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) == 1, "the delivered answer logged", 5)


def test_the_figures_are_split_by_how_each_answer_was_served() -> None:
    """An answer served without Redis (degraded) or for a user Redis holds nothing of
    (cold start) scores without the history the offline figures measured: mixed in, they
    pulled the model's online AUC away from what it is where it had the history. The
    summary keeps the figures over all rows and adds them per way of serving
    (``by_serving``), each equal to the figures of its rows alone."""
    from sklearn.metrics import roc_auc_score

    rng = random.Random(7)
    rows, kinds = [], {"full": [], "cold_start": [], "degraded": []}
    for r in range(60):
        kind = ("full", "cold_start", "degraded")[r % 3]
        for rank in range(4):
            label = rng.random() < 0.3
            # the full answers rank well, the others at random
            prob = (0.6 if label else 0.3) + rng.random() * 0.2 if kind == "full" else rng.random()
            imp = Impression(f"{r}-0", 1.0, f"q{r}", f"u{r % 7}", "din", "1", rank,
                             f"i{rank}", prob, kind == "degraded", kind == "cold_start",
                             int(label))  # fmt: skip
            rows.append(imp)
            kinds[kind].append(imp)
    got = summary(rows)
    assert got["rows"] == 240 and got["responses"] == 60
    assert set(got["by_serving"]) == {"full", "cold_start", "degraded"}
    for kind, mine in kinds.items():
        part = got["by_serving"][kind]
        want = roc_auc_score([i.label for i in mine], [i.probability for i in mine])
        assert (part["rows"], part["responses"]) == (80, 20), kind
        assert part["auc"] == pytest.approx(want), kind
        assert part["clicks"] == sum(i.label for i in mine)
    assert got["by_serving"]["full"]["auc"] > 0.9 > got["auc"]
    # degraded wins over cold start (a degraded answer cannot tell a user is unknown)
    both = Impression("x-0", 1.0, "x", "ux", "din", "1", 0, "i0", 0.5, True, True, 1)
    assert summary([both])["by_serving"]["degraded"]["rows"] == 1


def test_a_row_whose_click_may_have_expired_with_its_history_is_censored(
    built: Built,
    redis_db: Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With CTR_SEQUENCE_TTL_S a user's history expires that long after their last
    event, a click in it too: read later than that, the click's row was labelled 0,
    counted as labelled (a writes review, session 46). A row labelled 0 whose window
    began more than the TTL before the read, of a user whose history is gone or holds
    only events stamped more than the TTL after the window began (one re-made after it
    expired), is censored; an event within the TTL of the window (the history kept
    alive) or a loaded entry (not expired since the load) keeps its 0."""
    items = _items(built, 3)
    loaded = str(built.frame["user_id"].iloc[0])  # a user ctr load wrote a history for
    users = ("gone", "alive", "remade", loaded)
    with TestClient(create_app(settings_for(built, impression_stream=STREAM))) as c:
        for user in users:
            assert c.post("/v1/score", json=_body(user, items)).status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) == 4, "the impressions written", 5)
        _age(redis_db)  # scored AGE_S (600 s) ago; the TTL below is 300 s
        scored = time.time() - AGE_S
        events = [("gone", "click", items[0], 10), ("alive", "click", items[0], 10),
                  ("alive", "view", items[1], 200), ("remade", "view", items[1], 400)]  # fmt: skip
        for k, (user, kind, item, after) in enumerate(events):
            ev = {"user_id": user, "event_id": f"t{k}", "item_id": item, "type": kind,
                  "timestamp": min(scored + after, time.time())}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202, ev
    redis_db.delete("{u:gone}:seq")  # expired: 300 s after its click, no event since
    assert redis_db.llen(f"{{u:{loaded}}}:seq") > 0
    sync = Redis.from_url(REDIS_URL)
    try:
        rows = list(ImpressionReader(sync, STREAM, "item_id", 60.0, skew_s=1.0,
                                     now=time.time(), ttl_s=300.0))  # fmt: skip
        plain = list(ImpressionReader(sync, STREAM, "item_id", 60.0, skew_s=1.0,
                                      now=time.time()))  # fmt: skip
    finally:
        sync.close()
    got = {(r.user_id, r.item_id): (r.label, r.label_status) for r in rows}
    censored = (None, "censored")
    assert {i: got["gone", i] for i in items} == dict.fromkeys(items, censored)
    assert {i: got["remade", i] for i in items} == dict.fromkeys(items, censored)
    assert {i: got["alive", i] for i in items} == {i: (int(i == items[0]), "labelled")
                                                   for i in items}  # fmt: skip
    assert {got[loaded, i] for i in items} == {(0, "labelled")}
    assert {r.label_status for r in plain} == {"labelled"}  # no TTL: as before
    monkeypatch.setenv("CTR_SEQUENCE_TTL_S", "300")
    figures, err = _impressions(capsys)
    assert (figures["censored"], figures["censored_expired"], figures["rows"]) == (6, 6, 6)
    assert figures["sequence_ttl_s"] == 300 and figures["clicks"] == 1
    assert "6 rows that would be labelled 0 are censored" in err and "TTL" in err
    monkeypatch.delenv("CTR_SEQUENCE_TTL_S")
    figures, err = _impressions(capsys)
    assert (figures["censored"], figures["censored_expired"], figures["rows"]) == (0, 0, 12)


def test_a_row_whose_click_may_have_been_trimmed_is_censored(
    built: Built, redis_db: Redis, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The service keeps the newest CTR_SEQUENCE_KEEP behaviours of a user: an active
    user's click could be trimmed by the views after it, and its impression read as
    unclicked (a limit the impressions review noted). A row labelled 0 whose window
    reaches before the oldest entry of a history that holds ``keep`` entries, all events,
    is censored: no label, left out of the figures, counted; a click still in the
    history labels its row 1, and a history shorter than ``keep`` labels as before."""
    items = _items(built, 5)
    with TestClient(create_app(settings_for(built, impression_stream=STREAM,
                                            sequence_keep=3))) as c:  # fmt: skip
        for user in ("heavy", "light"):  # neither is in the loaded data: empty histories
            assert c.post("/v1/score", json=_body(user, items)).status_code == 200
        wait_for(lambda: redis_db.xlen(STREAM) == 2, "the impressions written", 5)
        _age(redis_db)  # scored AGE_S ago: a 60 s window has closed
        scored = time.time() - AGE_S
        events = [("heavy", "click", items[0], 10), ("heavy", "view", items[1], 20),
                  ("heavy", "view", items[2], 30), ("light", "click", items[0], 10)]  # fmt: skip
        for k, (user, kind, item, after) in enumerate(events):
            ev = {"user_id": user, "event_id": f"e{k}", "item_id": item, "type": kind,
                  "timestamp": scored + after}  # fmt: skip
            assert c.post("/v1/events", json=ev).status_code == 202
    assert redis_db.llen("{u:heavy}:seq") == 3  # full: what came before may be gone
    sync = Redis.from_url(REDIS_URL)
    try:
        kept = list(ImpressionReader(sync, STREAM, "item_id", 60.0, skew_s=1.0, keep=3))
        unknown = list(ImpressionReader(sync, STREAM, "item_id", 60.0, skew_s=1.0))
    finally:
        sync.close()
    heavy = {r.item_id: (r.label, r.label_status) for r in kept if r.user_id == "heavy"}
    assert heavy == {items[0]: (1, "labelled"), **{i: (None, "censored") for i in items[1:]}}
    light = {r.item_id: r.label for r in kept if r.user_id == "light"}
    assert light == {i: int(i == items[0]) for i in items}
    assert [r.label_status for r in unknown] == ["labelled"] * 10  # keep not known
    # the command: --keep, else the served model's L (here 50: the history is not full)
    got, _ = _impressions(capsys, "--keep", "3")
    assert (got["censored"], got["rows"], got["clicks"], got["history_keep"]) == (4, 6, 2, 3)
    got, _ = _impressions(capsys, "--models-dir", str(built.models_dir))
    assert (got["censored"], got["rows"], got["history_keep"]) == (0, 10, built.config.max_seq_len)
    # a later version of the model with a shorter L: the service trimmed to the L of the
    # version loaded when each event came, not the first logged response's (a click
    # trimmed under it read as unclicked); the smallest L of the store's versions
    store = tmp_path / "models"
    shutil.copytree(built.models_dir, store)
    root = store / built.config.name
    shutil.copytree(root / "1", root / "2")
    manifest = json.loads((root / "2" / "manifest.json").read_text())
    manifest["config"]["max_seq_len"] = 3
    (root / "2" / "manifest.json").write_text(json.dumps(manifest))
    got, _ = _impressions(capsys, "--models-dir", str(store))
    assert (got["censored"], got["rows"], got["clicks"], got["history_keep"]) == (4, 6, 2, 3)
    # a version whose manifest was edited into nonsense counts no length (0 turned the
    # check off; 1e400 failed the command)
    from ctr.cmd_impressions import smallest_history

    for bad in (0, 1e400, "3", True):
        shutil.copytree(root / "1", root / "9", dirs_exist_ok=True)
        manifest["config"]["max_seq_len"] = bad
        (root / "9" / "manifest.json").write_text(json.dumps(manifest))
        assert smallest_history(str(store), f"{built.config.name}/1", None) == 3, bad
