"""Paged attention on the CPU: decode tokens through a C kernel that reads the pool in place.

`gather_sdpa` copies every decode sequence's blocks into a padded tensor, then SDPA reads that
copy: the pool's K/V cross memory three times per layer, and at batch 16 the gather alone was a
quarter of a decode step (`python -m bench.step_profile`). `kernels/paged_decode.c` reads each
sequence's keys and values once, through its block table, for all the query heads of a KV head.
Prefill chunks keep SDPA (they are compute-bound, where its fused kernel is good).

The kernel is built on first use (`parallel.model.cpu_kernels`). Without a compiler, `auto` falls back
to `gather_sdpa` and says so once in the log.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from parallel.model.attention import DecodeGroup, PagedAttention, Prefill, attend_prefills, gather_sdpa
from parallel.model.cpu_kernels import KernelLibrary, KernelUnavailable

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu_paged", "gather_sdpa")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
PAGED_DECODE = KernelLibrary(
    "paged_decode", {"paged_decode_f32": ([_ptr] * 7 + [_i64] * 7 + [ctypes.c_float], ctypes.c_int)}
)


def load_kernel() -> ctypes.CDLL:
    """The kernel library, built and loaded once per process; KernelUnavailable if it cannot be."""
    return PAGED_DECODE.load()


def kernel_available() -> bool:
    return PAGED_DECODE.available()


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
            logger.warning(
                "CPU paged-attention kernel unavailable (%s): attention runs as gather_sdpa, which copies every "
                "sequence's K/V blocks each layer (decode at batch 32 about twice as slow; install a C compiler with "
                "OpenMP, or set attention_backend: gather_sdpa to silence this)",
                exc,
            )
            return "gather_sdpa", gather_sdpa
        return "cpu_paged", cpu_paged
    return "gather_sdpa", gather_sdpa
