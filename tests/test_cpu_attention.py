"""The CPU paged decode kernel (parallel/model/cpu_attention.py) against gather_sdpa, the backend every
device has: GQA and MHA, sliding windows, contexts that end on and just past block boundaries,
blocks shared between sequences, whole contexts per task and contexts split into parts. Then what a
machine without a C compiler gets. No Ray: model side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deployments.config import ShardserveArgs
from parallel.model.attention import DecodeGroup, Prefill, gather_sdpa
from parallel.model.cpu_attention import cpu_paged

from .conftest import needs_c_compiler as needs_kernel

BLOCK = 16
NUM_BLOCKS = 400


def decode_group(lengths: list[int], rows: list[int], generator: torch.Generator, shared_blocks: int = 0) -> DecodeGroup:
    """Sequences with random, disjoint block tables, except `shared_blocks` leading blocks that
    all of them hold (a prefix-cache hit)."""
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    shared = [free.pop() for _ in range(shared_blocks)]
    width = max(-(-n // BLOCK) for n in lengths)
    tables = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        needed = -(-n // BLOCK)
        own = [free.pop() for _ in range(needed - min(shared_blocks, needed))]
        tables[i, :needed] = torch.tensor(shared[:needed] + own)
    return DecodeGroup(torch.tensor(rows), tables, torch.tensor(lengths), BLOCK)


CASES = {
    "gqa, one sequence (its context split over tasks)": (8, 4, [300], None, 0),
    "one long context, split, through a window": (8, 4, [2000], 700, 0),
    "one context shorter than a part (the rest empty)": (8, 2, [5], None, 0),
    "two contexts of unequal lengths, split": (8, 4, [40, 1000], None, 0),
    "gqa, block edges": (8, 4, [1, 15, 16, 17, 32, 33, 200, 511], None, 0),
    "mha, many sequences (whole rows per task)": (4, 4, [40 + 7 * i for i in range(20)], None, 0),
    "gqa 4:1, sliding window": (8, 2, [10, 31, 32, 33, 100, 700], 32, 0),
    "shared prefix blocks": (8, 4, [64, 70, 90, 33], None, 2),
}


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_gather_sdpa(case: str) -> None:
    heads, kv_heads, lengths, window, shared = CASES[case]
    g = torch.Generator().manual_seed(0)
    d = 32
    k_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    v_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    tokens = len(lengths) + 5
    q = torch.randn(tokens, heads, d, generator=g)
    rows = torch.randperm(tokens, generator=g)[: len(lengths)].tolist()
    group = decode_group(lengths, rows, g, shared)
    expected = gather_sdpa(q, q, q, k_blocks, v_blocks, [group], [], window, d**-0.5)
    got = cpu_paged(q, q, q, k_blocks, v_blocks, [group], [], window, d**-0.5)
    assert torch.allclose(got[group.rows], expected[group.rows], atol=1e-5, rtol=1e-5), (got - expected)[group.rows].abs().max()


@needs_kernel
def test_a_step_of_decodes_and_a_prefill_fills_every_row() -> None:
    """Two decode groups and a prefill chunk in one step, as prepare() makes them: each row gets
    its own attention and nothing else's."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d = 8, 4, 32
    k_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    v_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    q = torch.randn(24, heads, d, generator=g)
    k, v = torch.randn(24, kv_heads, d, generator=g), torch.randn(24, kv_heads, d, generator=g)
    groups = [decode_group([20, 25], [0, 1], g), decode_group([300, 310, 290], [2, 3, 4], g)]
    prefill = Prefill(row=5, n=19, start=0, blocks=torch.tensor([7, 8]))
    expected = gather_sdpa(q, k, v, k_blocks, v_blocks, groups, [prefill], None, d**-0.5)
    got = cpu_paged(q, k, v, k_blocks, v_blocks, groups, [prefill], None, d**-0.5)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def _backend_in_fresh_process(tmp_path: Path, compiler: str, backend: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import torch\n"
        "from parallel.model.cpu_attention import attention_backend\n"
        f"print(attention_backend({backend!r}, 'cpu', torch.float32)[0])\n"
    )
    env = {**os.environ, "CC": compiler, "SHARDSERVE_CACHE": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_without_a_compiler_auto_falls_back_and_cpu_paged_says_why(tmp_path: Path) -> None:
    auto = _backend_in_fresh_process(tmp_path, "/nonexistent/cc", "auto")
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip() == "gather_sdpa"
    assert "CPU paged-attention kernel unavailable" in auto.stderr
    insisted = _backend_in_fresh_process(tmp_path, "/nonexistent/cc", "cpu_paged")
    assert insisted.returncode != 0
    assert "KernelUnavailable" in insisted.stderr and "/nonexistent/cc" in insisted.stderr


@needs_kernel
def test_the_kernel_is_built_once_per_cache(tmp_path: Path) -> None:
    first = _backend_in_fresh_process(tmp_path, os.environ.get("CC", "cc"), "auto")
    assert first.stdout.strip() == "cpu_paged", first.stderr
    (built,) = (tmp_path / "kernels").glob("paged_decode-*.so")
    stamp = built.stat().st_mtime_ns
    again = _backend_in_fresh_process(tmp_path, os.environ.get("CC", "cc"), "auto")
    assert again.stdout.strip() == "cpu_paged", again.stderr
    assert built.stat().st_mtime_ns == stamp and list((tmp_path / "kernels").iterdir()) == [built]


def test_cpu_paged_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValidationError, match="attention_backend cpu_paged runs on device cpu in float32"):
        ShardserveArgs(attention_backend="cpu_paged", dtype="bfloat16")


@needs_kernel
def test_one_decode_group_in_place_matches_the_padded_buckets() -> None:
    """The kernel's backend asks prepare() for one group of every decode token (nothing to pad);
    its rows are those gather_sdpa computes over length buckets."""
    from parallel.model.paged_model import prepare
    from parallel.runner import SamplingSpec, SequenceStep, StepInput

    assert getattr(cpu_paged, "reads_blocks_in_place", False)
    g = torch.Generator().manual_seed(2)
    contexts = [5, 300, 17, 64, 250, 33, 700, 90]
    seqs, used = [], 0
    for i, ctx in enumerate(contexts):
        n = -(-(ctx + 1) // BLOCK)
        seqs.append(SequenceStep(i, [11], ctx, list(range(used, used + n)), SamplingSpec()))
        used += n
    step = StepInput(seqs)
    padded, one = prepare(step, BLOCK, "cpu"), prepare(step, BLOCK, "cpu", one_decode_group=True)
    assert len(padded.decode_groups) > 1 and len(one.decode_groups) == 1
    heads, kv_heads, d = 8, 4, 32
    k_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    v_blocks = torch.randn(NUM_BLOCKS, BLOCK, kv_heads, d, generator=g)
    q = torch.randn(len(contexts), heads, d, generator=g)
    expected = gather_sdpa(q, q, q, k_blocks, v_blocks, padded.decode_groups, [], 64, d**-0.5)
    got = cpu_paged(q, q, q, k_blocks, v_blocks, one.decode_groups, [], 64, d**-0.5)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
