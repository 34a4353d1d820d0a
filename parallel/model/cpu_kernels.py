"""C kernels for the CPU forward, built on first use with the machine's compiler and loaded once.

Each library is one C file under `kernels/` (with the headers there) built with the machine's C
compiler (`cc`, or `$CC`) and OpenMP, for this CPU (`-march=native`), and cached under
`$SHARDSERVE_CACHE/kernels` keyed by the sources, the flags, the compiler and the CPU's feature
flags; a shared home on a mixed cluster gets one build per CPU kind. They have no torch headers,
so each builds in a second; ctypes calls them with the tensors' data pointers (and releases the
GIL for the call). In a process that has imported torch, `libgomp.so.1` resolves to the one
torch loaded, so their parallel loops run on torch's own OpenMP threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from parallel.cache_dir import cache_root

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).resolve().parent / "kernels"
# -fno-trapping-math lets floorf vectorize (vec_math.h); results are the same bits. With -std=c11
# the compiler fuses no multiply-add that the source does not write (-ffp-contract=off).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11")

Signature = tuple[list[type], type | None]
"""(argtypes, restype) of one exported function (None: it returns nothing)."""


class KernelUnavailable(RuntimeError):
    """A kernel library could not be built or loaded here (no compiler, or it failed)."""


class NoCompiler(KernelUnavailable):
    """No C compiler at all: the one reason a machine may go without the kernels (tests skip
    on it, and only on it; a compiler that fails is an error to see)."""


def kernel_cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compiler_available() -> bool:
    return _compiler() is not None


class KernelLibrary:
    """One C source under kernels/, built and loaded at the first `load()` of the process."""

    def __init__(self, name: str, functions: dict[str, Signature]) -> None:
        self.name = name
        self.source = KERNELS / f"{name}.c"
        self._functions = functions
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._error: KernelUnavailable | None = None

    def load(self) -> ctypes.CDLL:
        """The library with its functions typed; KernelUnavailable if it cannot be had here."""
        if self._library is not None:  # every layer of every step comes here: no lock once loaded
            return self._library
        with self._lock:
            if self._library is None and self._error is None:
                try:
                    compiler = _compiler()
                    if compiler is None:
                        raise NoCompiler("no C compiler (cc, gcc or $CC) on PATH")
                    library = ctypes.CDLL(str(self._build(compiler)))
                    for fn_name, (argtypes, restype) in self._functions.items():
                        fn = getattr(library, fn_name)
                        fn.argtypes, fn.restype = argtypes, restype
                    self._library = library
                except (KernelUnavailable, OSError, subprocess.SubprocessError) as exc:
                    self._error = exc if isinstance(exc, KernelUnavailable) else KernelUnavailable(str(exc))
            if self._library is None:
                assert self._error is not None
                raise type(self._error)(str(self._error))
            return self._library

    def available(self) -> bool:
        try:
            self.load()
        except KernelUnavailable:
            return False
        return True

    def _build(self, compiler: str) -> Path:
        """The cached shared library for these sources, compiler and CPU, compiled if missing (to
        a temporary name, then renamed: ranks that start together never load a half-written file)."""
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        sources = [self.source.read_text(), *(h.read_text() for h in sorted(KERNELS.glob("*.h")))]
        key = hashlib.sha256("\0".join([*sources, *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
        target = kernel_cache_dir() / f"{self.name}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *FLAGS, f"-I{KERNELS}", "-o", str(built), str(self.source), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise KernelUnavailable(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)
        logger.info("built the CPU kernel library %s: %s", self.name, target)
        return target
