"""The loaded model: bundle + ONNX Runtime session, swapped atomically on reload."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from ctr import native
from ctr.bundle import (
    CONTRACT_KEY,
    CONTRACT_KEY_V2,
    DENSE_RANGE_KEY,
    Bundle,
    BundleError,
    contract_digest,
    dense_range_text,
    graph_inputs,
    graph_outputs,
    load_bundle,
)
from service.batcher import Batcher
from service.graphfile import graph_source, loaded_from
from service.nativerun import NativeRunError, NativeRunner, SessionSpec
from service.precision import (
    FP16_TOLERANCE,
    PrecisionError,
    dense_problem,
    fp16_bytes,
    probe_feeds,
    range_feeds,
)
from service.rowcache import ItemRowCache
from service.runner import (
    BindingRunner,
    GraphPool,
    GraphRunner,
    Runner,
    SessionRunner,
    SplitRunner,
)
from service.settings import Settings, parse_buckets
from service.usercache import UserRowCache
from service.weights import Weight, large_weights

log = logging.getLogger("ctr.model")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


FUSED_TOLERANCE = 1e-5  # max |p_fused - p_standard| over the probe feeds, fp32
RUN_TIME_WEIGHT = 0.2  # weight of the newest call in LoadedModel.expected_run_s


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""


class FusedError(RuntimeError):
    """The fused graph cannot be served here; the standard graph is served instead."""


def choose_providers(setting: str) -> list[str]:
    available = ort.get_available_providers()
    if setting == "cpu":
        return [CPU]
    if setting == "cuda":
        if CUDA not in available:
            raise ProviderError(f"CTR_PROVIDER=cuda but ORT offers only {available}")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass
class LoadedModel:
    bundle: Bundle
    session: ort.InferenceSession
    provider: str
    outputs: list[str]
    rows: ItemRowCache  # encoded candidate rows; they depend on this bundle's mapping
    runner: Runner
    precision: str = "fp32"
    precision_note: str = ""
    graph: str = "standard"  # or "fused": model_fused(_cuda).onnx with the custom-op library
    graph_note: str = ""  # why the fused graph is not served, when it was wanted
    graph_ops: list[str] = field(default_factory=list)  # custom ops in the served graph
    batcher: Batcher | None = None  # cross-request micro-batching, when enabled
    users: UserRowCache = field(default_factory=lambda: UserRowCache(0))  # encoded users
    # plain scoring calls on native threads (CTR_NATIVE_RUNNER); None: the Python runner
    native: NativeRunner | None = None
    native_note: str = ""  # why the native runner is not used, when it was wanted
    # the data set Redis holds against the bundle's (service.heldset): {"matches": True,
    # False or None (no record), "held": the record}; None until it was read
    redis_data: dict[str, Any] | None = None
    redis_data_raw: Any = None  # the record as Redis held it when redis_data was noted
    # initializers every session of the model shares (CTR_SHARE_WEIGHTS_MIN_BYTES); each
    # session holds what it reads of them itself (_session's keep, the native finalizer)
    shared_weights: list[Weight] = field(default_factory=list)
    shared_note: str = ""  # why the weights are not shared, when they would be
    # (seconds, N) of recent graph calls, weighted means by run_key (see expected_run_s);
    # written on whichever thread ran the call, one dict store at a time
    run_times: dict[tuple[bool, int, bool], tuple[float, float]] = field(default_factory=dict)

    @functools.cached_property
    def context_sources(self) -> frozenset[str]:
        """Request ``context`` keys the model reads: its user-side features' sources."""
        c = self.bundle.config
        return frozenset(f.source for f in c.user_sparse + c.user_dense)

    @functools.cached_property
    def profile_fields(self) -> tuple[str, ...]:
        """The stored profile's fields the model reads (its user-side features' sources,
        sorted), whose own expiry a tracked read asks for."""
        return tuple(sorted(self.context_sources))

    @functools.cached_property
    def dense_sources(self) -> tuple[frozenset[str], frozenset[str]]:
        """Keys the model reads as numbers: in a candidate's ``features`` (its item-side
        dense features) and in ``context`` (its user-side ones)."""
        c = self.bundle.config
        return frozenset(f.source for f in c.item_dense), frozenset(f.source for f in c.user_dense)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return str(self.bundle.version)

    @property
    def executor(self) -> Executor | None:
        """Where inference must run: a CUDA-graph runner's own threads; else anywhere."""
        return self.runner.thread

    @property
    def streams(self) -> int:
        """Graph calls that can run at once: one per CUDA-graph runner, else 0 (any)."""
        return self.runner.streams

    @property
    def single_thread_max(self) -> int:
        """Calls with at most this many candidates run on a one-thread session (0: none)."""
        return self.runner.max_candidates if isinstance(self.runner, SplitRunner) else 0

    @property
    def has_attention(self) -> bool:
        return "attention" in self.outputs

    def run(self, feeds: dict[str, np.ndarray], explain: bool) -> list[np.ndarray]:
        """``probs [N]`` and, with ``explain``, ``attention [N, L]``. Times the call into
        :meth:`expected_run_s`'s estimate for calls of about this many candidates."""
        start = time.perf_counter()
        outs = run_outputs(self.runner, self.has_attention, feeds, explain)
        self.note_run(time.perf_counter() - start, len(outs[0]), explain)
        return outs

    def note_run(self, took: float, n: int, explain: bool) -> None:
        """A graph call of ``n`` candidates took ``took`` seconds (:meth:`expected_run_s`)."""
        record_run(self.run_times, self.run_key(n, explain), took, n)

    def run_key(self, n: int, explain: bool = False) -> tuple[bool, int, bool]:
        """Which calls' times predict a call with ``n`` candidates: the same session (the
        one-thread session for small calls, else the main one), the same power-of-two
        range of N (``[2^(k-1), 2^k)``) and the same outputs (an ``explain`` call of a
        model with attention also returns ``attention [N, L]``)."""
        return run_key(self.single_thread_max, n, explain and self.has_attention)

    def expected_run_s(self, n: int, explain: bool = False) -> float | None:
        """What a graph call with ``n`` candidates is expected to take, in seconds: the
        exponentially weighted mean time of recent calls of its :meth:`run_key` (warm-up
        included), scaled up in proportion where ``n`` exceeds their mean N (never down);
        ``None`` before the first such call."""
        last = self.run_times.get(self.run_key(n, explain))
        if last is None:
            return None
        took, mean_n = last
        return took * max(1.0, n / mean_n)


def record_run(
    run_times: dict[tuple[bool, int, bool], tuple[float, float]],
    key: tuple[bool, int, bool],
    took: float,
    n: int,
) -> None:
    """Fold a call of ``n`` candidates that took ``took`` seconds into ``run_times[key]``."""
    last = run_times.get(key)
    if last is None:
        run_times[key] = (took, float(n))
    else:  # two calls at once on one key may lose an update: harmless for a mean
        w = RUN_TIME_WEIGHT
        run_times[key] = (last[0] + w * (took - last[0]), last[1] + w * (n - last[1]))


def run_key(single_max: int, n: int, attention: bool) -> tuple[bool, int, bool]:
    """:meth:`LoadedModel.run_key` for a model whose one-thread session takes calls of
    at most ``single_max`` candidates; ``attention``: the call returns the weights too."""
    return n <= single_max, n.bit_length(), attention


def note_native_run(
    run_times: dict[tuple[bool, int, bool], tuple[float, float]],
    single_max: int,
    took: float,
    n: int,
) -> None:
    """A plain native call's time, under :meth:`LoadedModel.run_key`'s key."""
    record_run(run_times, run_key(single_max, n, False), took, n)


def run_outputs(
    runner: Runner, has_attention: bool, feeds: dict[str, np.ndarray], explain: bool
) -> list[np.ndarray]:
    names = ["probs", "attention"] if explain and has_attention else ["probs"]
    return runner.run(feeds, names)


def load_model(settings: Settings, version: str | None = None) -> LoadedModel:
    """Load, check and warm up a bundle. Raises ``BundleError`` / ``ProviderError``."""
    bundle = load_bundle(
        settings.models_dir,
        settings.model_name,
        version or settings.model_version,
        child_min_bytes=settings.manifest_child_bytes,
    )
    so = session_options(settings)
    providers = choose_providers(settings.provider)
    graphs = settings.cuda_graph and CUDA in providers
    model_bytes = bundle.model_path.read_bytes()
    # the bytes served are the bytes checked: the file read again here may have been
    # replaced since load_bundle hashed it (a folder copied over during a reload)
    if hashlib.sha256(model_bytes).hexdigest() != bundle.manifest.get("onnx_sha256"):
        raise BundleError(f"model file {bundle.model_path} changed while it loaded: its "
                          "sha256 no longer matches the manifest")  # fmt: skip
    try:
        session = _session(bundle, model_bytes, so, providers, graphs)
    except BundleError as exc:
        if not graphs:
            raise
        # e.g. a node ORT keeps on the CPU: the graph runs, only without CUDA graphs
        log.warning("CUDA graphs not available for this model, running without: %s", exc)
        graphs = False
        session = _session(bundle, model_bytes, so, providers, graphs)
    provider = session.get_providers()[0]
    if settings.require_gpu and provider != CUDA:
        raise ProviderError(f"CTR_REQUIRE_GPU=1 but the session runs on {provider}")
    graph_in = [i.name for i in session.get_inputs()]
    if graph_in != bundle.input_names:
        raise BundleError(
            f"{bundle.model_path}: graph inputs {graph_in} differ from the manifest's "
            f"{bundle.input_names}"
        )
    check_contract(bundle, session)
    graph, graph_note, served, graph_ops = "standard", "", model_bytes, []
    if fused_wanted(settings.fused_ops, bundle):
        try:
            session, served, graph_ops = fused_session(
                settings, bundle, session, so, providers, graphs
            )
            graph = "fused"
        except FusedError as exc:  # documented: serve the standard graph, say why
            graph_note = str(exc)
            log.warning("fused graph not used, serving model.onnx: %s", exc)
    precision, note = "fp32", ""
    if settings.precision == "fp16":
        keep = native.OPS if graph == "fused" else ()
        try:
            session, served = fp16_session(bundle, session, so, providers, graphs, served, keep)
            precision = "fp16"
        except PrecisionError as exc:  # documented: serve fp32 and say why
            note = str(exc)
            log.warning("fp16 not used, serving fp32: %s", exc)
    weights: list[Weight] = []
    values: list[ort.OrtValue] = []
    shared_note = ""
    if settings.share_weights_min_bytes > 0 and provider == CPU:
        try:
            shared = shared_session(settings, bundle, session, served, graph == "fused")
        except SharingError as exc:  # documented: each session keeps its own copy
            shared_note = str(exc)
            log.warning("weights not shared: %s", exc)
        else:
            if shared is not None:
                session, so, weights, values = shared
    c = bundle.config
    rows = ItemRowCache(
        settings.item_cache_ttl_s, settings.item_cache_size, len(c.item_sparse), len(c.item_dense)
    )
    runner = make_runner(
        settings,
        bundle,
        session,
        provider,
        graphs,
        lambda: _session(bundle, served, so, providers, graphs, values),
    )
    runner = with_single_thread(settings, bundle, runner, session, provider, served, so, values)
    outputs = [o.name for o in session.get_outputs()]
    native_runner, native_note = None, ""
    if not settings.native_runner:  # as user_tracking's why_not names its setting
        native_note = "CTR_NATIVE_RUNNER=false"
    elif provider != CPU:
        native_note = f"CPU only (the session runs on {provider})"
    elif settings.batch_max_users > 1:
        native_note = "micro-batching (CTR_BATCH_MAX_USERS > 1)"
    if settings.native_runner and provider == CPU and settings.batch_max_users <= 1:
        try:
            native_runner = make_native(settings, bundle, runner, served, graph == "fused", weights)
        except NativeRunError as exc:  # documented: the Python runner serves, the log says why
            native_note = str(exc)
            log.warning("native runner not used: %s", exc)
        except Exception as exc:  # ORT's own error types (e.g. an older ORT): the same
            native_note = f"native runner: {exc!r}"
            log.warning("native runner not used: %r", exc)
    model = LoadedModel(
        bundle,
        session,
        provider,
        outputs,
        rows,
        runner,
        precision=precision,
        precision_note=note,
        graph=graph,
        graph_note=graph_note,
        graph_ops=graph_ops,
        users=UserRowCache(settings.user_cache_size),
        native=native_runner,
        native_note=native_note,
        shared_weights=weights,
        shared_note=shared_note,
    )
    if settings.batch_max_users > 1:
        # the batcher must not hold the model: a model <-> batcher cycle outlives a
        # reload once the heap is frozen (service.lifecycle.settle_heap)
        model.batcher = Batcher(
            functools.partial(run_outputs, runner, model.has_attention),
            model.streams or settings.inference_concurrency,
            settings.batch_max_users,
            settings.batch_max_candidates,
            settings.batch_wait_ms / 1000,
        )
    if model.native is not None:
        # the model's expected run times learn from every native call (timed-out ones
        # too); the hook must not hold the model (see the batcher above)
        model.native.on_run = functools.partial(
            note_native_run, model.run_times, model.single_thread_max
        )
    try:
        warm_up(model)
    except Exception as exc:  # ORT raises its own types for shape/type mismatches
        if model.native is not None:
            model.native.close()
        raise BundleError(f"{bundle.model_path}: warm-up run failed: {exc}") from exc
    if model.native is not None:
        try:
            warm_native(model)
        except Exception as exc:  # documented: the Python runner serves, the log says why
            model.native.close()
            model.native, model.native_note = None, f"native warm-up: {exc}"
            log.warning("native runner not used: warm-up failed: %s", exc)
    log.info(
        "model loaded name=%s version=%s provider=%s runner=%s graph=%s precision=%s path=%s",
        model.name,
        model.version,
        provider,
        runner.kind,
        graph,
        precision,
        bundle.path,
    )
    return model


def session_options(settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads:
        so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    # Pool threads that keep spinning after a run burn the core the event loop needs for
    # the next request; never spinning slows the run's own parallel sections. "run" spins
    # inside a run only (measured in docs/benchmarks.md).
    spin = settings.intra_op_spin
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "never" else "1")
    if spin == "run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def _session(
    bundle: Bundle,
    model_bytes: bytes,
    so: ort.SessionOptions,
    providers: list[str],
    graphs: bool,
    keep: Sequence[object] = (),
) -> ort.InferenceSession:
    """A session of ``model_bytes``. ``keep``: what it must hold as long as it lives,
    whoever holds it last (the ORT values of the initializers ``so`` gives it, which
    a call still running on another thread after a model swap reads)."""
    chosen: list[str | tuple[str, dict[str, str]]] = list(providers)
    if CUDA in providers:  # fp32 means fp32: no TF32 matmuls (fp16 is the fast option)
        options = {"use_tf32": "0"}
        if graphs:
            options["enable_cuda_graph"] = "1"
        chosen = [(CUDA, options), CPU]
    # on CUDA, ORT's provider fallback re-reads the graph from its source: keep the bytes
    with graph_source(model_bytes, as_file=CUDA not in providers) as source:
        try:
            session = ort.InferenceSession(source, so, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            said = loaded_from(str(exc), source, str(bundle.model_path))
            raise BundleError(f"ONNX Runtime cannot load {bundle.model_path}: {said}") from exc
        if isinstance(source, str):  # its file is gone once made: no re-read on an EP fault
            session.disable_fallback()
    if keep:
        vars(session)["ctr_keep"] = tuple(keep)
    return session


class SharingError(RuntimeError):
    """The served graph's weights cannot be shared; each session keeps its own copy."""


def shared_session(
    settings: Settings,
    bundle: Bundle,
    session: ort.InferenceSession,
    served: bytes,
    fused: bool,
) -> tuple[ort.InferenceSession, ort.SessionOptions, list[Weight], list[ort.OrtValue]] | None:
    """The served graph's main session again, on CPU, taking its initializers of at
    least ``CTR_SHARE_WEIGHTS_MIN_BYTES`` from one copy read out of ``served``
    (:mod:`service.weights`), with the session options that give them to every later
    session, the weights and the ORT values over them (which must outlive every session
    made from those options). None where the graph has no initializer that large. It
    must score the probe feeds as ``session`` does (within ``FUSED_TOLERANCE``):
    a weight read wrongly would shift every session alike, where no other check
    compares them with the graph's own. Raises :class:`SharingError` otherwise."""
    try:
        weights = large_weights(served, settings.share_weights_min_bytes)
    except Exception as exc:  # ProtoError, or bytes this reader did not foresee
        raise SharingError(f"the served graph's bytes: {exc!r}") from exc
    if not weights:
        return None
    so = session_options(settings)
    try:
        if fused:
            so.register_custom_ops_library(str(native.library(settings.ops_library or None).path))
        values = [ort.OrtValue.ortvalue_from_numpy(w.array) for w in weights]
        for w, v in zip(weights, values, strict=True):
            so.add_initializer(w.name, v)
        shared = _session(bundle, served, so, [CPU], graphs=False, keep=values)
        worst = probe_diff(bundle, session, shared, graphs=False)
    except Exception as exc:  # ORT's own error types, the library's, non-finite output
        raise SharingError(f"a session on shared weights: {exc}") from exc
    if worst > FUSED_TOLERANCE:
        raise SharingError(f"a session on shared weights differs by {worst:.1e}")
    total = sum(w.array.nbytes for w in weights)
    log.info("%d initializers (%.1f MB) shared by the model's sessions", len(weights), total / 1e6)
    return shared, so, weights, values


def fused_wanted(fused_ops: str, bundle: Bundle) -> bool:
    """Whether ``CTR_FUSED_OPS=fused_ops`` asks for ``bundle``'s fused graph. auto:
    whenever the bundle has one (a model with nothing to fuse, or one exported without
    the library, has none); on: always, so that its absence is said in ``graph_note``."""
    has = bundle.fused is not None or bundle.fused_cuda is not None
    return fused_ops == "on" or (fused_ops == "auto" and has)


def fused_ops_of(bundle: Bundle, cuda: bool = False) -> list[str]:
    """The custom ops (``domain.op``) the bundle's fused graph (``cuda``: its CUDA
    variant) uses, from its manifest entry."""
    ops = ((bundle.fused_cuda if cuda else bundle.fused) or {}).get("ops")
    return [str(op) for op in ops] if isinstance(ops, list) else []


def probe_diff(
    bundle: Bundle, ref: ort.InferenceSession, new: ort.InferenceSession, graphs: bool
) -> float:
    """Max |p_new - p_ref| over random valid feeds (one user with 300 candidates, three
    users with 97). Plain runs: on a graph-enabled session they must not be captured.
    Raises ``RuntimeError`` (ORT's own types) if ``new`` fails to run and ``ValueError``
    if it returns non-finite probabilities."""
    a, b = SessionRunner(ref, skip_graph=graphs), SessionRunner(new, skip_graph=graphs)
    return worst_diff(bundle, lambda f: a.run(f, ["probs"])[0], lambda f: b.run(f, ["probs"])[0])


def range_diff(
    bundle: Bundle, ref: ort.InferenceSession, new: ort.InferenceSession, graphs: bool
) -> float:
    """:func:`probe_diff` on feeds whose dense inputs lie at and between their bounds
    (:func:`~service.precision.range_feeds`: three users, 120 candidates)."""
    a, b = SessionRunner(ref, skip_graph=graphs), SessionRunner(new, skip_graph=graphs)
    feeds = range_feeds(bundle, 3, 120, 11)
    expected, actual = a.run(feeds, ["probs"])[0], b.run(feeds, ["probs"])[0]
    if not np.all(np.isfinite(actual)):
        raise ValueError("probabilities are not finite at the dense inputs' bounds")
    return float(np.max(np.abs(actual - expected)))


PROBES = ((1, 300, 0), (3, 97, 1))  # (users, candidates, seed) of the parity checks' feeds


def worst_diff(
    bundle: Bundle,
    want: Callable[[dict[str, np.ndarray]], np.ndarray],
    got: Callable[[dict[str, np.ndarray]], np.ndarray],
    probes: tuple[tuple[int, int, int], ...] = PROBES,
) -> float:
    """Max |got - want| (``probs [N]`` of two runners) over :func:`probe_feeds` of each
    ``(users, N, seed)`` in ``probes``. Raises ``ValueError`` if either runner returns
    non-finite probabilities (a NaN would vanish from the max), and whatever either
    runner raises."""
    worst = 0.0
    for users, n, seed in probes:
        feeds = probe_feeds(bundle, users, n, seed)
        expected, actual = want(feeds), got(feeds)
        if not np.all(np.isfinite(actual)):
            raise ValueError("probabilities are not finite")
        if not np.all(np.isfinite(expected)):
            raise ValueError("the reference's probabilities are not finite")
        worst = max(worst, float(np.max(np.abs(actual - expected))))
    return worst


def fused_session(
    settings: Settings,
    bundle: Bundle,
    ref: ort.InferenceSession,
    so: ort.SessionOptions,
    providers: list[str],
    graphs: bool,
) -> tuple[ort.InferenceSession, bytes, list[str]]:
    """The bundle's fused graph (``model_fused.onnx``; on CUDA its CUDA variant
    ``model_fused_cuda.onnx`` where the bundle has one) with the custom-op library
    registered in ``so``, kept only if it matches the standard graph's session ``ref``
    within ``FUSED_TOLERANCE`` on the serving provider; with its bytes and custom ops. A
    graph with an op that has no CUDA kernel is refused on CUDA. Raises
    :class:`FusedError` otherwise."""
    on_gpu = ref.get_providers()[0] == CUDA
    # the variant made for the provider, else the other one (its gate may have failed)
    cuda_variant = bundle.fused_cuda is not None and (on_gpu or bundle.fused is None)
    try:
        data = bundle.fused_bytes(cuda=cuda_variant)
        lib = native.library(settings.ops_library or None)
    except (BundleError, native.NativeError) as exc:
        raise FusedError(str(exc)) from exc
    except Exception as exc:  # anything else on the way must not stop the service
        raise FusedError(f"custom-op library: {exc!r}") from exc
    # the library, and the level chosen when CTR_OPS_LIBRARY names a prebuilt folder
    where = f"{lib.path} (level {lib.level})" if lib.level else str(lib.path)
    if on_gpu and not lib.cuda:
        raise FusedError(f"{where} has no CUDA kernel (it was built without nvcc)")
    cuda_ops = {f"{native.DOMAIN}.{op}" for op in native.CUDA_OPS}
    ops = fused_ops_of(bundle, cuda_variant)
    cpu_only = sorted(set(ops) - cuda_ops)
    if on_gpu and cpu_only:  # the node would run on the CPU, between copies, uncapturable
        raise FusedError(f"{', '.join(cpu_only)} has no CUDA kernel: that graph is CPU-only")
    if on_gpu and not ops:  # nothing says which ops it holds: it may hold CPU-only ones
        raise FusedError("the manifest does not list the fused graph's custom ops")
    try:
        so.register_custom_ops_library(str(lib.path))
    except Exception as exc:  # ORT's own error types: not a loadable library
        raise FusedError(f"ONNX Runtime cannot load {where}: {exc}") from exc
    try:
        session = _session(bundle, data, so, providers, graphs)
        worst = probe_diff(bundle, ref, session, graphs)
    except Exception as exc:  # ORT's own error types: a graph that fails to load or run
        raise FusedError(f"the fused graph does not run with {where}: {exc}") from exc
    if worst > FUSED_TOLERANCE:
        raise FusedError(f"fused graph parity {worst:.1e} > {FUSED_TOLERANCE:.0e} ({where})")
    log.info("fused graph kept (%s): max |fused - standard| = %.1e", where, worst)
    return session, data, ops


def fp16_session(
    bundle: Bundle,
    fp32: ort.InferenceSession,
    so: ort.SessionOptions,
    providers: list[str],
    graphs: bool,
    fp32_bytes: bytes,
    keep_fp32: tuple[str, ...] = (),
) -> tuple[ort.InferenceSession, bytes]:
    """``fp32_bytes`` converted to fp16 (inputs, outputs and the ops in ``keep_fp32``
    stay fp32), on the same provider, kept only if its probabilities match the fp32
    session's within ``FP16_TOLERANCE`` on random valid inputs; with the fp16 graph's
    bytes; the dense inputs' bounds must lie within fp16 (:func:`dense_problem`) and
    the check's feeds include them. Raises :class:`PrecisionError` otherwise."""
    problem = dense_problem(bundle)
    if problem is not None:
        raise PrecisionError(problem)
    data = fp16_bytes(fp32_bytes, keep_fp32)
    try:
        session = _session(bundle, data, so, providers, graphs)
    except BundleError as exc:
        raise PrecisionError(f"the fp16 graph does not load: {exc}") from exc
    try:
        worst = probe_diff(bundle, fp32, session, graphs)
        worst = max(worst, range_diff(bundle, fp32, session, graphs))
    except ValueError as exc:
        raise PrecisionError(f"fp16 {exc}") from exc
    except Exception as exc:  # ORT's own error types: fp16 kernels that fail to run
        raise PrecisionError(f"the fp16 graph does not run: {exc}") from exc
    if worst > FP16_TOLERANCE:
        raise PrecisionError(f"fp16 parity {worst:.1e} > {FP16_TOLERANCE:.0e}")
    log.info("fp16 graph kept: max |fp16 - fp32| = %.1e", worst)
    return session, data


def make_runner(
    settings: Settings,
    bundle: Bundle,
    session: ort.InferenceSession,
    provider: str,
    graphs: bool,
    another_session: Callable[[], ort.InferenceSession],
) -> Runner:
    """The runner for ``settings``. CUDA graphs are captured here, for every bucket, on
    ``CTR_CUDA_GRAPH_STREAMS`` sessions (``another_session`` makes the extra ones); if
    ORT refuses a capture, the model runs without graphs (said in the log)."""
    on_gpu = provider == CUDA
    if graphs and on_gpu:
        c = bundle.config
        inputs = {i.name: tuple(int(d) for d in i.shape[1:]) for i in graph_inputs(c)}
        outputs = {o.name: tuple(int(d) for d in o.shape[1:]) for o in graph_outputs(c)}
        sessions = [session] + [another_session() for _ in range(settings.cuda_graph_streams - 1)]
        runners = [
            GraphRunner(
                s,
                inputs,
                outputs,
                parse_buckets(settings.cuda_graph_user_buckets),
                parse_buckets(settings.cuda_graph_buckets),
                copy=settings.gpu_copy,
            )
            for s in sessions
        ]
        runner: GraphRunner | GraphPool = runners[0] if len(runners) == 1 else GraphPool(runners)
        try:
            seconds = runner.capture()
            log.info("captured %d CUDA graphs x %d streams in %.1fs", len(runner.slots),
                     len(runners), seconds)  # fmt: skip
            return runner
        except Exception as exc:  # ORT's own error types
            log.warning("CUDA graph capture failed, running without graphs: %s", exc)
            runner.close()
            return SessionRunner(session, skip_graph=True)
    if settings.io_binding:
        return BindingRunner(session, "cuda" if on_gpu else "cpu")
    return SessionRunner(session)


def main_threads(settings: Settings) -> int:
    """Intra-op threads of the main CPU session (``CTR_INTRA_OP_THREADS``, 0: one per
    core, ORT's default)."""
    return settings.intra_op_threads or (os.cpu_count() or 1)


def with_single_thread(
    settings: Settings,
    bundle: Bundle,
    runner: Runner,
    session: ort.InferenceSession,
    provider: str,
    served: bytes,
    so: ort.SessionOptions,
    keep: Sequence[object] = (),
) -> Runner:
    """``runner`` with calls of at most ``CTR_SINGLE_THREAD_MAX_CANDIDATES`` candidates on a
    second session of the served graph with one intra-op thread (:class:`SplitRunner`),
    where that can help: on the CPU provider, when the main session has several threads.
    The second session must match ``session`` within ``FUSED_TOLERANCE`` on the probe
    feeds; if it does not load, run or match, ``runner`` is served alone (said in the
    log). ``so`` (with the custom-op library registered, when the graph is fused) is
    reused with one thread: nothing creates a session from it after this. ``keep``: as
    for :func:`_session`."""
    limit = settings.single_thread_max_candidates
    if limit <= 0 or main_threads(settings) <= 1 or provider != CPU:
        return runner
    if not isinstance(runner, SessionRunner):
        return runner
    so.intra_op_num_threads = 1
    try:
        single = _session(bundle, served, so, [CPU], graphs=False, keep=keep)
        worst = probe_diff(bundle, session, single, graphs=False)
    except Exception as exc:  # ORT's own error types, or non-finite output
        log.warning("no single-thread session for small calls: %s", exc)
        return runner
    if worst > FUSED_TOLERANCE:
        log.warning("no single-thread session for small calls: parity %.1e", worst)
        return runner
    log.info("calls of at most %d candidates run on one intra-op thread", limit)
    return SplitRunner(runner, SessionRunner(single), limit)


def check_contract(bundle: Bundle, session: ort.InferenceSession) -> None:
    """Raises :class:`BundleError` where the graph was exported for another feature spec
    or ID mapping than the manifest's (:func:`ctr.bundle.contract_digest`, in the form
    the graph's key names; a graph exported before any digest was written carries none,
    and is not checked)."""
    meta = session.get_modelmeta().custom_metadata_map
    check_dense_range(bundle, meta)
    key = next((k for k in (CONTRACT_KEY_V2, CONTRACT_KEY) if k in meta), None)
    if key is None:
        log.info("%s carries no contract digest (an older export): not checked",
                 bundle.model_path)  # fmt: skip
        return
    stamped = meta[key]
    have = bundle.contract_v2 if key == CONTRACT_KEY_V2 else None  # the load's, if it made it
    if have is None:
        have = contract_digest(bundle.manifest.get("config"), bundle.manifest.get("mapping"), key)
    if have != stamped:
        raise BundleError(
            f"{bundle.model_path}: the manifest's feature spec and ID mapping are not the "
            f"ones this graph was exported with (digest {have[:12]}…, the graph's "
            f"{stamped[:12]}…): edited after the export?"
        )


def check_dense_range(bundle: Bundle, meta: dict[str, str]) -> None:
    """Raises :class:`BundleError` where the manifest's ``dense_range`` is not the one
    the graph clamps to (stamped at export since session 34: an edited manifest would
    have been shown by ``/v1/models`` and counted by ``ctr_dense_out_of_range_total`` as
    if the graph used it). A graph without the stamp is not checked."""
    stamped = meta.get(DENSE_RANGE_KEY)
    if stamped is None:
        return
    have = bundle.manifest.get("dense_range") or {}
    try:
        same = json.loads(stamped) == have
    except ValueError:
        same = False
    if not same:
        raise BundleError(
            f"{bundle.model_path}: the manifest's dense_range {dense_range_text(have)[:200]} "
            f"is not the range this graph clamps to ({stamped[:200]}): edited after the "
            "export?"
        )


def warm_up(model: LoadedModel) -> None:
    """Run the graph at a few batch sizes so first requests do not pay for allocation,
    and check what it returns: a probability in [0, 1] per candidate (and, where the
    graph has them, attention weights of one row per candidate). A graph that answers
    otherwise would fail or mis-rank every request: it does not load (ValueError)."""
    for n in (1, 64, 512):
        check_outputs(model.run(probe_feeds(model.bundle, 1, n, n), explain=False), n, False)
    if model.has_attention:
        check_outputs(model.run(probe_feeds(model.bundle, 1, 64, 64), explain=True), 64, True)


def check_outputs(outs: Sequence[np.ndarray], n: int, explain: bool) -> None:
    """Raises ValueError unless ``outs[0]`` is ``[n]`` probabilities, all finite and in
    [0, 1], and (``explain``) ``outs[1]`` is ``[n, L]`` finite weights."""
    probs = np.asarray(outs[0])
    if probs.shape != (n,):
        raise ValueError(f"the graph returned probabilities of shape {probs.shape} for {n} "
                         f"candidates, not ({n},)")  # fmt: skip
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("the graph returned scores that are not probabilities in [0, 1] "
                         f"(min {probs.min()}, max {probs.max()})")  # fmt: skip
    if explain:
        att = np.asarray(outs[1]) if len(outs) > 1 else None
        if att is None or att.ndim != 2 or att.shape[0] != n or not np.isfinite(att).all():
            shape = None if att is None else att.shape
            raise ValueError(f"the graph returned attention weights of shape {shape} for {n} "
                             "candidates, not one finite row per candidate")  # fmt: skip


def warm_native(model: LoadedModel) -> None:
    """:func:`warm_up` for the native runner's sessions."""
    assert model.native is not None
    for n in (1, 64, 512):
        model.native.run_now(probe_feeds(model.bundle, 1, n, n))


def native_parity(bundle: Bundle, runner: Runner, made: NativeRunner) -> float:
    """:func:`worst_diff` of ``made`` against ``runner``, every native session included
    (a small call for the one-thread session)."""
    small = ((2, min(made.single_max, 17), 2),) if made.single_max else ()

    def want(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return run_outputs(runner, False, feeds, False)[0]

    worst = worst_diff(bundle, want, made.run_now, PROBES + small)
    if made.parallel > 1:  # the one-thread session also takes larger calls then
        worst = max(worst, worst_diff(bundle, want, functools.partial(made.run_now, session=1)))
    return worst


def make_native(
    settings: Settings,
    bundle: Bundle,
    runner: Runner,
    served: bytes,
    fused: bool,
    weights: Sequence[Weight] = (),
) -> NativeRunner:
    """A :class:`~service.nativerun.NativeRunner` with the sessions ``runner`` has (the
    main one and, for a :class:`SplitRunner`, the one-thread one for small calls) on the
    graph ``served``, kept only if every session matches ``runner`` within
    ``FUSED_TOLERANCE`` on the probe feeds. Raises :class:`NativeRunError` otherwise."""
    if runner.kind != "session":
        raise NativeRunError(f"the {runner.kind} runner has no native counterpart")
    try:
        lib = native.library(settings.ops_library or None)
    except native.NativeError as exc:
        raise NativeRunError(f"custom-op library: {exc}") from exc
    ops = str(lib.path) if fused else None
    specs = [SessionSpec(served, settings.intra_op_threads, ops)]
    single = runner.max_candidates if isinstance(runner, SplitRunner) else 0
    if single:
        specs.append(SessionSpec(served, 1, ops))
    # larger calls side by side on the one-thread session under load: only where that
    # many one-thread calls replace the main session's threads (on more cores, one call
    # on all of them has not been measured against them)
    parallel = settings.native_parallel_calls
    if not single or main_threads(settings) > parallel:
        parallel = 1
    made = NativeRunner(
        str(lib.path),
        bundle.input_names,
        specs,
        settings.intra_op_spin,
        settings.inference_concurrency,
        single,
        parallel=parallel,
        weights=weights,
    )
    try:
        worst = native_parity(bundle, runner, made)
    except NativeRunError:
        made.close()
        raise
    except Exception as exc:  # ORT's own error types, from the Python session
        made.close()
        raise NativeRunError(f"parity check: {exc!r}") from exc
    if worst > FUSED_TOLERANCE:
        made.close()
        raise NativeRunError(f"native runner parity {worst:.1e} > {FUSED_TOLERANCE:.0e}")
    log.info("graph calls on native threads (%d session(s)): max |native - python| = %.1e",
             len(specs), worst)  # fmt: skip
    return made
