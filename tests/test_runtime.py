"""How the graph runs: IO binding, bucketed fixed-buffer (CUDA graph) runs, fp16 and
cross-request micro-batching, on real exported bundles. Everything here runs on the
CPU provider; tests/test_gpu.py repeats the GPU-only parts where CUDA is present."""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import service.model as service_model
from ctr.bundle import graph_inputs, graph_outputs, load_bundle
from ctr.spec import load_config
from service.app import create_app
from service.batcher import merge_feeds, split_outputs
from service.devcopy import DirectCopier, OrtCopier, loaded_cudart, make_copier
from service.loader import load_into_redis
from service.model import load_model
from service.precision import probe_feeds, range_feeds
from service.runner import (
    BindingRunner,
    GraphPool,
    GraphRunner,
    SessionRunner,
    SplitRunner,
    bucket_of,
    copy_info,
)
from service.settings import Settings, parse_buckets
from tests.helpers import (
    REDIS_URL,
    ROOT,
    Built,
    assert_same_attention,
    build_bundle,
    fresh_redis,
    settings_for,
    small_config,
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    tmp = tmp_path_factory.mktemp("runtime")
    return {mt: build_bundle(tmp / mt, mt) for mt in ("din", "dien")}


def cpu_session(built: Built) -> tuple[ort.InferenceSession, object]:
    b = load_bundle(built.models_dir, built.config.name)
    return ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"]), b


def tails(b: object) -> tuple[dict, dict]:
    c = b.config  # type: ignore[attr-defined]
    return (
        {i.name: tuple(i.shape[1:]) for i in graph_inputs(c)},
        {o.name: tuple(o.shape[1:]) for o in graph_outputs(c)},
    )


def test_buckets() -> None:
    assert parse_buckets("512, 64,128,64") == [64, 128, 512]
    assert bucket_of(64, [64, 128]) == 64
    assert bucket_of(65, [64, 128]) == 128
    assert bucket_of(129, [64, 128]) is None
    with pytest.raises(ValueError):
        parse_buckets("0,64")


def test_bad_bucket_setting_names_the_field() -> None:
    with pytest.raises(ValidationError, match="cuda_graph_buckets"):
        Settings(cuda_graph_buckets="64,abc")
    with pytest.raises(ValidationError, match="cuda_graph_user_buckets"):
        Settings(cuda_graph_user_buckets="-1")


@pytest.mark.parametrize("mt", ["din", "dien"])
def test_io_binding_matches_session_run(bundles: dict[str, Built], mt: str) -> None:
    sess, b = cpu_session(bundles[mt])
    runner = BindingRunner(sess, "cpu")
    for users, n, seed in ((1, 1, 0), (1, 200, 1), (3, 57, 2)):
        feeds = probe_feeds(b, users, n, seed)  # type: ignore[arg-type]
        want = sess.run(["probs", "attention"], feeds)
        got = runner.run(feeds, ["probs", "attention"])
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("copy", ["ort", "direct"])
@pytest.mark.parametrize("mt", ["din", "dien"])
def test_bucketed_fixed_buffer_runs_match_unpadded(
    bundles: dict[str, Built], mt: str, copy: str
) -> None:
    """The CUDA-graph runner's padding and slicing, on the CPU provider: padded users
    and candidates never change a real row, calls beyond every bucket fall back, and a
    returned array is not overwritten by the next call on the same bucket. With ORT's
    copies and with direct ones (``CTR_GPU_COPY=direct``: by pointer through ctypes,
    here ``memmove``), which pass their check against ORT's and are used."""
    sess, b = cpu_session(bundles[mt])
    ins, outs = tails(b)
    runner = GraphRunner(sess, ins, outs, [1, 4], [64, 128], device="cpu", copy=copy)
    kept = []
    for users, n, seed in ((1, 50, 0), (1, 64, 1), (3, 65, 2), (4, 128, 3), (5, 10, 4),
                           (1, 300, 5), (2, 50, 6)):  # fmt: skip
        feeds = probe_feeds(b, users, n, seed)  # type: ignore[arg-type]
        want = sess.run(["probs", "attention"], feeds)
        got = runner.run(feeds, ["probs", "attention"])
        assert got[0].shape == (n,) and got[1].shape == want[1].shape
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
        kept.append((got[0], want[0]))
    for got, want in kept:  # (1, 50) and (2, 50) share a slot; the first result survives
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert set(runner.slots) == {(1, 64), (4, 128), (4, 64)}  # (5, 10), (1, 300): fallback
    assert runner.copy_kind == copy and runner.copy_note == ""
    assert copy_info(runner) == {"copy": copy, "note": None}


def test_a_direct_copier_that_reads_back_wrong_is_never_used(bundles: dict[str, Built]) -> None:
    """The direct copier is checked on the first bucket's real buffers against ORT's own
    copies; one that copies wrong (here: half the bytes) is replaced by ORT's, the reason
    is kept, and the scores are right."""
    sess, b = cpu_session(bundles["din"])
    ins, outs = tails(b)
    short = DirectCopier(lambda dst, src, n: ctypes.memmove(dst, src, n // 2))
    runner = GraphRunner(sess, ins, outs, [1], [64], device="cpu", copy="direct")
    with patch("service.runner.make_copier", return_value=(short, "")):
        feeds = probe_feeds(b, 1, 40, 3)  # type: ignore[arg-type]
        got = runner.run(feeds, ["probs"])[0]
    np.testing.assert_allclose(got, sess.run(["probs"], feeds)[0], rtol=0, atol=1e-6)
    assert runner.copy_kind == "ort" and "read back wrong" in runner.copy_note
    assert copy_info(runner) == {"copy": "ort", "note": runner.copy_note}


def test_direct_cuda_copies_need_a_loaded_cuda_runtime() -> None:
    """Without a CUDA runtime in the process (any CPU-only ORT), asking for direct copies
    on CUDA gives ORT's, with the reason; never a second runtime loaded by name."""
    if loaded_cudart() is not None:
        pytest.skip("a CUDA runtime is loaded in this process")
    copier, note = make_copier("direct", "cuda")
    assert isinstance(copier, OrtCopier) and "no CUDA runtime" in note
    assert make_copier("ort", "cuda")[1] == ""


def test_graph_pool_spreads_calls_over_its_runners(bundles: dict[str, Built]) -> None:
    """Several fixed-buffer runners (CUDA streams on a GPU), each on its own session and
    thread: concurrent calls through the pool's executor go to idle runners, each call
    runs on its runner's own thread, and every result matches a plain run."""
    built = bundles["dien"]
    b = load_bundle(built.models_dir, built.config.name)
    ins, outs = tails(b)
    sessions = [cpu_session(built)[0] for _ in range(2)]
    runners = [GraphRunner(s, ins, outs, [1, 4], [64, 128], device="cpu") for s in sessions]
    pool = GraphPool(runners)
    try:
        pool.capture()
        assert all(set(r.slots) == {(u, n) for u in (1, 4) for n in (64, 128)} for r in runners)
        ref = sessions[0]
        feeds = [probe_feeds(b, 1 + k % 3, 20 + 9 * k, k) for k in range(12)]
        seen: set[int] = set()
        both = threading.Barrier(2, timeout=30)  # the first two calls run at the same time

        def call(k: int, f: dict) -> list[np.ndarray]:
            seen.add(threading.get_ident())
            if k < 2:
                both.wait()  # breaks (and fails the test) if both went to one runner
            return pool.run(f, ["probs", "attention"])

        futures = [pool.thread.submit(call, k, f) for k, f in enumerate(feeds)]
        for f, fut in zip(feeds, futures, strict=True):
            got, want = fut.result(), ref.run(["probs", "attention"], f)
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
        assert seen == {r.thread_id for r in runners}  # both runners served calls
        assert pool.thread.busy == [0, 0]
        # from any other thread, run() forwards to a runner's thread
        got = pool.run(feeds[0], ["probs"])[0]
        np.testing.assert_allclose(got, ref.run(["probs"], feeds[0])[0], rtol=0, atol=1e-6)
    finally:
        pool.close()


@pytest.mark.parametrize("mt", ["din", "dien"])
def test_merged_users_score_like_separate_calls(bundles: dict[str, Built], mt: str) -> None:
    sess, b = cpu_session(bundles[mt])
    feeds = [probe_feeds(b, 1, n, seed) for seed, n in enumerate((7, 120, 1, 33))]  # type: ignore[arg-type]
    merged = merge_feeds(feeds)
    assert merged["hist_len"].shape == (4,) and merged["user_idx"].shape == (161,)
    assert list(merged) == list(feeds[0])
    parts = split_outputs(sess.run(["probs", "attention"], merged), [7, 120, 1, 33])
    for f, (p, a) in zip(feeds, parts, strict=True):
        want_p, want_a = sess.run(["probs", "attention"], f)
        np.testing.assert_allclose(p, want_p, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a, want_a, rtol=0, atol=1e-6)


def test_fp16_kept_within_tolerance(bundles: dict[str, Built]) -> None:
    built = bundles["dien"]
    fp32 = load_model(settings_for(built))
    fp16 = load_model(settings_for(built, precision="fp16"))
    assert fp16.precision == "fp16" and fp16.precision_note == ""
    feeds = probe_feeds(fp32.bundle, 2, 300, 9)
    diff = np.abs(fp16.run(feeds, False)[0] - fp32.run(feeds, False)[0])
    assert 0 < diff.max() <= 1e-3  # really fp16 (not the same graph), and within tolerance


def test_fp16_outside_tolerance_serves_fp32(
    bundles: dict[str, Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_model, "FP16_TOLERANCE", 0.0)
    model = load_model(settings_for(bundles["din"], precision="fp16"))
    assert model.precision == "fp32"
    assert "parity" in model.precision_note
    ref = load_model(settings_for(bundles["din"]))
    feeds = probe_feeds(ref.bundle, 1, 50, 3)
    np.testing.assert_array_equal(model.run(feeds, False)[0], ref.run(feeds, False)[0])


def _priced(tmp: Path, name: str, scale: float, clip: bool) -> Built:
    """A DIN whose ``item_price`` is fed as-is (no log1p), the synthetic prices times
    ``scale``; its graph clamps it to the training split's range where ``clip``."""
    feats = [f.model_dump(exclude_unset=True) for f in small_config("din").features]
    config = load_config(ROOT / "configs" / "synthetic_din.yaml", {
        "name": name, "max_seq_len": 20, "train.epochs": 1, "train.clip_dense": clip,
        "data.options": {"n_users": 300, "samples_per_user": 4},
        "features": [dict(f, log1p=False) if f["name"] == "item_price" else f for f in feats],
    })  # fmt: skip

    def scaled(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(item_price=frame["item_price"] * scale)

    return build_bundle(tmp, config=config, edit=scaled)


def test_fp16_refused_for_dense_inputs_fp16_cannot_hold(tmp_path: Path) -> None:
    """A dense input past 65,504 is inf in the fp16 graph: a model whose prices reached
    300,000 kept fp16 (its check fed N(0, 1) values) and answered 500 non_finite_score
    for every user above 65,504. Refused now, served fp32, the note naming the
    feature; and for a feature without a bound (``clip_dense: false``), which takes
    any value a request sends. Prices well inside fp16 keep it, checked at the
    bounds."""
    big = _priced(tmp_path / "big", "big", 3e4, clip=True)
    hi = json.loads((big.models_dir / "big" / str(big.version) / "manifest.json").read_text())[
        "dense_range"]["item_price"][1]  # fmt: skip
    assert hi > 65504
    model = load_model(settings_for(big, precision="fp16"))
    assert model.precision == "fp32", "fp16 kept for prices past 65504"
    assert "'item_price'" in model.precision_note and "65504" in model.precision_note
    feeds = range_feeds(model.bundle, 3, 60, 0)
    assert feeds["item_dense"].max() == pytest.approx(hi)
    assert np.isfinite(model.run(feeds, False)[0]).all()

    loose = _priced(tmp_path / "loose", "loose", 1.0, clip=False)
    model = load_model(settings_for(loose, precision="fp16"))
    assert model.precision == "fp32" and "no bound" in model.precision_note

    # a log1p feature without a bound is fed log1p(max(v, 0)) <= 709.8 whatever is sent:
    # nothing can pass 65504, fp16 kept (it was refused with the unbounded ones)
    feats = [f.model_dump(exclude_unset=True) for f in small_config("din").features]
    assert any(f["name"] == "item_price" and f.get("log1p") for f in feats)
    logged = build_bundle(tmp_path / "logged", config=load_config(
        ROOT / "configs" / "synthetic_din.yaml",
        {"name": "logged", "max_seq_len": 20, "train.epochs": 1, "train.clip_dense": False,
         "data.options": {"n_users": 300, "samples_per_user": 4}, "features": feats}))  # fmt: skip
    model = load_model(settings_for(logged, precision="fp16"))
    assert model.precision == "fp16", model.precision_note
    # probed up to log1p of the largest float64 (a JSON 1e300 is fed as 690.8)
    top = range_feeds(model.bundle, 3, 60, 0)["item_dense"].max()
    assert top == pytest.approx(709.78, abs=0.01)

    fine = _priced(tmp_path / "fine", "fine", 1.0, clip=True)
    model = load_model(settings_for(fine, precision="fp16"))
    assert model.precision == "fp16", model.precision_note
    feeds = range_feeds(model.bundle, 3, 60, 0)
    bounds = model.bundle.dense_bounds["item"]
    assert set(np.unique(feeds["item_dense"][:20])) == {bounds.hi[0]}  # the edges probed
    assert set(np.unique(feeds["item_dense"][20:40])) == {bounds.lo[0]}


def test_micro_batching_over_http(bundles: dict[str, Built]) -> None:
    """Concurrent requests merged into one graph call score exactly as alone, explain
    included; the batch-size histogram shows the merge."""
    built = bundles["dien"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    items = built.frame["item_id"].astype(str).unique().tolist()
    users = [f"u{k}" for k in range(1, 9)]
    bodies = [
        {"user_id": u, "candidates": [{"item_id": i} for i in items[k : k + 20 + 7 * k]],
         "explain": k % 2 == 0}
        for k, u in enumerate(users)
    ]  # fmt: skip
    # every history step explained: a tie cannot straddle the cut (assert_same_attention)
    with TestClient(create_app(settings_for(built, explain_top=1000))) as plain:
        alone = [plain.post("/v1/score", json=b).json() for b in bodies]
    batched_settings = settings_for(built, batch_max_users=8, batch_wait_ms=50, explain_top=1000)
    with TestClient(create_app(batched_settings)) as c:
        assert c.get("/v1/models").json()["micro_batching"] is True
        before = c.get("/metrics").text  # the registry is per process: compare deltas
        results: list[dict | None] = [None] * len(bodies)

        def post(k: int) -> None:
            r = c.post("/v1/score", json=bodies[k])
            assert r.status_code == 200, r.text
            results[k] = r.json()

        threads = [threading.Thread(target=post, args=(k,)) for k in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    for a, b in zip(alone, results, strict=True):
        assert b is not None
        assert [i["item_id"] for i in b["items"]] == [i["item_id"] for i in a["items"]]
        got = np.array([i["probability"] for i in b["items"]])
        want = np.array([i["probability"] for i in a["items"]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert ("attention" in b["items"][0]) == ("attention" in a["items"][0])
        for ia, ib in zip(a["items"], b["items"], strict=True):  # explain: same weights
            if "attention" in ia:
                assert_same_attention(ib["attention"], ia["attention"])
    count = _metric(metrics, "ctr_batch_users_count") - _metric(before, "ctr_batch_users_count")
    total = _metric(metrics, "ctr_batch_users_sum") - _metric(before, "ctr_batch_users_sum")
    assert total == len(bodies) and count < total  # at least one call held several users


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_settings_reach_the_runner(bundles: dict[str, Built], tmp_path: Path) -> None:
    built = bundles["din"]
    assert load_model(settings_for(built)).runner.kind == "session"
    assert load_model(settings_for(built, io_binding=True)).runner.kind == "io_binding"
    # CUDA graphs are CUDA-only: on the CPU provider the setting leaves the plain runner
    assert load_model(settings_for(built, cuda_graph=True, provider="cpu")).runner.kind == "session"


def test_heap_frozen_after_load(bundles: dict[str, Built]) -> None:
    """After a load, what is alive sits in the GC's permanent generation, so a full
    collection (which stops the event loop) walks only what requests allocated."""
    import gc

    gc.unfreeze()
    with TestClient(create_app(settings_for(bundles["din"]))) as c:
        assert c.get("/readyz").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        assert len(gc.get_objects()) < frozen
    gc.unfreeze()  # leave the test process as it was


def _reload(c: TestClient) -> None:
    assert c.post("/admin/reload", json={}, headers={"X-API-Key": "k"}).status_code == 200


def _full_settles(monkeypatch: pytest.MonkeyPatch, state: Any) -> list[int]:
    """The loads (``state.loads`` before each) whose settle unfroze the heap."""
    import gc

    from service import lifecycle

    at: list[int] = []
    real = gc.unfreeze

    def unfreeze() -> None:
        at.append(state.loads)
        real()

    monkeypatch.setattr(lifecycle.gc, "unfreeze", unfreeze)
    return at


@contextlib.contextmanager
def _reloading(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, Any, list[int]]]:
    """An app that takes reloads, its state, and the loads whose settle unfroze the heap
    (:func:`_full_settles`); the heap unfrozen before and after (as this process was)."""
    import gc

    real_unfreeze = gc.unfreeze
    real_unfreeze()
    try:
        with TestClient(create_app(settings_for(built, api_key="k"))) as c:
            state = c.app.state.ctr  # type: ignore[attr-defined]
            yield c, state, _full_settles(monkeypatch, state)
    finally:
        real_unfreeze()


def test_a_reload_freezes_the_new_model_and_frees_the_old_without_a_full_collection(
    bundles: dict[str, Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between full settles (every FULL_SETTLE_EVERY loads) a reload collects only what
    is not frozen yet and freezes it: the new model's objects are frozen, and the
    previous model, frozen since its own load, is freed at once by reference counting:
    no reference cycle may hold a model (it would wait for a full settle)."""
    import gc
    import weakref

    from service import lifecycle

    monkeypatch.setattr(lifecycle, "FULL_SETTLE_EVERY", 4)
    with _reloading(bundles["din"], monkeypatch) as (c, state, fulls):
        for k in range(1, 6):
            before = weakref.ref(state.model)
            _reload(c)
            assert before() is None, k  # freed, though frozen and not collected
            assert all(o is not state.model for o in gc.get_objects()), k  # frozen
        assert fulls == [4]  # the 5th load: loads 0 (start-up), 4, 8, ... unfreeze


def test_a_reload_gives_the_heaps_free_pages_back(
    bundles: dict[str, Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc's allocator kept most of what a replaced model freed: a worker's resident
    memory grew 25 MB over 200 reloads of one bundle (``scripts/reload_rss.py``). A
    while after a swap its free pages go back (``malloc_trim``), on an executor thread,
    not the event loop's; reloads within that while share one trim, and the start-up
    load, which replaced nothing, has none."""
    import time

    from service import heaptrim

    if heaptrim.MALLOC_TRIM is None:
        pytest.skip("the C library is not glibc: nothing to trim")
    real = heaptrim.MALLOC_TRIM
    calls: list[str] = []

    def counted(pad: int) -> int:
        calls.append(threading.current_thread().name)
        return real(pad)

    monkeypatch.setattr(heaptrim, "MALLOC_TRIM", counted)
    monkeypatch.setattr(heaptrim, "TRIM_DELAY_S", 3.0)
    with _reloading(bundles["din"], monkeypatch) as (c, state, _):
        time.sleep(0.2)
        assert state.heap_trims == 0 and not calls  # the start-up load
        started = time.monotonic()
        _reload(c)
        _reload(c)
        quick = time.monotonic() - started < 2.5  # both inside the first one's wait
        deadline = time.monotonic() + 15
        while state.heap_trims < 1:
            assert time.monotonic() < deadline, "no trim after a reload"
            time.sleep(0.05)
        assert calls and not calls[0].startswith("MainThread")
        assert calls[0] != c.portal.call(lambda: threading.current_thread().name)  # type: ignore[union-attr]
        if quick:
            time.sleep(0.5)
            assert state.heap_trims == len(calls) == 1
        # a reload inside a pending trim's wait moves the trim on to its own delay (it
        # ran the first swap's delay after, possibly before the second's model was
        # released, and none followed: a review)
        at: list[float] = []
        monkeypatch.setattr(heaptrim, "MALLOC_TRIM", lambda pad: (at.append(time.monotonic()),
                                                                  real(pad))[1])  # fmt: skip
        monkeypatch.setattr(heaptrim, "TRIM_DELAY_S", 2.0)
        _reload(c)
        time.sleep(1.2)
        _reload(c)
        swapped = time.monotonic()
        deadline = swapped + 15
        while not at:
            assert time.monotonic() < deadline, "no trim after the reloads"
            time.sleep(0.05)
        assert at[0] - swapped >= 1.5  # the last swap's delay, not the first's
        # reloads closer together than the delay put it off at most TRIM_MAX_WAIT_S
        # (a review: for good, otherwise), and the last swap still gets its own after
        at.clear()
        monkeypatch.setattr(heaptrim, "TRIM_MAX_WAIT_S", 1.5)
        first = time.monotonic()
        while time.monotonic() - first < 2.5:
            _reload(c)
            time.sleep(0.3)
        last = time.monotonic()
        deadline = last + 15
        while not at or at[-1] < last:
            assert time.monotonic() < deadline, f"no trim after the last reload: {at}"
            time.sleep(0.05)
        assert at[0] - first < 4.0  # within the bound (unbounded: after last + 2 s >= 4.5)


def test_a_replaced_model_a_frozen_cycle_holds_is_freed_by_the_next_reload(
    bundles: dict[str, Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed call's traceback can hold a model in a cycle one of whose members a
    reload froze: only a full collection frees it. The next reload sees the replaced
    model still alive and settles fully."""
    import weakref

    with _reloading(bundles["din"], monkeypatch) as (c, state, fulls):
        pin: list[Any] = [state.model]
        pin.append(pin)  # a cycle holding the model, alive while the reload freezes
        first = weakref.ref(state.model)
        _reload(c)
        del pin  # now garbage, but frozen: a light collection never looks at it
        assert first() is not None and fulls == []
        _reload(c)
        assert first() is None and fulls == [2]
        _reload(c)
        assert fulls == [2]  # nothing lingers: light again


def test_burst_beyond_the_redis_pool_waits_instead_of_degrading(
    bundles: dict[str, Built],
) -> None:
    """More concurrent requests than pooled Redis connections: the extra ones wait for a
    connection (within the Redis timeout) and are served in full, not degraded."""
    built = bundles["din"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    items = built.frame["item_id"].astype(str).unique().tolist()[:50]
    body = {"candidates": [{"item_id": i} for i in items]}
    s = settings_for(built, redis_max_connections=1, redis_timeout_ms=2000, inference_concurrency=4)
    with TestClient(create_app(s)) as c:
        out: list[dict] = []

        def post(k: int) -> None:
            out.append(c.post("/v1/score", json={"user_id": f"u{k}", **body}).json())

        threads = [threading.Thread(target=post, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(out) == 12
    assert not any(r["degraded"] for r in out)


def test_deadline_while_queued_in_the_batcher_is_a_503(bundles: dict[str, Built]) -> None:
    """A request held for company longer than its deadline gets the documented 503, is
    dropped from its batch, and the next request is served."""
    built = bundles["din"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    items = built.frame["item_id"].astype(str).unique().tolist()[:10]
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items]}
    slow = settings_for(built, batch_max_users=4, batch_wait_ms=50, request_timeout_ms=20)
    with TestClient(create_app(slow)) as c:
        r = c.post("/v1/score", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "deadline_exceeded"
    ok = settings_for(built, batch_max_users=4, batch_wait_ms=5, request_timeout_ms=2000)
    with TestClient(create_app(ok)) as c:
        assert c.post("/v1/score", json=body).status_code == 200


def test_reload_with_batching_frees_the_old_model(
    bundles: dict[str, Built], tmp_path: Path
) -> None:
    """With the heap frozen after each load, nothing may keep the replaced model alive."""
    import gc
    import weakref

    built = bundles["din"]
    s = settings_for(built, batch_max_users=4, api_key="k")
    with TestClient(create_app(s)) as c:
        held = c.app.state.ctr.model  # type: ignore[attr-defined]  # as an in-flight request would
        old = weakref.ref(held)
        r = c.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        del held  # the request finishes after the reload froze the heap
        gc.collect()
        assert old() is None


@pytest.mark.parametrize("mt", ["din", "dien"])
def test_small_calls_run_on_a_one_thread_session(bundles: dict[str, Built], mt: str) -> None:
    """With several intra-op threads on the CPU, calls of at most
    ``single_thread_max_candidates`` candidates run on a second, one-thread session of
    the same graph, larger ones on the main session; both give the main session's
    probabilities. One thread, or the setting at 0, keeps the plain runner."""
    built = bundles[mt]
    model = load_model(settings_for(built, intra_op_threads=2, single_thread_max_candidates=64))
    runner = model.runner
    assert isinstance(runner, SplitRunner) and model.single_thread_max == 64
    assert runner.kind == "session"
    single = runner.single.session.get_session_options()
    main = runner.main.session.get_session_options()  # type: ignore[attr-defined]
    assert single.intra_op_num_threads == 1 and main.intra_op_num_threads == 2
    assert runner.pick(64) is runner.single and runner.pick(65) is runner.main
    assert runner.pick(1) is runner.single
    for users, n in ((1, 64), (1, 65), (3, 200), (2, 7)):
        feeds = probe_feeds(model.bundle, users, n, seed=n)
        want = runner.main.run(feeds, ["probs"])[0]
        got = model.run(feeds, explain=False)[0]
        np.testing.assert_allclose(got, want, atol=1e-6)
    for kw in ({"intra_op_threads": 1}, {"intra_op_threads": 2, "single_thread_max_candidates": 0}):
        plain = load_model(settings_for(built, **kw))
        assert isinstance(plain.runner, SessionRunner) and plain.single_thread_max == 0


def test_service_scores_small_and_large_calls_alike_on_either_session(
    bundles: dict[str, Built],
) -> None:
    """Over HTTP: ``/v1/models`` names the limit, and requests below and above it score as
    with the split off."""
    built = bundles["din"]
    fresh_redis()
    load_into_redis(built.config, built.frame, REDIS_URL, progress=False)
    items = built.frame["item_id"].astype(str).unique()[:40].tolist()
    bodies = [{"user_id": "u3", "candidates": [{"item_id": i} for i in items[:n]]} for n in (5, 40)]
    scores: dict[int, list[dict]] = {}
    for limit in (0, 32):  # 5 candidates below the limit of 32, 40 above it
        settings = settings_for(built, intra_op_threads=2, single_thread_max_candidates=limit)
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/models").json()["single_thread_max_candidates"] == limit
            scores[limit] = [client.post("/v1/score", json=b).json() for b in bodies]
    for off, on in zip(scores[0], scores[32], strict=True):
        assert [i["item_id"] for i in on["items"]] == [i["item_id"] for i in off["items"]]
        got = np.array([i["probability"] for i in on["items"]])
        want = np.array([i["probability"] for i in off["items"]])
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("spin", "allow", "stop"), [("run", "1", "1"), ("always", "1", None), ("never", "0", None)]
)
def test_intra_op_spin_reaches_every_session(
    bundles: dict[str, Built], spin: str, allow: str, stop: str | None
) -> None:
    """``CTR_INTRA_OP_SPIN`` is in the options of each session that serves: the main one
    and the one-thread session for small calls (``SplitRunner``)."""
    model = load_model(settings_for(bundles["din"], intra_op_spin=spin, intra_op_threads=2))
    assert isinstance(model.runner, SplitRunner)
    for runner in (model.runner.main, model.runner.single):
        assert isinstance(runner, SessionRunner)
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
        if stop is None:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry("session.force_spinning_stop")
        else:
            assert options.get_session_config_entry("session.force_spinning_stop") == stop
