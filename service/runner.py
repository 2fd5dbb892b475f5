"""How one graph call runs: plain ``session.run``, IO binding, or CUDA graphs.

Every runner takes feeds in the graph layout of :mod:`ctr.encode` (``U`` users,
``N`` candidates: ``user_sparse [U, Fu]``, ``user_dense [U, Du]``, ``hist [U, S, L]``,
``hist_len [U]``, ``item_sparse [N, Fi]``, ``item_dense [N, Di]``, ``user_idx [N]``)
and returns the requested outputs as host arrays (``probs [N]``, ``attention [N, L]``).

* :class:`SessionRunner`: ``session.run``; ORT allocates outputs per call (CPU default).
* :class:`BindingRunner`: IO binding. Inputs are bound from host memory (one copy to the
  device), outputs are allocated on the provider's device and copied back once.
* :class:`SplitRunner`: small calls on a one-thread session, the rest on another runner.
* :class:`GraphRunner`: CUDA graphs. A CUDA graph replays a fixed kernel sequence on
  fixed buffers, so shapes are bucketed: a call with ``U`` users and ``N`` candidates is
  padded to the smallest ``(U_b, N_b)`` bucket that holds it and replays that bucket's
  graph (``gpu_graph_id``); outputs are sliced back to ``N``. Padded users have an
  empty history and padded candidates are PAD rows pointing at user 0, so they never
  touch a real row (every op is row-wise in N and in U). Calls larger than every
  bucket run without a graph (``gpu_graph_id=-1``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.devcopy import Copier, OrtCopier, make_copier, self_check

log = logging.getLogger("ctr.runner")

USER_INPUTS = ("user_sparse", "user_dense", "hist", "hist_len")
SKIP_GRAPH = "-1"


class Runner(Protocol):
    kind: str
    # where calls must run (a CUDA-graph runner's own threads), None: on any thread
    thread: Executor | None
    # graph calls that can run at once; 0: as many as the caller's executor allows
    streams: int

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]: ...


class SessionRunner:
    kind = "session"
    thread = None
    streams = 0

    def __init__(self, session: ort.InferenceSession, skip_graph: bool = False) -> None:
        self.session = session
        self.options = ort.RunOptions()
        if skip_graph:  # a session with CUDA graphs enabled must be told not to capture
            self.options.add_run_config_entry("gpu_graph_id", SKIP_GRAPH)

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, feeds, self.options)


class BindingRunner:
    """IO binding with outputs on ``device`` ("cuda" or "cpu")."""

    kind = "io_binding"
    thread = None
    streams = 0

    def __init__(self, session: ort.InferenceSession, device: str) -> None:
        self.session = session
        self.device = device

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        io = self.session.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, np.ascontiguousarray(v))
        for n in names:
            io.bind_output(n, self.device)
        self.session.run_with_iobinding(io)
        return list(io.copy_outputs_to_cpu())


class SplitRunner:
    """Calls with at most ``max_candidates`` candidates on ``single`` (a session with one
    intra-op thread), the rest on ``main``. CPU only.

    A small run gains little from a second thread and can lose a lot: on the 2-core
    machine of docs/benchmarks.md (section 2, "Session 8"), 50-candidate requests served
    this way had the same p50, a p99 1.3-2.6x lower and 15-29 % more requests/s at
    saturation. (The likely cause: the pool thread, asleep between runs with
    ``CTR_INTRA_OP_SPIN=run``, waits for a core that the event loop or the client holds.)"""

    def __init__(self, main: Runner, single: SessionRunner, max_candidates: int) -> None:
        self.main = main
        self.single = single
        self.max_candidates = max_candidates
        self.kind = main.kind
        self.thread = main.thread
        self.streams = main.streams

    def pick(self, n: int) -> Runner:
        """The runner for a call with ``n`` candidates."""
        return self.single if n <= self.max_candidates else self.main

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        return self.pick(feeds["user_idx"].shape[0]).run(feeds, names)


def bucket_of(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds ``value``, or None if none does."""
    for b in buckets:
        if b >= value:
            return b
    return None


def pad_into(host: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    """Copy ``feeds`` into the bucket-sized ``host`` arrays; the tail rows become padding:
    zero IDs (PAD), zero dense values, empty histories and ``user_idx`` 0."""
    for k, dst in host.items():
        src = feeds[k]
        rows = src.shape[0]
        dst[:rows] = src
        dst[rows:] = 0


@dataclass
class _Slot:
    """One captured graph: fixed device buffers for a ``(users, n)`` bucket."""

    host: dict[str, np.ndarray]
    inputs: dict[str, Any]  # name -> OrtValue on the device
    outputs: dict[str, Any]
    binding: Any
    options: ort.RunOptions


class GraphRunner:
    """CUDA graphs per ``(U_b, N_b)`` bucket. Needs a session created with the CUDA EP
    option ``enable_cuda_graph=1``.

    ORT keeps captured graphs in the CUDA provider's per-thread context, and a capture
    must not overlap other CUDA work of the session. So every call, capture included,
    runs on one thread that this runner owns (``thread``): graphs captured at load are
    the ones replayed, and calls never overlap (one GPU stream; cross-request batching
    is what fills the GPU). The service submits inference straight to ``thread``
    (``LoadedModel.executor``), so a request pays no extra thread hop; a call from any
    other thread is forwarded there."""

    kind = "cuda_graph"
    streams = 1

    def __init__(
        self,
        session: ort.InferenceSession,
        input_tails: dict[str, tuple[int, ...]],
        output_tails: dict[str, tuple[int, ...]],
        user_buckets: list[int],
        n_buckets: list[int],
        device: str = "cuda",
        copy: str = "ort",
    ) -> None:
        """``input_tails``/``output_tails``: each tensor's shape after its batch axis
        (``U`` for user inputs, ``N`` for the rest), e.g. ``hist -> (S, L)``.
        ``copy``: how inputs reach the fixed buffers and outputs come back
        (``CTR_GPU_COPY``, :mod:`service.devcopy`); a direct copier is checked on the
        first bucket's buffers before use, and ORT's copies replace it if it fails."""
        self.session = session
        self.device = device
        self.copy_wanted = copy
        self.copier: Copier | None = None  # chosen on the first bucket's buffers
        self.copy_note = ""
        self.user_buckets = user_buckets
        self.n_buckets = n_buckets
        self.input_tails = input_tails
        self.output_tails = output_tails
        self.input_types = {i.name: _np_type(i.type) for i in session.get_inputs()}
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.fallback = SessionRunner(session, skip_graph=True)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cuda-graph")
        self.thread_id = self.thread.submit(threading.get_ident).result()

    def _slot(self, users: int, n: int) -> _Slot:
        """The bucket's buffers and binding, made on first use (on ``thread`` only)."""
        key = (users, n)
        slot = self.slots.get(key)
        if slot is not None:
            return slot
        host, inputs = {}, {}
        for name, tail in self.input_tails.items():
            rows = users if name in USER_INPUTS else n
            arr = np.zeros((rows, *tail), self.input_types[name])
            host[name] = arr
            # its own memory on every provider (on the CPU, ortvalue_from_numpy would
            # share arr's, and the copies in _run would go untested there)
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(arr.shape), arr.dtype, self.device, 0
            )
            value.update_inplace(arr)
            inputs[name] = value
        outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type([n, *tail], np.float32, self.device, 0)
            for name, tail in self.output_tails.items()
        }
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        options = ort.RunOptions()  # graph ids 1, 2, ...: 0 is ORT's default id
        options.add_run_config_entry("gpu_graph_id", str(len(self.slots) + 1))
        slot = _Slot(host, inputs, outputs, binding, options)
        if self.copier is None:
            self.copier = self._checked_copier(slot)
        self.slots[key] = slot
        return slot

    def _checked_copier(self, slot: _Slot) -> Copier:
        copier, self.copy_note = make_copier(self.copy_wanted, self.device)
        if isinstance(copier, OrtCopier):
            return copier
        outs = {k: np.zeros(v.shape(), np.float32) for k, v in slot.outputs.items()}
        try:
            self_check(copier, slot.inputs, slot.host)
            self_check(copier, slot.outputs, outs)
        except Exception as exc:  # never serve through a copier that reads back wrong
            self.copy_note = f"direct copies failed their check ({exc}); using ORT's"
            log.warning(self.copy_note)
            return OrtCopier()
        return copier

    @property
    def copy_kind(self) -> str:
        return self.copier.kind if self.copier is not None else self.copy_wanted

    def capture(self) -> float:
        """Capture every bucket now (ORT runs each graph's first calls normally, then
        captures); returns the seconds it took."""
        return self.thread.submit(self._capture).result()

    def _capture(self) -> float:
        t = time.perf_counter()
        for u in self.user_buckets:
            for n in self.n_buckets:
                slot = self._slot(u, n)
                for _ in range(3):
                    self.session.run_with_iobinding(slot.binding, slot.options)
        return time.perf_counter() - t

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if threading.get_ident() == self.thread_id:  # the service submits here directly
            return self._run(feeds, names)
        return self.thread.submit(self._run, feeds, names).result()

    def _run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        users = bucket_of(feeds["hist_len"].shape[0], self.user_buckets)
        n = bucket_of(feeds["user_idx"].shape[0], self.n_buckets)
        if users is None or n is None:
            return self.fallback.run(feeds, names)
        slot = self._slot(users, n)
        copier = self.copier
        assert copier is not None  # set with the first slot
        rows = feeds["user_idx"].shape[0]
        pad_into(slot.host, feeds)
        for name, arr in slot.host.items():
            copier.to_device(slot.inputs[name], arr)
        copier.landed()
        # outputs are read after the run: ORT's CUDA-graph replay ends with a sync of its
        # own stream (CUDAGraphManager::Replay), so they are complete by then
        self.session.run_with_iobinding(slot.binding, slot.options)
        return [copier.to_host(slot.outputs[k], rows) for k in names]

    def close(self) -> None:
        self.thread.shutdown(wait=False)


def copy_info(runner: Runner) -> dict[str, str | None] | None:
    """How a CUDA-graph runner copies (``/v1/models``' ``gpu_copy``); None for others.
    With several streams, each runner checks its copier itself: ``ort`` if any fell back."""
    runners = runner.runners if isinstance(runner, GraphPool) else [runner]
    graph_runners = [r for r in runners if isinstance(r, GraphRunner)]
    if not graph_runners:
        return None
    worst = min(graph_runners, key=lambda r: r.copy_kind != "ort")  # a fallback first
    return {"copy": worst.copy_kind, "note": worst.copy_note or None}


class GraphPool:
    """Several :class:`GraphRunner` s, each on its own ORT session, so each replays its
    graphs on its own CUDA stream: a batch can start while another is still on the GPU
    (the small kernels of one DIEN call leave most of the GPU idle).

    ``thread`` is an executor that hands each call to the runner with the fewest calls
    in flight, on that runner's own thread (no extra hop); :meth:`run`, called there,
    uses that thread's runner."""

    kind = "cuda_graph"

    def __init__(self, runners: list[GraphRunner]) -> None:
        self.runners = runners
        self.streams = len(runners)
        self.by_thread = {r.thread_id: r for r in runners}
        self.thread = _LeastBusy([r.thread for r in runners])

    @property
    def slots(self) -> dict[tuple[int, int], _Slot]:
        return self.runners[0].slots

    def capture(self) -> float:
        return sum(r.capture() for r in self.runners)

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        runner = self.by_thread.get(threading.get_ident())
        if runner is not None:
            return runner._run(feeds, names)
        return self.thread.submit(self.run, feeds, names).result()

    def close(self) -> None:
        for r in self.runners:
            r.close()


class _LeastBusy(Executor):
    """Submits each call to the executor with the fewest calls in flight."""

    def __init__(self, executors: list[ThreadPoolExecutor]) -> None:
        self.executors = executors
        self.busy = [0] * len(executors)
        self.lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        with self.lock:
            k = min(range(len(self.executors)), key=self.busy.__getitem__)
            self.busy[k] += 1
        try:
            future = self.executors[k].submit(fn, *args, **kwargs)
        except BaseException:
            self._done(k)
            raise
        future.add_done_callback(lambda _f, k=k: self._done(k))
        return future

    def _done(self, k: int) -> None:
        with self.lock:
            self.busy[k] -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for e in self.executors:
            e.shutdown(wait=wait, cancel_futures=cancel_futures)


def _np_type(onnx_type: str) -> type:
    return {"tensor(int64)": np.int64, "tensor(float)": np.float32}[onnx_type]
