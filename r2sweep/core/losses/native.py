"""Compiled kernels of the R2 losses: C built on first use, called through ctypes.

Soft-Min-Max's gradient is dense, and eager PyTorch spends it in passes over the
weights (one full-size temporary per operation, about 17 per step); the C kernel in
``kernels/softminmax.c`` makes three. It is plain C over float pointers, so the
system's C compiler builds it in under a second (``torch.utils.cpp_extension`` would
need ninja and torch's headers, and a minute per build).

Nothing depends on it: when there is no compiler, the build fails or the kernel is
switched off (``R2SWEEP_NATIVE_KERNELS=0``, or :func:`disabled`), callers get None
and run the eager path, which computes the same values; :func:`status` says which
path runs and why.

The built library is kept in ``$R2SWEEP_KERNEL_CACHE`` (default
``~/.cache/r2sweep/kernels``) under a name that hashes the source, the compiler, the
flags and this CPU's features, so a cluster's shared home folder never hands a node
a library built for another CPU. Where that folder cannot be written, the library is
built in a temporary folder that is removed once it is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

__all__ = ["softminmax_library", "status", "disabled", "SWITCH_ENV", "CACHE_ENV"]

SWITCH_ENV = "R2SWEEP_NATIVE_KERNELS"
CACHE_ENV = "R2SWEEP_KERNEL_CACHE"
_SOURCE = Path(__file__).with_name("kernels") / "softminmax.c"
# Tried in order; the first set the compiler accepts wins. Without OpenMP's runtime
# the kernel runs on one thread; without ``-fopenmp-simd`` its sums do not vectorise.
# ``-fno-trapping-math`` lets the exponential's selects become vector blends (the
# kernel never reads floating-point exception flags): 6x faster, the same values.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp"),
    ("-O3", "-fno-trapping-math", "-fopenmp"),
    ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp-simd"),
    ("-O3",),
)
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "library": CDLL | None, "status": str
_disabled_depth = 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the eager PyTorch path inside the block (for comparisons and tests)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def softminmax_library() -> ctypes.CDLL | None:
    """The loaded Soft-Min-Max kernel, or None when the eager path must run."""
    if _switched_off():
        return None
    if "status" not in _loaded:
        with _lock:
            if "status" not in _loaded:
                _loaded["library"], _loaded["status"] = _build_and_load()
    return _loaded["library"]  # type: ignore[return-value]


def status() -> str:
    """One line: which Soft-Min-Max path runs in this process, and why."""
    if _switched_off():
        return f"eager PyTorch (switched off: {SWITCH_ENV}=0 or native.disabled())"
    softminmax_library()
    return str(_loaded["status"])


def _switched_off() -> bool:
    return bool(_disabled_depth) or os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "off", "no")


def _cache_folder() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "r2sweep" / "kernels"


def _cpu_identity() -> str:
    """This CPU's instruction-set features (what ``-march=native`` compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_identity(compiler: str) -> str | None:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    command = [compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(_SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return False
        os.replace(partial, target)  # whole or absent: a concurrent build may win the race
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        partial.unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    f32, f64, i64 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64
    library.r2_softminmax_forward.argtypes = [f32, i64, i64, f32, f32, f64, ctypes.c_int]
    library.r2_softminmax_forward.restype = ctypes.c_int
    library.r2_softminmax_backward.argtypes = [f32, i64, i64, f32, f32, f32, f64, ctypes.c_int]
    library.r2_softminmax_backward.restype = ctypes.c_int
    return library


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"eager PyTorch (no C compiler: {compiler!r} not found; install one, or set CC)"
    identity = _compiler_identity(compiler)
    if identity is None:
        return None, f"eager PyTorch ({compiler!r} --version failed)"
    source = _SOURCE.read_bytes()
    folder, temporary = _cache_folder(), None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        temporary = folder = Path(tempfile.mkdtemp(prefix="r2sweep-kernels-"))
    try:
        for flags in _FLAG_SETS:
            key = hashlib.sha256(
                b"\0".join([source, identity.encode(), " ".join(flags).encode(), _cpu_identity().encode()])
            ).hexdigest()[:24]
            target = folder / f"softminmax-{key}.so"
            if not (target.exists() or _compile(compiler, flags, target)):
                continue
            try:
                library = _load(target)
            except OSError:
                # A library another node or compiler left under this name: build it anew.
                try:
                    library = _load(target) if _compile(compiler, flags, target) else None
                except OSError as error:
                    return None, f"eager PyTorch (the built kernel did not load: {error})"
                if library is None:
                    continue
            where = "a temporary folder, removed" if temporary else str(target)
            return library, f"native kernel ({compiler} {' '.join(flags)}; {where})"
        return None, f"eager PyTorch ({compiler} could not build {_SOURCE.name} with any of {len(_FLAG_SETS)} flag sets)"
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)  # a loaded library stays mapped
