"""Graph calls on native threads that never take the GIL (``CTR_NATIVE_RUNNER``).

Through ORT's Python binding, the thread of a graph call needs the GIL before the run
(the feeds into tensors) and after it (the outputs into arrays, the result back to the
event loop). Under load the event loop holds the GIL most of the time, so that thread
waits for it, and the next call waits behind it (docs/benchmarks.md, "Session 21").
:class:`NativeRunner` hands the call to ``native/runner.cc`` instead: the event loop
describes its arrays (addresses, element types, shapes) in one C call that keeps the
GIL, a native thread runs the graph with ORT's C API and writes ``probs [N]`` into a
float32 array allocated here, and an eventfd, watched by the event loop
(``add_reader``), says which calls are done.

Its sessions are made from the same graph bytes, thread counts and spin settings as
the Python sessions (the one-thread session for small calls included) by the ONNX
Runtime the Python binding runs, and ``service.model.native_parity`` compares them with
the Python session before the runner is used. Only plain scoring calls go this way: an
``explain`` call (it also returns the attention weights), micro-batched calls and the
GPU keep the Python runners.

Every array a call points at is held here until its call is reported done, and a call
whose waiter gave up before a thread took it is dropped (:meth:`NativeRunner.run`), as
with :class:`~service.callthreads.CallThreads`."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from service.weights import Weight

log = logging.getLogger("ctr.service")

MAX_INPUTS = 16  # native/runner.cc kMaxInputs
MAX_DIMS = 4  # kMaxDims
DESC = 3 + MAX_DIMS  # int64 per input: address, element type, rank, dims
POLL_MAX = 64
ERROR_LEN = 2048
SPIN = {"never": 0, "run": 1, "always": 2}
# numpy dtype -> ONNX TensorProto element type
ELEMENT_TYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.float16): 10,
    np.dtype(np.float64): 11,
}
_P = ctypes.c_void_p


class NativeRunError(RuntimeError):
    """The native runner could not be made, or a call on it failed; the message says why."""


@dataclass(frozen=True)
class SessionSpec:
    """One session of the runner: the graph's bytes, its intra-op threads, and the
    custom-op library to register (None: a graph without custom ops)."""

    model: bytes
    threads: int
    ops_library: str | None


def _bind(lib: ctypes.CDLL) -> None:
    lib.ctr_runner_ready.restype = ctypes.c_int
    lib.ctr_runner_ready.argtypes = []
    lib.ctr_runner_new.restype = _P
    lib.ctr_runner_new.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.ctr_runner_add_session.restype = ctypes.c_int
    lib.ctr_runner_add_session.argtypes = [
        _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
        ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
    ]  # fmt: skip
    lib.ctr_runner_start.restype = ctypes.c_int
    lib.ctr_runner_start.argtypes = [_P, ctypes.c_int]
    lib.ctr_runner_set_lane.restype = ctypes.c_int
    lib.ctr_runner_set_lane.argtypes = [_P, ctypes.c_int, ctypes.c_int]
    lib.ctr_runner_submit.restype = ctypes.c_int
    lib.ctr_runner_submit.argtypes = [
        _P, ctypes.c_uint64, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P, ctypes.c_int64,
    ]  # fmt: skip
    lib.ctr_runner_run.restype = ctypes.c_int
    lib.ctr_runner_run.argtypes = [
        _P, ctypes.c_int, _P, ctypes.c_int, _P, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int,
    ]  # fmt: skip
    lib.ctr_runner_cancel.restype = ctypes.c_int
    lib.ctr_runner_cancel.argtypes = [_P, ctypes.c_uint64]
    lib.ctr_runner_poll.restype = ctypes.c_int
    lib.ctr_runner_poll.argtypes = [_P, _P, _P, _P, ctypes.c_int]
    lib.ctr_runner_error.restype = ctypes.c_int
    lib.ctr_runner_error.argtypes = [_P, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
    lib.ctr_runner_pending.restype = ctypes.c_int
    lib.ctr_runner_pending.argtypes = [_P]
    lib.ctr_runner_busy.restype = ctypes.c_int
    lib.ctr_runner_busy.argtypes = [_P, ctypes.c_int]
    lib.ctr_runner_hold.restype = None
    lib.ctr_runner_hold.argtypes = [_P, ctypes.c_int]
    lib.ctr_runner_free.restype = None
    lib.ctr_runner_free.argtypes = [_P]
    if not hasattr(lib, "ctr_runner_add_weight"):  # a prebuilt library from before it
        return
    lib.ctr_runner_add_weight.restype = ctypes.c_int
    lib.ctr_runner_add_weight.argtypes = [
        _P, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, _P,
        ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
    ]  # fmt: skip


@functools.cache
def _array(ctype: Any, n: int) -> Any:
    """The ctypes array type of ``n`` ``ctype``: made once (each ``ctype * n`` makes a
    new class, cyclic garbage that only a full garbage collection frees)."""
    return ctype * n


def _error_buffer() -> Any:
    """A zeroed buffer for the library's error message."""
    return _array(ctypes.c_char, ERROR_LEN)()


@functools.cache
def _libraries(lib_path: str) -> tuple[ctypes.PyDLL, ctypes.CDLL]:
    """The library twice, bound (:func:`_bind`): for the calls that keep the GIL (a few
    µs each) and for the blocking ones that let go of it. Once per process and path:
    every ctypes library object makes a function-pointer class of its own, which only a
    full garbage collection frees, and a reload makes a runner (whose objects the
    reload's light collection has frozen by the next one: service.lifecycle)."""
    libs = ctypes.PyDLL(lib_path), ctypes.CDLL(lib_path)
    for lib in libs:
        try:
            _bind(lib)
        except AttributeError as exc:  # a prebuilt library from before the runner
            raise NativeRunError(f"{lib_path} has no native runner: {exc}") from exc
    return libs


def _free(lib: ctypes.CDLL, handle: int, weights: Sequence[Weight] = ()) -> None:
    """Release the runner; ``weights``, whose memory its sessions read, are held until
    then."""
    lib.ctr_runner_free(handle)


class NativeRunner:
    """Sessions of one graph on native threads. ``sessions[1]``, when given, is the
    one-thread session, for the calls with at most ``single_max`` candidates;
    ``sessions[0]`` takes the larger ones. Either kind runs up to ``workers`` at once
    (lane 0). With ``parallel`` > 1 (and a one-thread session), a larger call submitted
    with ``busy`` (the caller's other work in flight: the service's other requests, or
    this runner's other calls) runs on the one-thread session instead, up to ``parallel``
    of them at once (lane 1): side by side, one thread each. A call alone keeps the main
    session's threads. At most ``max(workers, parallel)`` calls run at once in all.

    Why two one-thread calls rather than one call on two threads, for the larger calls
    under load: the two intra-op threads of one call meet at every parallel loop, and
    while the event loop's thread holds one of the two cores, the other waits there
    (docs/benchmarks.md, "Session 23"). Small calls stay one at a time: there the event
    loop's own work is the bottleneck, and a second call only takes its core."""

    kind = "native"

    def __init__(
        self,
        lib_path: str,
        names: list[str],
        sessions: list[SessionSpec],
        spin: str,
        workers: int = 1,
        single_max: int = 0,
        on_run: Callable[[float, int], None] | None = None,
        parallel: int = 1,
        weights: Sequence[Weight] = (),
    ) -> None:
        if len(names) > MAX_INPUTS:
            raise NativeRunError(f"{len(names)} graph inputs; the runner takes {MAX_INPUTS}")
        self._lib, self._blocking = _libraries(lib_path)
        # ORT hands its API to the library when the library is registered: the runner's
        # sessions are then made by the runtime this process's Python binding runs
        # (once per process: each registration keeps a small domain for good)
        if not self._lib.ctr_runner_ready():
            ort.SessionOptions().register_custom_ops_library(lib_path)
        err = _error_buffer()
        handle = self._lib.ctr_runner_new(err, ERROR_LEN)
        if not handle:
            raise NativeRunError(f"native runner: {err.value.decode(errors='replace')}")
        self._handle: int = handle
        weights = tuple(weights)  # held by the finalizer: the sessions read their memory
        self._finalizer = weakref.finalize(self, _free, self._blocking, handle, weights)
        self._background = False
        self._releaser: threading.Thread | None = None  # a background release (close)
        self.names = list(names)
        packed = b"".join(n.encode() + b"\0" for n in self.names)
        if weights and not hasattr(self._lib, "ctr_runner_add_weight"):
            log.warning("%s cannot share weights: each native session keeps its own", lib_path)
            weights = ()
        for w in weights:  # every session below takes these instead of its own copy
            a = w.array
            dims = _array(ctypes.c_int64, max(a.ndim, 1))(*a.shape)
            if self._lib.ctr_runner_add_weight(
                handle, w.name.encode(), a.ctypes.data, a.nbytes, w.onnx_type,
                ctypes.addressof(dims), a.ndim, err, ERROR_LEN,
            ) != 0:  # fmt: skip
                self._finalizer()
                why = err.value.decode(errors="replace")
                raise NativeRunError(f"shared weight {w.name}: {why}")
        self.shared_weights = len(weights)
        for spec in sessions:
            lib_arg = spec.ops_library.encode() if spec.ops_library else None
            # the graph is optimised here: a blocking call (the GIL let go)
            index = self._blocking.ctr_runner_add_session(
                handle, spec.model, len(spec.model), spec.threads, SPIN[spin], lib_arg,
                packed, len(self.names), b"probs", err, ERROR_LEN,
            )  # fmt: skip
            if index < 0:
                self._finalizer()
                raise NativeRunError(f"native session: {err.value.decode(errors='replace')}")
        self.sessions = len(sessions)
        self.single_max = single_max if len(sessions) > 1 else 0
        # larger calls side by side (lane 1) run on the one-thread session
        self.parallel = max(parallel, 1) if len(sessions) > 1 else 1
        for lane, limit in ((0, workers), (1, self.parallel)):
            if self._lib.ctr_runner_set_lane(handle, lane, limit) != 0:
                self._finalizer()
                raise NativeRunError(f"native runner: lane {lane} refused a limit of {limit}")
        self._fd = self._lib.ctr_runner_start(handle, max(workers, self.parallel))
        if self._fd < 0:
            self._finalizer()
            raise NativeRunError("native runner: the threads did not start")
        self._tokens = itertools.count(1)
        # token -> (future, the arrays the call points at, its output, its lane)
        self._calls: dict[int, tuple[asyncio.Future[Any], list[np.ndarray], np.ndarray, int]] = {}
        self._desc = _array(ctypes.c_int64, MAX_INPUTS * DESC)()
        self._desc_addr = ctypes.addressof(self._desc)
        self._poll_tokens = _array(ctypes.c_uint64, POLL_MAX)()
        self._poll_status = _array(ctypes.c_int32, POLL_MAX)()
        self._poll_seconds = _array(ctypes.c_double, POLL_MAX)()
        self._poll_args = (
            ctypes.addressof(self._poll_tokens),
            ctypes.addressof(self._poll_status),
            ctypes.addressof(self._poll_seconds),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.calls = 0  # calls queued so far
        self.completed = 0  # calls that ran to their end without error, collected
        # told every finished call's run seconds and N, whether or not anyone still
        # waits for it (the model's expected run times), but for the calls run side by
        # side on one thread (they say nothing of a call on the main session); must not
        # hold the model
        self.on_run = on_run

    # -- calls -----------------------------------------------------------------------

    def _describe(self, feeds: dict[str, np.ndarray], desc: Any = None) -> list[np.ndarray]:
        """The feeds in graph order, C-contiguous, described into ``desc`` (default
        ``self._desc``: the event loop's, for :meth:`submit`)."""
        arrays = []
        values: list[int] = []
        for name in self.names:
            a = feeds[name]
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            t = ELEMENT_TYPES.get(a.dtype)
            if t is None or a.ndim > MAX_DIMS:
                raise NativeRunError(f"input {name}: {a.dtype} of rank {a.ndim} not supported")
            shape = a.shape
            values += (a.ctypes.data, t, len(shape), *shape, *(0,) * (MAX_DIMS - len(shape)))
            arrays.append(a)
        (self._desc if desc is None else desc)[: len(values)] = values
        return arrays

    def session_for(self, n: int) -> int:
        """Which session serves a call with ``n`` candidates alone."""
        return 1 if n <= self.single_max else 0

    def route(self, n: int, busy: bool = False) -> tuple[int, int]:
        """``(session, lane)`` for a call with ``n`` candidates submitted now: a larger
        call, while the caller is ``busy`` or another call is in flight, goes side by
        side on the one-thread session (lane 1) when ``parallel`` > 1; any other call as
        :meth:`session_for` says, in lane 0."""
        if self.parallel > 1 and n > self.single_max and (busy or self._calls):
            return 1, 1
        return self.session_for(n), 0

    def _prepare(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """The call's arrays (described into ``self._desc``) and its ``probs [N]`` buffer."""
        arrays = self._describe(feeds)
        return arrays, np.empty(feeds["user_idx"].shape[0], np.float32)

    def run_now(self, feeds: dict[str, np.ndarray], session: int | None = None) -> np.ndarray:
        """``probs [N]`` from a call on this thread (warm-up, checks), on ``session``
        (default: :meth:`session_for`); blocking."""
        self._check_alive()
        # a description of its own: the shared one is read after the GIL is let go, when
        # another thread's call could have written over it
        desc = _array(ctypes.c_int64, MAX_INPUTS * DESC)()
        arrays = self._describe(feeds, desc)
        out = np.empty(feeds["user_idx"].shape[0], np.float32)
        n = len(out)
        err = _error_buffer()
        rc = self._blocking.ctr_runner_run(
            self._handle, self.session_for(n) if session is None else session,
            ctypes.addressof(desc), len(arrays), out.ctypes.data, n, err, ERROR_LEN,
        )  # fmt: skip
        if rc != 0:
            raise NativeRunError(err.value.decode(errors="replace"))
        return out

    def submit(
        self, feeds: dict[str, np.ndarray], busy: bool = False
    ) -> tuple[int, asyncio.Future[Any]]:
        """Queue a call (``busy``: see :meth:`route`); its future gets ``(probs [N], run
        seconds)`` on the running loop."""
        if self.closed:
            raise NativeRunError("the native runner is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._attach(loop)
        arrays, out = self._prepare(feeds)
        n = len(out)
        session, lane = self.route(n, busy)
        token = next(self._tokens)
        fut: asyncio.Future[Any] = loop.create_future()
        # held before the C side can read them, so that nothing frees them meanwhile
        self._calls[token] = (fut, arrays, out, lane)
        rc = self._lib.ctr_runner_submit(
            self._handle, token, session, lane, self._desc_addr, len(arrays),
            out.ctypes.data, n,
        )  # fmt: skip
        if rc != 0:
            del self._calls[token]
            raise NativeRunError("the native runner refused the call")
        self.calls += 1
        return token, fut

    async def run(
        self, feeds: dict[str, np.ndarray], busy: bool = False
    ) -> tuple[np.ndarray, float]:
        """``(probs [N], the run's seconds)``. If the waiter gives up (the request's
        deadline) before a thread has taken the call, the call is dropped; one that has
        started runs to its end and its result is dropped."""
        token, fut = self.submit(feeds, busy)
        try:
            return await fut
        except asyncio.CancelledError:
            # a token no longer held was collected (and the runner may be released
            # since): nothing to drop
            if token in self._calls and self._lib.ctr_runner_cancel(self._handle, token):
                del self._calls[token]
                self._maybe_release()
            raise

    def hold(self, held: bool) -> None:
        """While held, no thread takes a queued call (for tests: a call that stays queued)."""
        self._check_alive()
        self._lib.ctr_runner_hold(self._handle, int(held))

    def _check_alive(self) -> None:
        if self._releaser is not None or not self._finalizer.alive:  # released, or going
            raise NativeRunError("the native runner has been released")

    @property
    def queued(self) -> int:
        """Calls the C side holds, queued or running (for tests)."""
        self._check_alive()
        return int(self._lib.ctr_runner_pending(self._handle))

    def running(self, lane: int) -> int:
        """Calls of ``lane`` (:meth:`route`) running now (for tests)."""
        self._check_alive()
        return int(self._lib.ctr_runner_busy(self._handle, lane))

    @property
    def pending(self) -> int:
        """Calls queued or running, not yet collected."""
        return len(self._calls)

    @property
    def released(self) -> bool:
        """The threads have ended and the sessions are gone (after :meth:`close`)."""
        return not self._finalizer.alive and (
            self._releaser is None or not self._releaser.is_alive()
        )

    # -- the event loop side ---------------------------------------------------------

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._calls and self._loop is not None and not self._loop.is_closed():
            # their futures belong to the old loop, which alone collects them (a closed
            # loop's calls are collected here: their arrays stay held until then)
            raise NativeRunError("the native runner has calls in flight on another event loop")
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._collect)
        self._loop = loop

    def _collect(self) -> None:
        """The eventfd is readable: settle every finished call's future."""
        lib, handle = self._lib, self._handle
        tokens, status, seconds = self._poll_tokens, self._poll_status, self._poll_seconds
        while True:
            k = lib.ctr_runner_poll(handle, *self._poll_args, POLL_MAX)
            for i in range(k):
                call = self._calls.pop(tokens[i], None)
                if call is None:
                    continue
                try:
                    self._settle(call, tokens[i], status[i], seconds[i])
                except Exception:  # one call's bookkeeping must not strand the others
                    log.exception("native runner: a finished call could not be settled")
            if k < POLL_MAX:
                break
        self._maybe_release()

    def _settle(self, call: tuple, token: int, status: int, seconds: float) -> None:
        fut, _, out, lane = call
        error = self._error(token) if status != 0 else None
        if error is None:
            self.completed += 1
        if not fut.done():  # else its waiter gave up after the call had started
            if error is not None:
                fut.set_exception(NativeRunError(error))
            else:
                fut.set_result((out, seconds))
        if error is None and self.on_run is not None and lane == 0:  # timed out or not
            try:  # after the future: a failing hook must not leave the request waiting
                self.on_run(seconds, len(out))
            except Exception:
                log.exception("native runner: the on_run hook failed")

    def _error(self, token: int) -> str:
        err = _error_buffer()
        if not self._lib.ctr_runner_error(self._handle, token, err, ERROR_LEN):
            return "the native call failed"
        return "native graph call failed: " + err.value.decode(errors="replace")

    # -- the end ---------------------------------------------------------------------

    def close(self, background: bool = False) -> None:
        """No new calls; the runner is released once the calls in flight are collected
        (at once if there are none). Model swaps call it on the outgoing model with
        ``background``: the release (idle threads joined, sessions freed) then runs on a
        thread of its own, not on the event loop's. Shutdown releases it in place."""
        self.closed = True
        self._background = background
        self._maybe_release()

    def _maybe_release(self) -> None:
        if not self.closed or self._calls:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None
        if not self._background:
            self._finalizer()  # joins the idle threads, releases the sessions
        elif self._releaser is None:
            self._releaser = threading.Thread(
                target=self._finalizer, name="ctr-native-release", daemon=True
            )
            self._releaser.start()

    def wait_released(self, timeout: float | None = None) -> bool:
        """Wait for a background release (tests, shutdown); True once released."""
        if self._releaser is not None:
            self._releaser.join(timeout)
        return self.released
