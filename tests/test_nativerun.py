"""The native graph runner (service/nativerun.py, native/runner.cc): its scores are the
Python session's, its failures and dropped calls, its release, and the service on it."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service import model as model_module
from service.app import create_app
from service.model import load_model
from service.nativerun import NativeRunError, NativeRunner
from service.precision import probe_feeds
from tests.helpers import Built, build_bundle, loaded_redis, settings_for


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("native"), "din")


@pytest.fixture(scope="module")
def dien(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("native-dien"), "dien")


@pytest.fixture(scope="module")
def redis_db(built: Built) -> Redis:
    return loaded_redis(built)


@pytest.fixture
def runner_model(built: Built) -> Iterator[model_module.LoadedModel]:
    loaded = load_model(settings_for(built, intra_op_threads=2))
    assert loaded.native is not None, loaded.native_note
    yield loaded
    loaded.native.close()


def items(built: Built, n: int) -> list[str]:
    return built.frame["item_id"].astype(str).unique().tolist()[:n]


@pytest.mark.parametrize("kind", ["din", "dien"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_native_scores_are_the_python_sessions(
    built: Built, dien: Built, kind: str, parallel: int
) -> None:
    """Both sessions (the one-thread one for calls of at most 64 candidates, the main one
    above) or, with calls side by side (CTR_NATIVE_PARALLEL_CALLS), the one-thread session
    for all; one and several users, the fused graph: the same probabilities as the
    Python runner, to the bit."""
    b = built if kind == "din" else dien
    loaded = load_model(settings_for(b, intra_op_threads=2, native_parallel_calls=parallel))
    native = loaded.native
    assert native is not None, loaded.native_note
    assert loaded.graph == "fused" and native.single_max == 64 and native.parallel == parallel
    assert native.sessions == 2
    assert (native.session_for(64), native.session_for(65)) == (1, 0)
    assert (native.route(64), native.route(65)) == ((1, 0), (0, 0))  # nothing in flight
    # beside the caller's other work (the service's other requests): one thread each
    assert native.route(64, busy=True) == (1, 0)
    assert native.route(65, busy=True) == ((1, 1) if parallel == 2 else (0, 0))

    async def check() -> None:
        for users, n, seed in ((1, 1, 0), (1, 64, 1), (2, 65, 2), (3, 300, 3), (1, 17, 4)):
            feeds = probe_feeds(loaded.bundle, users, n, seed)
            want = loaded.run(feeds, explain=False)[0]
            got, took = await native.run(feeds)
            assert got.shape == (n,) and got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
            assert took > 0
        # many at once: each gets its own call's scores
        many = [probe_feeds(loaded.bundle, 1, 20 + i, 10 + i) for i in range(30)]
        got_all = await asyncio.gather(*(native.run(f) for f in many))
        for f, (got, _) in zip(many, got_all, strict=True):
            np.testing.assert_array_equal(got, loaded.run(f, explain=False)[0])
        assert native.pending == 0

    try:
        asyncio.run(check())
    finally:
        native.close()
    assert native.released


def test_a_failed_call_says_why_and_the_thread_serves_on(
    runner_model: model_module.LoadedModel,
) -> None:
    """A call ORT rejects (an input of the wrong element type) fails with ORT's message,
    naming the input; the next call on the same thread is served."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)
    bad = {**feeds, "user_idx": feeds["user_idx"].astype(np.int32)}

    async def check() -> None:
        with pytest.raises(NativeRunError, match="user_idx.*element type"):
            await native.run(bad)
        got, _ = await native.run(feeds)
        np.testing.assert_array_equal(got, runner_model.run(feeds, explain=False)[0])

    asyncio.run(check())
    with pytest.raises(NativeRunError, match="user_idx"):
        native.run_now(bad)
    # one ORT itself refuses: a history longer than the graph's
    long = {**feeds, "hist": np.concatenate([feeds["hist"], feeds["hist"]], axis=-1)}
    with pytest.raises(NativeRunError, match="(?i)dimension"):
        native.run_now(long)
    np.testing.assert_array_equal(native.run_now(feeds), runner_model.run(feeds, False)[0])


def test_more_finished_calls_than_one_poll_takes(runner_model: model_module.LoadedModel) -> None:
    """150 calls that all finish before the event loop looks (one poll takes 64): every
    one is collected, with its own scores."""
    native = runner_model.native
    assert native is not None
    many = [probe_feeds(runner_model.bundle, 1, 5 + i % 40, i) for i in range(150)]

    async def check() -> None:
        native.hold(True)
        tasks = [asyncio.ensure_future(native.run(f)) for f in many]
        await asyncio.sleep(0)
        assert native.queued == 150
        native.hold(False)
        deadline = time.monotonic() + 30
        while native.queued and time.monotonic() < deadline:  # blocks the loop meanwhile
            time.sleep(0.01)
        assert native.queued == 0 and native.pending == 150
        got = await asyncio.gather(*tasks)
        for f, (probs, _) in zip(many, got, strict=True):
            np.testing.assert_array_equal(probs, runner_model.run(f, explain=False)[0])
        assert native.pending == 0

    asyncio.run(check())


def test_a_call_given_up_while_queued_is_dropped(runner_model: model_module.LoadedModel) -> None:
    """A waiter that gives up (the request's deadline) before a thread takes its call:
    the call is dropped, not counted as pending, and calls after it are served."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)

    async def check() -> None:
        native.hold(True)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(native.run(feeds), 0.05)
            assert native.pending == 0 and native.queued == 0  # gone on both sides
        finally:
            native.hold(False)
        got, _ = await native.run(feeds)
        np.testing.assert_array_equal(got, runner_model.run(feeds, explain=False)[0])
        assert native.pending == 0

    asyncio.run(check())


def test_close_lets_calls_in_flight_finish_then_releases(
    runner_model: model_module.LoadedModel,
) -> None:
    """After close (a model swap) no new call is taken; one in flight is still served,
    and the sessions and threads go once it has been collected."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)

    async def check() -> None:
        native.hold(True)
        task = asyncio.ensure_future(native.run(feeds))
        await asyncio.sleep(0.01)
        assert native.pending == 1
        native.close()
        assert native.closed and not native.released
        with pytest.raises(NativeRunError, match="closed"):
            native.submit(feeds)
        native.hold(False)
        got, _ = await task
        np.testing.assert_array_equal(got, runner_model.run(feeds, explain=False)[0])
        assert native.released

    asyncio.run(check())


def test_a_waiter_cancelled_after_its_call_was_collected_leaves_the_runner_alone(
    runner_model: model_module.LoadedModel,
) -> None:
    """A closed runner whose last call is collected is released at once; a waiter
    cancelled after that (its deadline and the call's end in one loop turn) must not
    touch the released runner. And a released runner refuses every use."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)

    cancels = []

    class Watched:  # the library, with its cancel calls noted
        def __init__(self, lib: object) -> None:
            self.lib = lib

        def __getattr__(self, name: str) -> object:
            if name == "ctr_runner_cancel":
                cancels.append(native.released)
            return getattr(self.lib, name)

    native._lib = Watched(native._lib)  # type: ignore[assignment]

    async def check() -> None:
        native.hold(True)
        task = asyncio.ensure_future(native.run(feeds))
        await asyncio.sleep(0)
        native.close()
        native.hold(False)
        while native.queued:  # the call runs to its end; the loop has not looked yet
            time.sleep(0.005)
        native._collect()  # the eventfd's callback: the call is settled, the runner freed
        assert native.released and native.pending == 0
        task.cancel()  # before the waiter resumed
        with pytest.raises(asyncio.CancelledError):
            await task
        assert True not in cancels  # nothing was asked of the released runner

    asyncio.run(check())
    for use in (lambda: native.hold(True), lambda: native.run_now(feeds), lambda: native.queued):
        with pytest.raises(NativeRunError, match="released"):
            use()


def test_the_python_runner_serves_when_the_native_one_cannot(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off by setting, a runner that cannot be made, or one whose scores differ from the
    Python session's: the model loads and serves on the Python runner, and says why."""
    assert load_model(settings_for(built, native_runner=False)).native is None

    def refuse(*args: object, **kwargs: object) -> NativeRunner:
        raise NativeRunError("no such luck")

    with monkeypatch.context() as mp:
        mp.setattr(model_module, "NativeRunner", refuse)
        loaded = load_model(settings_for(built))
        assert loaded.native is None and loaded.native_note == "no such luck"

    def crash(*args: object, **kwargs: object) -> NativeRunner:
        raise RuntimeError("an error type of ORT's own")

    with monkeypatch.context() as mp:
        mp.setattr(model_module, "NativeRunner", crash)
        loaded = load_model(settings_for(built))
        assert loaded.native is None and "of ORT's own" in loaded.native_note
    with monkeypatch.context() as mp:
        mp.setattr(model_module, "warm_native", crash)
        loaded = load_model(settings_for(built))
        assert loaded.native is None and "native warm-up" in loaded.native_note
    with monkeypatch.context() as mp:
        mp.setattr(model_module, "native_parity", lambda *a: 0.5)
        loaded = load_model(settings_for(built))
        assert loaded.native is None and "parity 5.0e-01" in loaded.native_note
    feeds = probe_feeds(loaded.bundle, 1, 30, 0)
    assert np.all(np.isfinite(loaded.run(feeds, explain=False)[0]))


def test_runners_share_the_library_and_make_no_ctypes_classes(built: Built) -> None:
    """Runners of every load share one pair of library objects, and its buffers' types:
    a reload makes no ctypes function-pointer or array classes (cyclic garbage only a
    full collection frees)."""
    kinds = (ctypes._CFuncPtr, ctypes.Array)  # noqa: SLF001

    def pointer_classes() -> int:
        return sum(isinstance(o, type) and issubclass(o, kinds) for o in gc.get_objects())

    first = load_model(settings_for(built))
    before = pointer_classes()
    more = [load_model(settings_for(built)) for _ in range(2)]
    assert pointer_classes() == before
    for loaded in (first, *more):
        assert loaded.native is not None, loaded.native_note
        assert loaded.native._lib is first.native._lib  # type: ignore[union-attr]
        assert loaded.native._blocking is first.native._blocking  # type: ignore[union-attr]
        loaded.native.close()


def test_a_library_without_the_runner_is_refused() -> None:
    """A custom-op library built before the runner (here: a shared object without its
    functions) is refused with a message, never half used."""
    with pytest.raises(NativeRunError, match="no native runner"):
        NativeRunner("libm.so.6", ["user_idx"], [], "run")


def test_the_service_scores_on_native_threads_as_on_python_ones(
    built: Built, redis_db: Redis
) -> None:
    """Every plain scoring call handed off (CTR_INLINE_MAX_MS=0) goes to the native
    runner and ranks as the Python runner does; explain calls keep the Python runner
    (they also return the attention weights). /v1/models says which is in use."""
    bodies = [
        {"user_id": u, "candidates": [{"item_id": i} for i in items(built, n)]}
        for u, n in (("u1", 5), ("u3", 64), ("u17", 65), ("u2", 200), ("nobody", 30))
    ]
    answers = {}
    for on in (False, True):
        with TestClient(create_app(settings_for(built, native_runner=on, inline_max_ms=0))) as c:
            model = c.app.state.ctr.model
            info = c.get("/v1/models").json()
            assert info["native_runner"] is on
            assert info["native_parallel_calls"] == (model.native.parallel if on else 0)
            got = []
            for body in bodies:
                r = c.post("/v1/score", json=body)
                assert r.status_code == 200, r.text
                got.append(r.json()["items"])
            r = c.post("/v1/score", json={**bodies[1], "explain": True})
            assert r.status_code == 200 and "attention" in r.json()["items"][0], r.text
            got.append(r.json()["items"])
            if on:  # every one served there: none failed over to the Python runner
                assert model.native is not None and model.native.calls == len(bodies)
                assert model.native.completed == len(bodies)
            answers[on] = got
        if on:  # the lifespan's end released it
            assert model.native is not None and model.native.released
    assert answers[True] == answers[False]


def test_a_native_call_past_the_deadline_is_a_503_and_dropped(
    built: Built, redis_db: Redis
) -> None:
    """A request whose native call is still queued when its deadline passes gets the
    503 deadline_exceeded; its call is dropped, not left pending (which would keep
    every later request off the inline path), and the worker serves on."""
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items(built, 20)]}
    s = settings_for(built, inline_max_ms=0, request_timeout_ms=300)
    with TestClient(create_app(s)) as c:
        native = c.app.state.ctr.model.native
        assert native is not None
        native.hold(True)
        try:
            r = c.post("/v1/score", json=body)
        finally:
            native.hold(False)
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded", r.text
        assert native.pending == 0
        assert c.post("/v1/score", json=body).status_code == 200


def test_a_reload_closes_the_old_runner_and_serves_on_the_new(
    built: Built, redis_db: Redis
) -> None:
    """The model swap closes the outgoing model's native runner (released, nothing was
    in flight), and the new model's serves."""
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items(built, 20)]}
    s = settings_for(built, inline_max_ms=0, api_key="k")
    with TestClient(create_app(s)) as c:
        old = c.app.state.ctr.model
        first = c.post("/v1/score", json=body)
        assert first.status_code == 200
        r = c.post("/admin/reload", json={}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        new = c.app.state.ctr.model
        assert new is not old and new.native is not None
        assert old.native is not None and old.native.closed
        # released on a thread of its own, not the event loop's
        assert old.native._releaser is not None and old.native.wait_released(5)
        assert c.app.state.ctr.retired == [old.native]
        again = c.post("/v1/score", json=body)
        assert again.json()["items"] == first.json()["items"]
        assert new.native.calls == 1 and new.native.completed == 1


def test_a_failed_native_call_is_served_by_the_python_runner(
    built: Built, redis_db: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a native call fail, the request is answered by the Python runner (the same
    ranking), counted in ctr_errors_total{kind="native_runner"}; every native call that
    ran noted its time for the inline decision (CTR_INLINE_MAX_MS)."""
    from service import metrics as m

    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items(built, 20)]}
    with TestClient(create_app(settings_for(built, inline_max_ms=0))) as c:
        model = c.app.state.ctr.model
        native = model.native
        assert native is not None
        key = model.run_key(20)
        model.run_times.pop(key, None)
        before = m.ERRORS.labels("native_runner")._value.get()

        def python_runner(*args: object, **kwargs: object) -> None:
            raise AssertionError("the Python runner was used")

        with monkeypatch.context() as mp:  # only the native runner can answer this one
            mp.setattr(model, "run", python_runner)
            first = c.post("/v1/score", json=body)
        assert first.status_code == 200 and native.calls == 1 and native.completed == 1
        assert model.run_times[key][1] == 20.0  # noted by the native call
        assert m.ERRORS.labels("native_runner")._value.get() == before

        def refuse(*args: object) -> None:
            raise NativeRunError("refused")

        monkeypatch.setattr(native, "submit", refuse)
        again = c.post("/v1/score", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["items"] == first.json()["items"]
        assert m.ERRORS.labels("native_runner")._value.get() == before + 1


def test_a_failing_run_hook_does_not_strand_the_call(
    runner_model: model_module.LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook told each finished call's time (the inline decision's) raises: the call's
    waiter still gets its scores, and the failure is logged."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)

    def broken(seconds: float, n: int) -> None:
        raise ZeroDivisionError("hook")

    native.on_run = broken

    async def check() -> np.ndarray:
        return (await asyncio.wait_for(native.run(feeds), 10))[0]

    got = asyncio.run(check())
    np.testing.assert_array_equal(got, runner_model.run(feeds, explain=False)[0])
    assert "on_run hook failed" in caplog.text


def test_calls_in_flight_keep_the_runner_on_their_event_loop(
    runner_model: model_module.LoadedModel,
) -> None:
    """While a call submitted on one event loop is in flight, a call from another loop is
    refused (its future could not be settled there); the first call is still served."""
    native = runner_model.native
    assert native is not None
    feeds = probe_feeds(runner_model.bundle, 1, 30, 0)
    first = asyncio.new_event_loop()
    try:
        native.hold(True)

        async def submit() -> asyncio.Future:
            return native.submit(feeds)[1]

        fut = first.run_until_complete(submit())

        async def elsewhere() -> None:  # held: it would wait for good, were it taken
            await asyncio.wait_for(native.run(feeds), 2)

        with pytest.raises(NativeRunError, match="another event loop"):
            asyncio.run(elsewhere())
        native.hold(False)
        got, _ = first.run_until_complete(asyncio.wait_for(fut, 10))
        np.testing.assert_array_equal(got, runner_model.run(feeds, explain=False)[0])
        assert native.pending == 0
    finally:
        native.hold(False)
        first.close()


def test_a_parity_check_fails_on_a_nan_in_either_runner(built: Built) -> None:
    """max() drops a NaN: a reference runner that returns one must fail the check, not
    pass it with the other probes' difference."""
    bundle = load_model(settings_for(built, native_runner=False)).bundle

    def fine(f: dict) -> np.ndarray:
        return np.full(f["user_idx"].shape[0], 0.5, np.float32)

    def nan(f: dict) -> np.ndarray:
        return np.full(f["user_idx"].shape[0], np.nan, np.float32)

    assert model_module.worst_diff(bundle, fine, fine) == 0.0
    for want, got in ((nan, fine), (fine, nan)):
        with pytest.raises(ValueError, match="not finite"):
            model_module.worst_diff(bundle, want, got)


def test_larger_calls_run_side_by_side_and_small_ones_one_at_a_time(built: Built) -> None:
    """CTR_NATIVE_PARALLEL_CALLS=2: a call above CTR_SINGLE_THREAD_MAX_CANDIDATES that
    comes while another is in flight runs on the one-thread session, two such at once
    (lane 1); the first, alone, keeps the main session (lane 0); small calls run one at a
    time. Every call gets its own scores, and only lane 0's times reach the hook that
    feeds the inline decision (they say what the main session takes)."""
    loaded = load_model(
        settings_for(built, intra_op_threads=2, native_parallel_calls=2, inline_max_ms=0)
    )
    native = loaded.native
    assert native is not None and native.parallel == 2, loaded.native_note
    # more threads than calls side by side: one call keeps them all (not measured here)
    wide = load_model(settings_for(built, intra_op_threads=4, native_parallel_calls=2))
    assert wide.native is not None and wide.native.parallel == 1
    wide.native.close()
    large = [probe_feeds(loaded.bundle, 1, 20_000, k) for k in range(6)]
    small = [probe_feeds(loaded.bundle, 1, 40, k) for k in range(200)]
    timed: list[int] = []
    native.on_run = lambda seconds, n: timed.append(n)

    async def check(calls: list[dict]) -> tuple[int, int]:
        native.hold(True)
        tasks = [asyncio.ensure_future(native.run(f)) for f in calls]
        await asyncio.sleep(0)
        most = [0, 0]
        native.hold(False)
        while native.queued:  # blocks the loop: nothing is collected meanwhile
            now = [native.running(0), native.running(1)]
            assert now[0] <= 1 and sum(now) <= 2
            most = [max(a, b) for a, b in zip(most, now, strict=True)]
            time.sleep(0.0002)
        got = await asyncio.gather(*tasks)
        for f, (probs, _) in zip(calls, got, strict=True):
            np.testing.assert_array_equal(probs, loaded.run(f, explain=False)[0])
        return most[0], most[1]

    try:
        assert asyncio.run(check(large)) == (1, 2)
        assert timed == [20_000]  # the first, alone, on the main session
        assert asyncio.run(check(small)) == (1, 0)
        assert timed.count(40) == len(small)
    finally:
        native.close()


def test_a_call_on_this_thread_keeps_its_own_inputs(
    runner_model: model_module.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_now`` lets go of the GIL before the C side reads the description of its
    inputs: when that was the runner's one shared description, another thread's call
    could write over it meanwhile, and this call ran on the other's inputs (a wrong
    score, a size error, or a crash). Here the other call's description is written at
    exactly that moment, every time."""
    native = runner_model.native
    assert native is not None
    mine, other = (probe_feeds(runner_model.bundle, 1, n, n) for n in (5, 9))
    want = runner_model.run(mine, explain=False)[0]
    real = native._blocking.ctr_runner_run

    def meanwhile(*args: Any) -> int:
        native._describe(other)  # what a call on another thread writes, GIL let go
        return int(real(*args))

    class Blocking:  # this runner's blocking library, its run call replaced (the library
        # objects themselves are every runner's in the process)
        def __getattr__(self, name: str) -> object:
            return meanwhile if name == "ctr_runner_run" else getattr(real_lib, name)

    real_lib = native._blocking
    monkeypatch.setattr(native, "_blocking", Blocking())
    np.testing.assert_array_equal(native.run_now(mine), want)
