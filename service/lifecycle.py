"""Loading the model into the app's state: the start-up load and its fallback to an
older version, reloads (one at a time), SIGHUP's reload, and the background tasks they
leave running."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import time
import weakref
from collections.abc import Coroutine
from multiprocessing.process import BaseProcess
from typing import Any

from ctr.bundle import BundleError, list_versions, resolve_version
from service import heaptrim
from service import metrics as m
from service.model import LoadedModel, ProviderError, load_model
from service.retry import retry_under_lock
from service.state import State
from service.store import REDIS_ERRORS

log = logging.getLogger("ctr.service")

# loads between two full collections of the heap (settle_heap): reference cycles among
# a reload's previous model's objects (none are known since session 31 made the native
# runner's ctypes objects once per process: scripts/reload_garbage.py) wait that long to
# be freed; a replaced model still alive at the next load makes that load's settle a
# full one (tests/test_runtime.py)
FULL_SETTLE_EVERY = 8


async def load(state: State, version: str | None) -> LoadedModel:
    """Load ``version`` (None: ``CTR_MODEL_VERSION``; ``"latest"``: the newest) off the
    event loop, then swap it in; on failure the serving model, if any, stays, the error
    is logged and counted, and it is raised (``BundleError``/``ProviderError``)."""
    try:
        # in this context: the load's log lines name the request that asked for it
        model = await asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, load_model, state.settings, version
        )
    except Exception as exc:
        # anything else a bundle made the load raise (a bug's exception type included) is
        # a bundle that does not load: not-ready, the start-up fallback, a 409 on reload
        err = exc if isinstance(exc, BundleError | ProviderError) else unexpected(exc)
        m.ERRORS.labels("model_load").inc()
        if state.model is None:
            # with "latest" at start-up an older version may serve instead (fall_back)
            log.error("model not loaded, not-ready unless another version loads: %s", err)
            state.model_error = str(err)
        else:
            log.error("reload failed, still serving version %s: %s", state.model.version, err)
            state.reload_error = {"version": version or state.settings.model_version,
                                  "error": str(err), "at": time.time()}  # fmt: skip
        if err is exc:
            raise
        raise err from exc
    old, state.model = state.model, model  # atomic swap: in-flight requests keep theirs
    state.reload_error = None
    if old is not None and old.native is not None:
        # its requests still in flight finish on the Python runner, or collect their
        # native calls first; the native sessions go once nothing is in flight there,
        # on a thread of their own (not the event loop's)
        old.native.close(background=True)
        state.retired = [r for r in state.retired if not r.released] + [old.native]
    state.model_error = None
    state.set_fallback(None)
    m.set_model_info(model.name, model.version, model.provider, model.graph, model.precision)
    m.init_dense_counts([n for b in model.bundle.dense_bounds.values() for n in b.names])
    # a full collection at the first load and every FULL_SETTLE_EVERY loads after it;
    # in between, a reload's stops the event loop for about 1 ms instead of 20-150. And
    # a full one whenever a model replaced at an earlier load is still alive: a cycle
    # with a frozen member holds it (a failed call's traceback, whose frames hold the
    # call's future and the model), which only a full collection frees
    state.replaced = [ref for ref in state.replaced if ref() is not None]
    settle_heap(full=state.loads % FULL_SETTLE_EVERY == 0 or bool(state.replaced))
    if old is not None:
        state.replaced.append(weakref.ref(old))
        # a while after the last swap: one inside a pending trim's wait moves it on
        state.trim_due = asyncio.get_running_loop().time() + heaptrim.TRIM_DELAY_S
        if state.trim_task is None or state.trim_task.done():  # one pending at a time
            state.trim_task = asyncio.get_running_loop().create_task(trim_heap(state))
            state.tasks.add(state.trim_task)
            state.trim_task.add_done_callback(state.tasks.discard)
    state.loads += 1
    if state.held_task is not None:  # the replaced model's: it would hold that model
        state.held_task.cancel()
    task = asyncio.get_running_loop().create_task(watch_held_data(state, model))
    state.held_task = task
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return model


async def trim_heap(state: State) -> None:
    """The C heap's free pages back to the system a while after the last swap
    (``state.trim_due``; glibc: ``service.heaptrim``), again if another swap came while
    it ran; counted in ``state.heap_trims``. Reloads closer together than the delay put
    it off at most ``heaptrim.TRIM_MAX_WAIT_S`` (a review: for good, otherwise)."""
    loop = asyncio.get_running_loop()
    latest = loop.time() + heaptrim.TRIM_MAX_WAIT_S
    while heaptrim.MALLOC_TRIM is not None:
        due = state.trim_due
        if (left := min(due, latest) - loop.time()) > 0:
            await asyncio.sleep(left)
            continue  # a swap meanwhile may have moved it on
        started = loop.time()
        if await heaptrim.trim_later(0):
            state.heap_trims += 1
        if state.trim_due <= started:  # every swap's delay had passed, and none came since
            return
        latest = loop.time() + heaptrim.TRIM_MAX_WAIT_S  # put off: the next one's bound


HELD_RECHECK_S = 30.0  # the data-set record read again this often while a model is served
HELD_RETRY_S = 2.0  # ... and this often (doubling up to HELD_RECHECK_S) while Redis fails


async def watch_held_data(state: State, model: LoadedModel) -> None:
    """:func:`check_held_data` at the load of ``model``, then every
    :data:`HELD_RECHECK_S` while it is the model served, so that a ``ctr load`` that
    finishes, starts or replaces the data set later is said without a reload; while
    Redis does not answer (down at start-up: ``redis_data`` stayed null until the next
    model load, session 47's note), again after :data:`HELD_RETRY_S`, doubling."""
    retry = HELD_RETRY_S
    while state.model is model:  # (a swap also cancels it)
        if await check_held_data(state, model):
            retry = HELD_RETRY_S
            await asyncio.sleep(HELD_RECHECK_S)
        else:
            await asyncio.sleep(retry)
            retry = min(retry * 2, HELD_RECHECK_S)


async def check_held_data(state: State, model: LoadedModel) -> bool:
    """Read which data set Redis holds (``ctr:loaded:data``) and note it on ``model``
    (``/v1/models`` → ``redis_data``); warn where it is another than the bundle was
    trained on, once for each record (a record read again unchanged is not said again).
    False where Redis did not answer (nothing noted: what was noted stands)."""
    from service.heldset import DATA_KEY, comparable, described, differences, record

    if state.redis is None:
        return False
    try:
        timeout = max(state.settings.redis_timeout_ms / 1000, 1.0)
        held = await asyncio.wait_for(state.redis.get(DATA_KEY), timeout)
    except REDIS_ERRORS:
        return False
    if model.redis_data is not None and held == model.redis_data_raw:
        return True  # as last read: said then
    value = record(held)
    # what differs between the record and the bundle's data ("" where nothing does)
    want = described(model.bundle.config)
    differ = None if value is None else differences(comparable(value), want)
    same = None if differ is None else not differ
    named = None if value is None else {k: value.get(k) for k in ("name", "source")}
    complete = None if value is None else value.get("complete", True) is not False
    replay = None if value is None else value.get("replay")  # ctr load --replay-split
    # no paths in the answer
    model.redis_data = {"matches": same, "held": named, "complete": complete, "replay": replay}
    model.redis_data_raw = held
    if replay is not None:
        log.warning("Redis holds a replay load of %s (ctr load --replay-split %s): the "
                    "split's users only, each as of its first example there, not their "
                    "newest histories", named, replay)  # fmt: skip
    if complete is False:
        log.warning("a ctr load of %s into Redis is running or did not complete (%s): some "
                    "users may hold another data set's rows, or none; once it has, the "
                    "next read of it says so", named, DATA_KEY)  # fmt: skip
    if same is False:
        log.warning("Redis holds another data set than model %s/%s was trained on (%s: %s; "
                    "%s): its users and items are scored as if they were this model's; load "
                    "the bundle's data (ctr load --bundle) or point CTR_REDIS_URL at its "
                    "database", model.name, model.version, DATA_KEY, named,
                    differ)  # fmt: skip
    return True


def unexpected(exc: Exception) -> BundleError:
    """A load's exception of another type than the bundle and provider errors, as a
    :class:`BundleError` that names it (the traceback goes to the log)."""
    log.error("unexpected error loading the bundle", exc_info=exc)
    return BundleError(f"loading the bundle failed: {type(exc).__name__}: {exc}")


async def start(state: State, deployed: str | None) -> LoadedModel:
    """The start-up load: ``deployed`` (the deployment's last broadcast version, see
    :meth:`~service.reloadbus.ReloadBus.baseline`) if given and it loads, else
    ``CTR_MODEL_VERSION``. Raises as :func:`load`."""
    if deployed is not None:
        try:
            return await load(state, deployed)
        except (BundleError, ProviderError):  # logged in load
            s = state.settings
            log.warning("the deployment's version %s does not load here (yet): starting on "
                        "%s, and trying it again", deployed, s.model_version)  # fmt: skip
            if state.bus is not None:  # e.g. its files still on their way to this host
                state.bus.retry_later(deployed)
            same = False
            with contextlib.suppress(BundleError):
                same = str(resolve_version(s.models_dir, s.model_name, s.model_version)) == deployed
            if same:
                raise  # the same version: no second load of it
    return await load(state, None)


async def start_up(state: State, deployed: str | None) -> None:
    """The worker's first load (:func:`start`) and, with ``latest``, its fallback
    (:func:`fall_back`), under the reload lock: the retries they may arm (the deployment's
    version, the newest after a fallback) must not load while they still run, or a slow
    start-up load would swap its version in over theirs. A bundle that does not load
    leaves the worker not-ready (logged in :func:`load`); a provider error is raised only
    with ``CTR_REQUIRE_GPU``."""
    async with state.reload_lock:
        try:
            await start(state, deployed)
        except BundleError as exc:
            # with "latest", serve the newest version that loads (the rest of a fleet
            # still serves it after a rejected reload); with none, the service runs
            # not-ready until a reload succeeds
            if state.settings.model_version == "latest":
                await fall_back(state, exc)
        except ProviderError:
            if state.settings.require_gpu:
                raise


# start-up fallback: older versions tried at most, and the first wait before the newest
# is tried again (doubling up to FALLBACK_RETRY_MAX_S)
FALLBACK_VERSIONS = 3
FALLBACK_RETRY_S = 30.0
FALLBACK_RETRY_MAX_S = 600.0


async def fall_back(state: State, newest_error: BundleError) -> None:
    """Start-up found the newest version broken: load the newest of the few versions
    before it that loads (passing over those the deployment rolled back from), and keep
    trying the newest in the background (the failure may
    have been passing: a file still being copied, a full GPU), so the worker converges
    on what a fresh start would serve."""
    s = state.settings
    try:
        versions = list_versions(s.models_dir, s.model_name)
    except BundleError:  # the store's folder itself unreadable: nothing to fall back to
        state.model_error = str(newest_error)
        return
    # not a version the deployment rolled back from (its record outdated by a newer
    # export, the one that failed here): those are known bad, and its peers serve the
    # version rolled back to (review, session 40: the fallback took the bad one)
    gone = state.bus.rolled_back if state.bus is not None else None
    older = [v for v in reversed(versions[:-1]) if gone is None or not gone[0] < v <= gone[1]]
    for v in older[:FALLBACK_VERSIONS]:
        try:
            model = await load(state, str(v))
        except (BundleError, ProviderError):
            continue
        log.error(
            "the newest version %s does not load; serving version %s, the newest that does",
            versions[-1],
            model.version,
        )
        state.set_fallback({"newest": str(versions[-1]), "error": str(newest_error)})
        spawn(state, retry_latest(state))
        return
    state.model_error = str(newest_error)  # none loads: say why the newest did not


def agreed(state: State, version: str) -> None:
    """The deployment's broadcast names ``version``, which this worker serves: a start-up
    fallback to it is over (the deployment chose it), and the newest is no longer tried
    (:func:`retry_latest`)."""
    if state.fallback is not None and state.model is not None and state.model.version == version:
        log.info("the deployment serves version %s too: the start-up fallback is over", version)
        state.set_fallback(None)


def settle_heap(full: bool = True) -> None:
    """Move everything alive after a load into the GC's permanent generation.

    A full (generation 2) collection walks every tracked object: with a bundle, ORT and
    the web stack loaded that is ~80-200k objects and 20-150 ms with the event loop
    stopped, which showed as the p99 of every open-loop run. Frozen objects are skipped,
    so later collections only walk what requests allocate.

    ``full``: unfreeze first, so that the collection walks the whole heap and frees the
    cycles among what is no longer alive (a reload's previous model). Otherwise only
    what is not frozen yet is collected (the new model's objects, what requests left):
    about 1 ms. The previous model's objects are frozen too, and freed by reference
    counting as its last requests end; only reference cycles among them wait for the
    next full settle: every :data:`FULL_SETTLE_EVERY` loads, or the next load that finds
    a model replaced before still alive (:func:`load`)."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


async def retry_latest(state: State) -> None:
    """After a start-up fallback: load "latest" now and then, until it loads or another
    load (a reload, a broadcast, SIGHUP) ends the fallback."""

    async def attempt() -> bool:
        target = "latest"
        # the newest a version the deployment rolled back from (the newer export that
        # kept a start from taking the rollback's record is gone): a fresh start takes
        # the record's version again, which its peers serve (review, session 47: the
        # retry swapped in the version rolled back from)
        gone = state.bus.rolled_back if state.bus is not None else None
        if gone is not None:
            s = state.settings
            with contextlib.suppress(BundleError):
                if gone[0] < resolve_version(s.models_dir, s.model_name, "latest") <= gone[1]:
                    target = str(gone[0])
        if target != "latest" and state.model is not None and state.model.version == target:
            log.info("the newest version is one the deployment rolled back from: serving "
                     "its version %s, fallback over", target)  # fmt: skip
            state.set_fallback(None)
            return True
        with contextlib.suppress(BundleError, ProviderError):  # logged in load
            model = await load(state, target)
            log.info("version %s loads now: fallback over", model.version)
            return True
        if target == "latest":
            return False
        # the rollback's version does not load here: a fresh start then takes
        # CTR_MODEL_VERSION ("latest", :func:`start`) and retries the record's version
        # in the background (the bus); so does this retry
        with contextlib.suppress(BundleError, ProviderError):  # logged in load
            model = await load(state, "latest")
            if state.bus is not None:
                state.bus.retry_later(target)
            log.info("the newest version, %s, loads now: fallback over (the deployment's "
                     "%s is tried again in the background)", model.version, target)  # fmt: skip
            return True
        return False

    done = lambda: state.fallback is None  # noqa: E731
    await retry_under_lock(state.reload_lock, attempt, done, FALLBACK_RETRY_S, FALLBACK_RETRY_MAX_S)


def spawn(state: State, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` as a task the state holds until it is done (the loop keeps only a
    weak reference to a task)."""
    task = asyncio.get_running_loop().create_task(coro)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


# how often a worker of ``ctr serve --workers N`` looks whether its supervisor is there
SUPERVISOR_CHECK_S = 1.0


async def watch_supervisor(parent: BaseProcess, every_s: float = SUPERVISOR_CHECK_S) -> None:
    """Stop this worker (its own SIGTERM: uvicorn's graceful shutdown) once its
    supervisor ``parent`` is gone (``multiprocessing.parent_process()``: uvicorn's
    supervisor of ``ctr serve --workers N``; None in a process of its own, one worker or
    a test's app, which has none to watch). A supervisor
    killed outright (SIGKILL, the OOM killer) left its workers serving for good outside a
    container: holding the port, writing to Redis, with nobody to stop them (a review,
    session 46: orphaned test workers wrote their tracking probe key into later tests'
    database)."""
    import os
    import signal

    while True:
        await asyncio.sleep(every_s)
        # its sentinel (a pipe the supervisor holds open), not os.getppid(): under the
        # forkserver start method the OS parent is the fork server from the start (the
        # worker stopped itself a second after it started: diff review)
        if not parent.is_alive():
            log.warning("the supervisor (pid %s) is gone: this worker stops", parent.pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def reload_quietly(state: State) -> None:
    """SIGHUP: reload the newest version and, like ``POST /admin/reload``, broadcast it to
    the deployment's other workers (and record it for those starting later); a failure
    is logged and the old one serves on."""
    with contextlib.suppress(BundleError, ProviderError):  # logged in load
        async with state.reload_lock:
            model = await load(state, "latest")
            if state.bus is not None:
                await state.bus.publish(model.version)
