"""The project's ONNX Runtime custom-op library (``native/``): build it, find it.

It holds one op, ``ctr_ops.AttentionalGRU``: DIEN's AUGRU recurrence fused into one
kernel (see ``native/augru.h``). The CPU kernel is always built (a C++17 compiler); the
CUDA kernel too where ``nvcc`` is found and ORT has the CUDA provider. The library goes
to a cache folder named after a hash of the sources, the build commands, the tools'
versions and (for ``-march=native``) the CPU's flags, so any change builds a new one.
Before a library is handed out, a child process loads it and runs its CPU kernel once,
so one that would crash this process is refused with :class:`NativeError`. Torch-free:
the exporter's parity gate and the service both use it; results are kept per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ctr.native")

SOURCE_DIR = Path(__file__).resolve().parent.parent / "native"
SOURCES = ("augru.h", "ctr_ops.cc", "augru_cuda.cu", "third_party/onnxruntime/onnxruntime_c_api.h")
DOMAIN = "ctr_ops"
OP = "AttentionalGRU"
MAX_HIDDEN = 64  # native/augru.h kMaxHidden
LIB_NAME = "libctr_ops.so"


class NativeError(RuntimeError):
    """The custom-op library could not be built or loaded; the message says why."""


@dataclass(frozen=True)
class OpsLibrary:
    path: Path
    cuda: bool  # the CUDA kernel is compiled in


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
        res = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise NativeError(f"cannot run {tool}: {exc}") from exc
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


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:  # the compiler named by $CXX does not exist or cannot run
        raise NativeError(f"build step failed: {' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        raise NativeError(f"build step failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), or the machine type where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(cuda: bool | None = None, out_dir: Path | None = None) -> OpsLibrary:
    """Build (or reuse) the library. ``cuda=None``: with the CUDA kernel when nvcc is
    found and ORT has the CUDA provider.

    A cached build is reused only if its recorded sha256 matches (a truncated or altered
    file is rebuilt, never loaded). Raises :class:`NativeError` when the sources or a
    compiler are missing, a build step fails or the cache folder cannot be written."""
    missing = [name for name in SOURCES if not (SOURCE_DIR / name).is_file()]
    if missing:  # e.g. an image that copied ctr/ but not native/
        raise NativeError(f"custom-op sources missing under {SOURCE_DIR}: {', '.join(missing)}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise NativeError("no C++ compiler (g++ or $CXX) to build the custom-op library")
    nvcc = find_nvcc()
    if cuda is None:  # the CUDA kernel only where ORT can run it: nvcc alone is no GPU
        cuda = nvcc is not None and _ort_has_cuda()
    if cuda and nvcc is None:
        raise NativeError("the CUDA kernel was asked for, but nvcc was not found")
    # the CPU kernel's loops vectorise across candidates: the build machine's vector
    # width by default (the library is built where it runs); e.g. -march=x86-64-v3 for
    # an image built on one machine and run on others
    cpu_arch = os.environ.get("CTR_OPS_CXX_ARCH", "-march=native").split()
    inc = ["-I", str(SOURCE_DIR), "-I", str(SOURCE_DIR / "third_party" / "onnxruntime")]
    defs = ["-DCTR_OPS_CUDA"] if cuda else []
    commands = [
        [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast",
         *cpu_arch, *defs, *inc, "-c", str(SOURCE_DIR / "ctr_ops.cc"), "-o", "ctr_ops.o"],
    ]  # fmt: skip
    objs, link_extra, tools = ["ctr_ops.o"], [], [cxx]
    if cuda:
        assert nvcc is not None
        # native: this machine's GPU (the library is built where it runs, at first use);
        # -arch=all-major for an image built without a GPU (minutes, not seconds)
        arch = os.environ.get("CTR_OPS_CUDA_ARCH", "-arch=native").split()
        commands.append(
            [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", *arch,
             *defs, *inc, "-c", str(SOURCE_DIR / "augru_cuda.cu"), "-o", "augru_cuda.o"]
        )  # fmt: skip
        objs.append("augru_cuda.o")
        tools.append(nvcc)
        # static CUDA runtime: the library never binds to whichever libcudart.so.13 the
        # process loaded first (ORT's, torch's and the toolkit's can differ)
        cudart = _cudart_dir(nvcc)
        link_extra = [f"-L{cudart}", "-l:libcudart_static.a", "-ldl", "-lpthread", "-lrt"]
    commands.append([cxx, "-shared", "-o", LIB_NAME, *objs, *link_extra,
                     "-static-libstdc++", "-static-libgcc"])  # fmt: skip
    # -march=native compiles for this CPU: a cache shared with another machine must not
    # hand it a library with instructions it lacks, so the CPU's flags join the key
    host = [_cpu_flags()] if "native" in " ".join(cpu_arch) else []
    target = (out_dir or cache_dir()) / _digest([*commands, host], tools)
    lib, stamp = target / LIB_NAME, target / (LIB_NAME + ".sha256")
    try:
        if lib.is_file() and stamp.is_file() and stamp.read_text().strip() == _file_sha256(lib):
            return describe(lib)
        target.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    except OSError as exc:
        raise NativeError(f"custom-op cache {target} is not usable: {exc}") from exc
    try:
        for cmd in commands:
            _run(cmd, work)
        built = work / LIB_NAME
        with built.open("rb") as f:
            os.fsync(f.fileno())
        digest = _file_sha256(built)
        # the library first, then its stamp: a reader trusts the pair only when they agree
        os.replace(built, lib)
        (work / "stamp").write_text(digest + "\n")
        os.replace(work / "stamp", stamp)
    except OSError as exc:
        raise NativeError(f"custom-op build in {target} failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built %s (cuda=%s)", lib, cuda)
    return describe(lib)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
print(int(lib.CtrOpsSelfTest()), int(lib.CtrOpsHasCuda()))
"""


def describe(path: Path) -> OpsLibrary:
    """Load the library in a child process, run its CPU kernel once there and ask
    whether its CUDA kernel is compiled in. A library that would crash the caller (built
    for instructions this CPU lacks, truncated, not ours) raises :class:`NativeError`
    instead; only then is it safe to load here."""
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
    """The library at ``path`` (``CTR_OPS_LIBRARY``) or the cached build of the sources,
    built now if missing. The answer is kept for this process, per path, build settings
    and source versions, so the compiler checks and the child-process load run once.
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
        if path:
            if not Path(path).is_file():
                raise NativeError(f"custom-op library {path} does not exist")
            _known[key] = describe(Path(path))
        else:
            _known[key] = build()
    found = _known[key]
    if not found.path.is_file():  # removed since: look again
        del _known[key]
        return library(path)
    return found
