"""How many KV blocks a replica gets, and what context length that allows, decided as vLLM does.

Unless the config fixes the pool (`kv_cache_blocks`, `kv_cache_memory_mb`), the pool takes a share
of the memory that is free once the weights are loaded: host RAM on cpu, divided among the ranks
of the replica that share a node; on cuda the GPU's free memory less what the activations of the
largest step need, measured by a profiling forward. It never takes more than `max_num_seqs`
sequences of the whole context could use. The context served is the model's window, or what the
pool holds for one sequence when that is less, so that a 128k-window checkpoint on a small
machine answers requests instead of refusing every one that asks for the rest of its window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallel.checkpoints.loading import ModelLoadError
from parallel.runner import KVCacheSpec

MIN_CONTEXT_TOKENS = 16


@dataclass(frozen=True)
class PoolPlan:
    num_blocks: int
    reason: str
    """How the size was chosen, for the startup log and for errors."""


def plan_host_blocks(kv: KVCacheSpec, bytes_per_block: int, free_bytes: Callable[[], int]) -> int:
    """Blocks of the host tier behind one rank's pool (measured after the pool is allocated)."""
    if kv.host_memory_bytes is not None:
        return kv.host_memory_bytes // bytes_per_block
    if kv.host_memory_fraction <= 0:
        return 0
    return int(free_bytes() * kv.host_memory_fraction) // bytes_per_block


def host_free_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def cuda_free_bytes_after(profile: Callable[[], None]) -> int:
    """GPU memory free after `profile` (a forward of the largest step) ran, less the peak it
    needed above what stays allocated: what the pool may take without starving activations."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    profile()
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - resident
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return max(0, free - activations)


def plan_pool(kv: KVCacheSpec, bytes_per_block: int, window: int, free_bytes: Callable[[], int]) -> PoolPlan:
    """The pool for one rank (or the whole model). `free_bytes` is only measured when the config
    fixes neither the block count nor the memory."""
    mib = 2**20
    if kv.num_blocks:
        return PoolPlan(kv.num_blocks, f"engine.kv_cache_blocks={kv.num_blocks}")
    if kv.memory_bytes:
        return PoolPlan(kv.memory_bytes // bytes_per_block, f"engine.kv_cache_memory_mb={kv.memory_bytes // mib}")
    free = free_bytes()
    share = int(free * kv.memory_fraction) // bytes_per_block
    useful = kv.max_num_seqs * -(-window // kv.block_size)
    if share > useful:
        return PoolPlan(
            useful,
            f"max_num_seqs={kv.max_num_seqs} sequences of {window} tokens (less than "
            f"{kv.memory_fraction:g} of the {free / mib:.0f} MiB free)",
        )
    return PoolPlan(share, f"{kv.memory_fraction:g} of the {free / mib:.0f} MiB free after loading the weights")


def served_context(window: int, explicit: bool, plan: PoolPlan, block_size: int) -> int:
    """The context length served: the window, or what the pool holds for one sequence. A
    max_model_len the config asks for explicitly is honoured or refused, never cut."""
    capacity = plan.num_blocks * block_size
    if capacity >= window:
        return window
    if explicit:
        raise ModelLoadError(
            f"max_model_len {window} needs {-(-window // block_size)} KV-cache blocks for one sequence; "
            f"the pool has {plan.num_blocks} ({plan.reason}): lower max_model_len or give the pool more memory "
            "(engine.kv_cache_memory_mb or engine.kv_cache_memory_fraction)"
        )
    if capacity < MIN_CONTEXT_TOKENS:
        raise ModelLoadError(f"the KV pool holds only {capacity} tokens ({plan.reason}); give it more memory")
    return capacity
