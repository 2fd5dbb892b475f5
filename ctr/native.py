"""The project's ONNX Runtime custom-op library (``native/``): build it, find it.

It holds one op, ``ctr_ops.AttentionalGRU``: DIEN's AUGRU recurrence fused into one
kernel (see ``native/augru.h``). The CPU kernel is always built (a C++17 compiler);
the CUDA kernel too when ``nvcc`` is found (``$CUDA_HOME/bin`` or PATH). The library
goes to a cache folder named after a hash of the sources and the build flags, so a
changed source builds a new library and an unchanged one is reused. Torch-free: the
exporter's parity gate and the service both use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
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


def _digest(cuda: bool, cxx: str, nvcc: str | None, arch: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(f"cuda={cuda} cxx={cxx} nvcc={nvcc} arch={arch}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:  # the compiler named by $CXX does not exist or cannot run
        raise NativeError(f"build step failed: {' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        raise NativeError(f"build step failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")


def build(cuda: bool | None = None, out_dir: Path | None = None) -> OpsLibrary:
    """Build (or reuse) the library. ``cuda=None``: with the CUDA kernel if nvcc exists.

    Raises :class:`NativeError` when no compiler is found or a build step fails."""
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
    # all-major: every current GPU generation, for images built without a GPU (slower)
    arch = os.environ.get("CTR_OPS_CUDA_ARCH", "-arch=all-major") if cuda else ""
    # the CPU kernel's loops vectorise across candidates: the build machine's vector
    # width by default (the library is built where it runs); e.g. -march=x86-64-v3 for
    # an image built on one machine and run on others
    cpu_arch = os.environ.get("CTR_OPS_CXX_ARCH", "-march=native")
    key = _digest(cuda, cxx, nvcc if cuda else None, f"{arch} {cpu_arch}")
    target = (out_dir or cache_dir()) / key
    lib = target / LIB_NAME
    if lib.is_file():
        return OpsLibrary(lib, cuda)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        inc = ["-I", str(SOURCE_DIR), "-I", str(SOURCE_DIR / "third_party" / "onnxruntime")]
        flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast",
                 *cpu_arch.split()]  # fmt: skip
        objs = ["ctr_ops.o"]
        defs = ["-DCTR_OPS_CUDA"] if cuda else []
        _run(
            [cxx, *flags, *defs, *inc, "-c", str(SOURCE_DIR / "ctr_ops.cc"), "-o", "ctr_ops.o"],
            work,
        )
        link_extra: list[str] = []
        if cuda:
            assert nvcc is not None
            _run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", arch,
                  "-DCTR_OPS_CUDA", *inc, "-c", str(SOURCE_DIR / "augru_cuda.cu"),
                  "-o", "augru_cuda.o"], work)  # fmt: skip
            objs.append("augru_cuda.o")
            cuda_lib = _cudart_dir(nvcc)
            # static CUDA runtime: the library never binds to whichever libcudart.so.13
            # the process loaded first (ORT's, torch's and the toolkit's can differ)
            link_extra = [f"-L{cuda_lib}", "-l:libcudart_static.a", "-ldl", "-lpthread", "-lrt"]
        _run([cxx, "-shared", "-o", LIB_NAME, *objs, *link_extra,
              "-static-libstdc++", "-static-libgcc"], work)  # fmt: skip
        target.mkdir(parents=True, exist_ok=True)
        os.replace(work / LIB_NAME, lib)  # atomic: a concurrent build finds all or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built %s (cuda=%s)", lib, cuda)
    return OpsLibrary(lib, cuda)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def describe(path: Path) -> OpsLibrary:
    """Open a built library and ask whether its CUDA kernel is compiled in."""
    try:
        handle = ctypes.CDLL(str(path))
        return OpsLibrary(path, bool(handle.CtrOpsHasCuda()))
    except (OSError, AttributeError) as exc:
        raise NativeError(f"{path} is not this project's custom-op library: {exc}") from exc


def library(path: str | None = None, build_missing: bool = True) -> OpsLibrary:
    """The library at ``path`` (``CTR_OPS_LIBRARY``) or the cached build of the sources,
    built now if missing and ``build_missing``. Raises :class:`NativeError`."""
    if path:
        if not Path(path).is_file():
            raise NativeError(f"custom-op library {path} does not exist")
        return describe(Path(path))
    if not build_missing:
        raise NativeError("no custom-op library given and building is off")
    return build()
