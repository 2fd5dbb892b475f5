"""The project's ONNX Runtime custom-op library (``native/``): build it, find it.

It holds two ops. ``ctr_ops.AttentionalGRU`` is DIEN's AUGRU recurrence fused into one
kernel (``native/augru.h``), for the CPU and CUDA; ``ctr_ops.DinAttention`` is the DIN
activation unit with its pooling (``native/din_attention.h``), for the CPU only. Beside
them, plain C functions the service calls through ctypes for the scoring request's JSON
(``native/codec.cc``, ``service.codec``). The CPU
kernels are always built (a C++17 compiler); the CUDA kernel too where ``nvcc`` is found
and ORT has the CUDA provider. The library goes
to a cache folder named after a hash of the sources, the build commands, the tools'
versions and (for ``-march=native``) the CPU's flags, so any change builds a new one.
Before a library is handed out, a child process loads it and runs its CPU kernel once,
so one that would crash this process is refused with :class:`NativeError`. Torch-free:
the exporter's parity gate and the service both use it; results are kept per process.

Prebuilt, portable libraries (an image built on one machine and run on others):
:func:`build_levels` builds one library per x86-64 micro-architecture level into
``DIR/<level>/libctr_ops.so`` (+ ``.sha256``), and :func:`select` picks, at load, the
highest level whose instructions this CPU has (from /proc/cpuinfo), never loading one
it lacks the flags for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ctr.native")

SOURCE_DIR = Path(__file__).resolve().parent.parent / "native"
SOURCES = (
    "augru.h", "ctr_ops.cc", "augru_cuda.cu", "din_attention.h", "din_attention.cc", "simd.h",
    "codec.cc", "runner.cc", "third_party/onnxruntime/onnxruntime_c_api.h",
)  # fmt: skip
DOMAIN = "ctr_ops"
OP = "AttentionalGRU"
MAX_HIDDEN = 64  # native/augru.h kMaxHidden
DIN_OP = "DinAttention"  # CPU kernel only
DIN_MAX_WIDTH, DIN_MAX_LAYERS, DIN_MAX_DIM = 256, 8, 256  # native/din_attention.h
DIN_ACTS = {"sigmoid": 0, "dice": 1, "prelu": 2}  # native/din_attention.h DinAct
OPS = (OP, DIN_OP)
CUDA_OPS = frozenset({OP})  # the ops with a CUDA kernel in a CUDA build
LIB_NAME = "libctr_ops.so"


class NativeError(RuntimeError):
    """The custom-op library could not be built or loaded; the message says why."""


# Portable builds, highest first: -march=<level> (generic: no -march flag, the
# compiler's default target). The CPU flags each x86-64 level needs, as /proc/cpuinfo
# spells them (abm is LZCNT); every level includes the ones below it.
_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
LEVEL_FLAGS: dict[str, frozenset[str]] = {
    "x86-64-v4": _V4,
    "x86-64-v3": _V3,
    "x86-64-v2": _V2,
    "generic": frozenset(),
}
LEVELS = tuple(LEVEL_FLAGS)  # highest first


@dataclass(frozen=True)
class OpsLibrary:
    path: Path
    cuda: bool  # the CUDA kernel is compiled in
    level: str = ""  # the level folder it was chosen from (CTR_OPS_LIBRARY=DIR), if any


def cache_dir() -> Path:
    """``$CTR_OPS_CACHE`` or ``~/.cache/ctr-ops``."""
    env = os.environ.get("CTR_OPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ctr-ops"


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cudart_dir(nvcc: str) -> Path:
    """The folder with libcudart_static.a next to ``nvcc`` (or under $CUDA_HOME)."""
    homes = [
        os.environ.get("CUDA_HOME"),
        str(Path(nvcc).resolve().parent.parent),
        "/usr/local/cuda",
    ]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return Path(home) / sub
    raise NativeError(f"libcudart_static.a not found next to {nvcc}; set CUDA_HOME")


def _version(tool: str) -> str:
    """The tool's ``--version`` output, part of the cache key (an upgrade rebuilds)."""
    try:
        res = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False,
                             timeout=60)  # fmt: skip
    except OSError as exc:
        raise NativeError(f"cannot run {tool}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NativeError(f"{tool} --version hung, stopped after {exc.timeout:.0f} s") from exc
    return res.stdout.strip()


def _digest(commands: list[list[str]], tools: list[str]) -> str:
    """Sources, every build command (flags included) and the tools' versions."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    for cmd in commands:
        h.update("\0".join(cmd).encode())
    for tool in tools:
        h.update(_version(tool).encode())
    return h.hexdigest()[:16]


# a build step that takes longer is hung (nvcc -arch=all-major takes minutes, not this)
BUILD_STEP_TIMEOUT_S = 1800


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                             timeout=BUILD_STEP_TIMEOUT_S)  # fmt: skip
    except OSError as exc:  # the compiler named by $CXX does not exist or cannot run
        raise NativeError(f"build step failed: {' '.join(cmd)}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NativeError(f"build step hung, stopped after {exc.timeout:.0f} s: "
                          f"{' '.join(cmd)}") from exc  # fmt: skip
    if res.returncode != 0:
        raise NativeError(f"build step failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")


def _host_key(cpu_arch: list[str], cuda_arch: list[str]) -> list[str]:
    """What of this machine a build's cache key must hold: ``-march=native`` compiles for
    this CPU and ``-arch=native`` for this GPU, so a cache shared with another machine
    must not hand it a library with instructions (or no kernel image) it lacks."""
    host = [_cpu_flags()] if "native" in " ".join(cpu_arch) else []
    if "-arch=native" in cuda_arch:
        host.append(_gpu_arch())
    return host


def _gpu_arch() -> str:
    """The compute capabilities of this machine's GPUs (``nvidia-smi``), which
    ``-arch=native`` compiles for; empty where none answers (nvcc's default then)."""
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return "gpu " + " ".join(res.stdout.split()) if res.returncode == 0 else ""


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), or the machine type where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where it has none)."""
    line = _cpu_flags()
    return frozenset(line.partition(":")[2].split()) if ":" in line else frozenset()


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def missing_flags(level: str, flags: Iterable[str] | None = None) -> list[str]:
    """The CPU flags ``level`` needs that ``flags`` (default: this CPU's) lacks; empty
    when a library built for it can run here. ``generic`` needs none."""
    if level not in LEVEL_FLAGS:
        raise NativeError(f"unknown level {level!r} (known: {', '.join(LEVELS)})")
    have = cpu_flags() if flags is None else frozenset(flags)
    if flags is None and LEVEL_FLAGS[level] and not _x86_64():
        return [f"x86-64 (this machine is {platform.machine()})"]
    return sorted(LEVEL_FLAGS[level] - have)


def supported_levels(flags: Iterable[str] | None = None) -> list[str]:
    """The levels a library may be built for and run here, highest first."""
    have = None if flags is None else frozenset(flags)
    return [level for level in LEVELS if not missing_flags(level, have)]


def _arch_flags(arch: str | None) -> list[str]:
    """The compiler's CPU flags: ``arch`` a level, ``native`` or ``generic``; None:
    ``$CTR_OPS_CXX_ARCH`` (flags as written) or ``-march=native``."""
    if arch is None:
        return os.environ.get("CTR_OPS_CXX_ARCH", "-march=native").split()
    if arch == "generic":
        return []
    if arch != "native" and arch not in LEVEL_FLAGS:
        raise NativeError(f"unknown level {arch!r} (known: native, {', '.join(LEVELS)})")
    return [f"-march={arch}"]


def _check_arch(cxx: str, arch_flags: list[str]) -> None:
    """Fail early, with the compiler's own words, when it rejects the -march flag (an
    x86-64 level on another machine type, or a compiler too old for x86-64-v4)."""
    if not arch_flags:
        return
    cmd = [cxx, *arch_flags, "-fsyntax-only", "-x", "c++", os.devnull]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise NativeError(f"cannot run {cxx}: {exc}") from exc
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[0]
        raise NativeError(f"{cxx} rejects {' '.join(arch_flags)}: {first}")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(
    cuda: bool | None = None, out_dir: Path | None = None, arch: str | None = None
) -> OpsLibrary:
    """Build (or reuse) the library. ``cuda=None``: with the CUDA kernel when nvcc is
    found and ORT has the CUDA provider, and without it (a warning says why) when that
    build fails, e.g. nvcc rejects the host compiler: the CPU kernels must not be lost
    with it. ``arch``: ``native``, a level of ``LEVELS``
    (``-march=<level>``; ``generic``: no -march flag) or None (``$CTR_OPS_CXX_ARCH``,
    default ``-march=native``).

    A cached build is reused only if its recorded sha256 matches (a truncated or altered
    file is rebuilt, never loaded). The self-test runs in a child process, except for a
    level this CPU lacks the flags for (built, never loaded here). Raises
    :class:`NativeError` when the sources or a compiler are missing, the compiler rejects
    ``arch``, a build step fails or the cache folder cannot be written."""
    # the CUDA kernel only where ORT can run it: nvcc alone is no GPU
    if cuda is None and find_nvcc() is not None and _ort_has_cuda():
        try:
            return _build(True, out_dir, arch)
        except NativeError as exc:
            log.warning("custom ops: the build with the CUDA kernel failed (%s); trying "
                        "without it", exc)  # fmt: skip
            return _build(False, out_dir, arch)
    return _build(bool(cuda), out_dir, arch)


def _build(cuda: bool, out_dir: Path | None, arch: str | None) -> OpsLibrary:
    missing = [name for name in SOURCES if not (SOURCE_DIR / name).is_file()]
    if missing:  # e.g. an image that copied ctr/ but not native/
        raise NativeError(f"custom-op sources missing under {SOURCE_DIR}: {', '.join(missing)}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise NativeError("no C++ compiler (g++ or $CXX) to build the custom-op library")
    nvcc = find_nvcc()
    if cuda and nvcc is None:
        raise NativeError("the CUDA kernel was asked for, but nvcc was not found")
    # the CPU kernel's loops vectorise across candidates: the build machine's vector
    # width by default (the library is built where it runs); a level (build_levels) for
    # an image built on one machine and run on others
    cpu_arch = _arch_flags(arch)
    if arch is not None:
        _check_arch(cxx, cpu_arch)
    inc = ["-I", str(SOURCE_DIR), "-I", str(SOURCE_DIR / "third_party" / "onnxruntime")]
    defs = ["-DCTR_OPS_CUDA"] if cuda else []
    commands = [
        [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast",
         *cpu_arch, *defs, *inc, "-c", str(SOURCE_DIR / "ctr_ops.cc"), "-o", "ctr_ops.o"],
        [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast",
         *cpu_arch, *inc, "-c", str(SOURCE_DIR / "din_attention.cc"), "-o", "din_attention.o"],
        [cxx, "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", *cpu_arch, "-c",
         str(SOURCE_DIR / "codec.cc"), "-o", "codec.o"],
        [cxx, "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", *cpu_arch, *inc,
         "-c", str(SOURCE_DIR / "runner.cc"), "-o", "runner.o"],
    ]  # fmt: skip
    objs, link_extra = ["ctr_ops.o", "din_attention.o", "codec.o", "runner.o"], ["-pthread"]
    tools = [cxx]
    cuda_arch: list[str] = []
    if cuda:
        assert nvcc is not None
        # native: this machine's GPU (the library is built where it runs, at first use);
        # -arch=all-major for an image built without a GPU (minutes, not seconds)
        cuda_arch = os.environ.get("CTR_OPS_CUDA_ARCH", "-arch=native").split()
        commands.append(
            [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", *cuda_arch,
             *defs, *inc, "-c", str(SOURCE_DIR / "augru_cuda.cu"), "-o", "augru_cuda.o"]
        )  # fmt: skip
        objs.append("augru_cuda.o")
        tools.append(nvcc)
        # static CUDA runtime: the library never binds to whichever libcudart.so.13 the
        # process loaded first (ORT's, torch's and the toolkit's can differ)
        cudart = _cudart_dir(nvcc)
        link_extra += [f"-L{cudart}", "-l:libcudart_static.a", "-ldl", "-lpthread", "-lrt"]
    commands.append([cxx, "-shared", "-o", LIB_NAME, *objs, *link_extra,
                     "-static-libstdc++", "-static-libgcc"])  # fmt: skip
    host = _host_key(cpu_arch, cuda_arch)
    target = (out_dir or cache_dir()) / _digest([*commands, host], tools)
    lib, stamp = target / LIB_NAME, target / (LIB_NAME + ".sha256")
    lacks = missing_flags(arch) if arch in LEVEL_FLAGS else []

    def checked() -> OpsLibrary:
        if lacks:  # e.g. x86-64-v4 built on a CPU without AVX-512: never loaded here
            log.info("%s built for %s, not self-tested: this CPU lacks %s", lib, arch,
                     " ".join(lacks))  # fmt: skip
            return OpsLibrary(lib, bool(cuda))
        return describe(lib)

    try:
        if lib.is_file() and stamp.is_file() and stamp.read_text().strip() == _file_sha256(lib):
            _refuse_untrusted(lib)
            return checked()
        for folder in (target.parent, target):  # this user's only, whatever the umask
            if not folder.exists():
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o700)
        why = _untrusted(target / LIB_NAME)  # a folder made by someone else: not built in
        if why:
            raise NativeError(f"custom-op cache {target} not used: {why}")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    except OSError as exc:
        raise NativeError(f"custom-op cache {target} is not usable: {exc}") from exc
    try:
        for cmd in commands:
            _run(cmd, work)
        built = work / LIB_NAME
        with built.open("rb") as f:
            os.fsync(f.fileno())
        built.chmod(0o755)  # whatever the umask
        digest = _file_sha256(built)
        # the library first, then its stamp: a reader trusts the pair only when they agree
        os.replace(built, lib)
        (work / "stamp").write_text(digest + "\n")
        os.replace(work / "stamp", stamp)
    except OSError as exc:
        raise NativeError(f"custom-op build in {target} failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # only while empty: a failed build's (it
            target.rmdir()  # stayed for good); a built one, or a peer's, holds its library
    log.info("built %s (cuda=%s, %s)", lib, cuda, " ".join(cpu_arch) or "no -march flag")
    _refuse_untrusted(lib)  # the folder could have changed hands while it was built
    return checked()


def _untrusted(lib: Path) -> str:
    """Why ``lib`` must not be loaded for who wrote it: the file, its folder or that
    folder's parent is owned by another user than this one or root, or writable by its
    group or by anyone (another local user could put a library there that runs in this
    process); empty when none is. A missing path is left to the caller."""
    uid = os.geteuid()
    for path in (lib, lib.parent, lib.parent.parent):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid not in (uid, 0):
            return f"{path} belongs to uid {st.st_uid}, not this user ({uid}) or root"
        if st.st_mode & 0o022 and not (path.is_dir() and st.st_mode & stat.S_ISVTX):
            return f"{path} is writable by its group or others (mode {st.st_mode & 0o777:o})"
    return ""


def _refuse_untrusted(lib: Path) -> None:
    """:class:`NativeError` where :func:`_untrusted` names a reason not to load ``lib``."""
    why = _untrusted(lib)
    if why:
        raise NativeError(f"custom-op library {lib} not loaded: {why}")


def _stamp_ok(lib: Path) -> str:
    """Why ``lib``'s sha256 stamp (``libctr_ops.so.sha256``, the digest first; the
    output of ``sha256sum`` works too) does not vouch for it; empty when it does."""
    stamp = lib.with_name(LIB_NAME + ".sha256")
    try:
        recorded = stamp.read_text().split()[:1]
        actual = _file_sha256(lib)
    except OSError as exc:
        return f"no readable sha256 stamp ({exc.strerror}: {stamp})"
    if recorded != [actual]:
        return f"sha256 {actual[:12]}... does not match its stamp {stamp} (damaged or replaced)"
    return ""


def build_levels(
    levels: Iterable[str], out: Path, cuda: bool | None = False
) -> list[tuple[str, OpsLibrary]]:
    """Build each level (:func:`build`, through the cache) and install it as
    ``out/<level>/libctr_ops.so`` with its sha256 stamp, the layout :func:`select`
    reads. Levels this CPU cannot run are built but not self-tested. Raises
    :class:`NativeError` on the first level that fails (an unknown level, one the
    compiler rejects, a failed build, an unwritable ``out``)."""
    done = []
    for level in levels:
        if level not in LEVEL_FLAGS:
            why = (
                "builds for this CPU only, so it has no place in a prebuilt folder"
                if level == "native"
                else "unknown level"
            )
            raise NativeError(f"{level!r}: {why} (levels: {', '.join(LEVELS)})")
        built = build(cuda=cuda, arch=level)
        dest = out / level
        lib = dest / LIB_NAME
        try:
            dest.mkdir(parents=True, exist_ok=True)
            dest.chmod(0o755)  # whatever the umask: select() refuses a group-writable one
            tmp = dest / f".{LIB_NAME}.tmp"
            shutil.copyfile(built.path, tmp)
            tmp.chmod(0o755)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, lib)
            (dest / ".stamp.tmp").write_text(_file_sha256(lib) + "\n")
            (dest / ".stamp.tmp").chmod(0o644)
            os.replace(dest / ".stamp.tmp", dest / (LIB_NAME + ".sha256"))
        except OSError as exc:
            raise NativeError(f"cannot install {level} into {dest}: {exc}") from exc
        done.append((level, OpsLibrary(lib, built.cuda, level)))
    return done


def select(directory: Path, flags: Iterable[str] | None = None) -> OpsLibrary:
    """The best library in a prebuilt folder (``DIR/<level>/libctr_ops.so``, as
    :func:`build_levels` writes it) for this CPU: levels highest first; one whose CPU
    flags ``flags`` (default: this CPU's, from /proc/cpuinfo) lacks is skipped without
    being loaded, even in a child process; one whose stamp does not match or whose
    self-test (:func:`describe`) fails is skipped for the next. Raises
    :class:`NativeError` naming each level tried and why when none is usable."""
    have = None if flags is None else frozenset(flags)
    try:
        present = sorted(p.name for p in directory.iterdir() if (p / LIB_NAME).is_file())
    except OSError as exc:
        raise NativeError(f"custom-op library folder {directory}: {exc.strerror}") from exc
    if not present:
        raise NativeError(
            f"custom-op library folder {directory} holds no <level>/{LIB_NAME} "
            f"(levels: {', '.join(LEVELS)}; `ctr build-ops --arch ... --out DIR` makes them)"
        )
    tried, failed = [], False  # failed: a level this CPU can run did not load
    for level in (lv for lv in LEVELS if lv in present):
        lib = directory / level / LIB_NAME
        lacks = missing_flags(level, have)
        why = (
            f"skipped, not loaded: this CPU lacks {' '.join(lacks)}"
            if lacks
            else _untrusted(lib) or _stamp_ok(lib)
        )
        if not why:
            try:
                found = describe(lib)
            except NativeError as exc:
                why = str(exc)
            else:
                after = f" after {'; '.join(tried)}" if tried else ""
                # a level that should have loaded and did not is worth a warning; one
                # for instructions this CPU lacks is routine
                log.log(logging.WARNING if failed else logging.INFO,
                        "custom-op library: level %s chosen (%s)%s", level, lib, after)  # fmt: skip
                return OpsLibrary(found.path, found.cuda, level)
        failed = failed or not lacks
        tried.append(f"{level}: {why}")
    unknown = [name for name in present if name not in LEVEL_FLAGS]
    if unknown:
        tried.append(f"not a known level, ignored: {', '.join(unknown)}")
    raise NativeError(f"no usable custom-op library in {directory}: " + "; ".join(tried))


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
answer = (int(lib.CtrOpsSelfTest()), int(lib.CtrOpsHasCuda()))
try:  # where ORT is installed (not in an image's build-only stage): its own registration
    import onnxruntime as ort
except ImportError:
    ort = None
if ort is not None:
    ort.SessionOptions().register_custom_ops_library(sys.argv[1])
print(*answer)
"""


def describe(path: Path) -> OpsLibrary:
    """Load the library in a child process, run its CPU kernel once there, ask whether
    its CUDA kernel is compiled in, and register it with ONNX Runtime there as a session
    would (where ORT is installed). A library that would crash the caller or fail to
    register (built for instructions this CPU lacks, truncated, not ours, built for
    another ORT) raises :class:`NativeError` instead; only then is it safe to load here."""
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeError(f"cannot check {path}: {exc}") from exc
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1:] or [f"exit status {res.returncode}"]
        if res.returncode < 0:
            why = [f"killed by signal {-res.returncode} (a CPU without the instructions it "
                   "was built for, or a damaged file)"]  # fmt: skip
        raise NativeError(f"{path} is not a usable custom-op library: {why[0]}")
    answer = res.stdout.split()
    if answer[:1] != ["1"] or len(answer) != 2:
        raise NativeError(f"{path}: its CPU kernel's self-test failed ({res.stdout!r})")
    return OpsLibrary(path, answer[1] == "1")


_known: dict[tuple[str, ...], OpsLibrary] = {}


def library(path: str | None = None) -> OpsLibrary:
    """The library at ``path`` (``CTR_OPS_LIBRARY``: a library file, or a folder of
    prebuilt levels, see :func:`select`) or the cached build of the sources, built now
    if missing. The answer is kept for this process, per path, build settings and
    source versions, so the compiler checks and the child-process loads run once.
    Raises :class:`NativeError`."""
    env = ("CXX", "CTR_OPS_CACHE", "CTR_OPS_CXX_ARCH", "CTR_OPS_CUDA_ARCH", "CUDA_HOME", "PATH")
    stamps = []
    for name in SOURCES:
        try:
            stamps.append(str((SOURCE_DIR / name).stat().st_mtime_ns))
        except OSError:
            stamps.append("missing")
    key = (path or "", *(os.environ.get(k, "") for k in env), *stamps)
    if key not in _known:
        if path and Path(path).is_dir():
            _known[key] = select(Path(path))
        elif path:
            if not Path(path).is_file():
                raise NativeError(f"custom-op library {path} does not exist")
            _refuse_untrusted(Path(path))
            _known[key] = describe(Path(path))
        else:
            _known[key] = build()
    found = _known[key]
    if not found.path.is_file():  # removed since: look again
        del _known[key]
        return library(path)
    return found
