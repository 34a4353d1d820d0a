"""Paged attention on the CPU: decode tokens through a C kernel that reads the pool in place.

`gather_sdpa` copies every decode sequence's blocks into a padded tensor, then SDPA reads that
copy: the pool's K/V cross memory three times per layer, and at batch 16 the gather alone was a
quarter of a decode step (`python -m bench.step_profile`). `kernels/paged_decode.c` reads each
sequence's keys and values once, through its block table, for all the query heads of a KV head.
Prefill chunks keep SDPA (they are compute-bound, where its fused kernel is good).

The kernel is built on first use with the machine's C compiler (`cc`, or `$CC`) and OpenMP, for
this CPU (`-march=native`), and cached under `$SHARDSERVE_CACHE/kernels` keyed by the source,
the flags, the compiler and the CPU's feature flags; a shared home on a mixed cluster gets one
build per CPU kind. It has no torch headers, so it builds in a second; ctypes calls it with
the tensors' data pointers (and releases the GIL for the call). Without a compiler, `auto`
falls back to `gather_sdpa` and says so once in the log.
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

import torch

from parallel.attention import DecodeGroup, PagedAttention, Prefill, attend_prefills, gather_sdpa
from parallel.builtin_models import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "paged_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
BACKENDS = ("auto", "cpu_paged", "gather_sdpa")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_build_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded here (no compiler, or it failed)."""


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


def _build(compiler: str) -> Path:
    """The cached shared library for this source, compiler and CPU, compiled if missing (to a
    temporary name, then renamed: ranks that start together never load a half-written file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    logger.info("built the CPU paged-attention kernel: %s", target)
    return target


def load_kernel() -> ctypes.CDLL:
    """The kernel library, built and loaded once per process; KernelUnavailable if it cannot be."""
    global _library, _build_error
    if _library is not None:  # every decode call of every layer comes here: no lock once loaded
        return _library
    with _lock:
        if _library is None and _build_error is None:
            try:
                compiler = _compiler()
                if compiler is None:
                    raise KernelUnavailable("no C compiler (cc, gcc or $CC) on PATH")
                library = ctypes.CDLL(str(_build(compiler)))
                fn = library.paged_decode_f32
                fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int64]
                fn.restype = ctypes.c_int
                _library = library
            except (KernelUnavailable, OSError, subprocess.SubprocessError) as exc:
                _build_error = str(exc)
        if _library is None:
            raise KernelUnavailable(_build_error)
        return _library


def kernel_available() -> bool:
    try:
        load_kernel()
    except KernelUnavailable:
        return False
    return True


def paged_decode(
    out: torch.Tensor,
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    group: DecodeGroup,
    window: int | None,
    scale: float,
) -> None:
    """Writes the attention of `group`'s tokens into their rows of out [T, heads, d]."""
    num_seqs, width = group.blocks.shape
    heads, d = q.shape[1], q.shape[2]
    block_size, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    # Whole token rows per task when the sequences go round the threads; else split the heads.
    task_kv_heads = kv_heads if num_seqs >= 2 * torch.get_num_threads() else 1
    status = load_kernel().paged_decode_f32(
        q.data_ptr(),
        k_blocks.data_ptr(),
        v_blocks.data_ptr(),
        out.data_ptr(),
        group.rows.data_ptr(),
        group.blocks.data_ptr(),
        group.lengths.data_ptr(),
        num_seqs,
        width,
        heads,
        kv_heads,
        d,
        block_size,
        window or 0,
        scale,
        task_kv_heads,
    )
    if status != 0:
        raise MemoryError("the paged decode kernel could not allocate its score buffer")


def cpu_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    decode_groups: list[DecodeGroup],
    prefills: list[Prefill],
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """A PagedAttention: decode groups through the kernel, prefill chunks through SDPA."""
    q = q.contiguous()
    out = torch.empty_like(q)
    with torch.profiler.record_function("shardserve::cpu_paged_decode"):  # the profiler's tables see no ctypes call
        for group in decode_groups:
            paged_decode(out, q, k_blocks, v_blocks, group, window, scale)
    attend_prefills(out, q, k, v, k_blocks, v_blocks, prefills, window, scale)
    return out


cpu_paged.reads_blocks_in_place = True  # type: ignore[attr-defined]  # one decode group per step (paged_model.prepare)


def attention_backend(name: str, device: str, dtype: torch.dtype) -> tuple[str, PagedAttention]:
    """(the backend's name, the function) for `name` (one of BACKENDS) on this device and dtype.

    `auto` takes the kernel on CPU in float32 when it builds here, else `gather_sdpa`;
    `cpu_paged` insists (KernelUnavailable, or ValueError off float32 CPU)."""
    if name == "gather_sdpa":
        return name, gather_sdpa
    fits = device == "cpu" and dtype == torch.float32
    if name == "cpu_paged" and not fits:
        raise ValueError(f"attention_backend cpu_paged runs on cpu in float32, not {device} in {dtype}")
    if name == "cpu_paged":
        load_kernel()
        return name, cpu_paged
    if fits:
        try:
            load_kernel()
        except KernelUnavailable as exc:
            logger.warning("CPU paged-attention kernel unavailable (%s): using gather_sdpa", exc)
            return "gather_sdpa", gather_sdpa
        return "cpu_paged", cpu_paged
    return "gather_sdpa", gather_sdpa
