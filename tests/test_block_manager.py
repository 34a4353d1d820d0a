"""Block allocation, prefix hits, eviction and preemption accounting (no Ray, no tensors)."""

from __future__ import annotations

import pytest

from deployments.engine.block_manager import BlockManager, NoFreeBlocks, TokenRange


def span(tokens: list[int]) -> TokenRange:
    return lambda start, end: tokens[start:end]


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    t = bm.allocate_prompt(list(range(10)), reserve=1)  # 11 slots -> 3 blocks
    assert len(t.blocks) == 3 and len(set(t.blocks)) == 3
    assert bm.num_free == 5
    bm.free(t)
    assert bm.num_free == 8 and bm.usage() == 0.0


def test_pool_exhaustion_allocates_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate_prompt(list(range(8)), reserve=0)
    with pytest.raises(NoFreeBlocks):
        bm.allocate_prompt(list(range(100, 108)), reserve=0)
    assert bm.num_free == 1


def test_prefix_hit_shares_full_blocks_only_after_they_are_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))
    a = bm.allocate_prompt(prompt)
    b_before = bm.allocate_prompt(prompt)
    assert b_before.cached_tokens == 0  # nothing registered yet
    bm.register_full_blocks(a, span(prompt), num_computed=10)  # 2 full blocks
    c = bm.allocate_prompt([*prompt, 99, 98])
    assert c.cached_tokens == 8 and c.blocks[:2] == a.blocks[:2]
    assert bm.prefix_hits == 8


def test_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(8))  # exactly two blocks
    a = bm.allocate_prompt(prompt)
    bm.register_full_blocks(a, span(prompt), 8)
    again = bm.allocate_prompt(prompt)
    assert again.cached_tokens == 4  # the second block holds the last token: recomputed


def test_different_earlier_block_means_no_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a_prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    a = bm.allocate_prompt(a_prompt)
    bm.register_full_blocks(a, span(a_prompt), 9)
    b = bm.allocate_prompt([0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert b.cached_tokens == 0


def test_freed_cached_blocks_survive_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    p1, p2 = [1, 2, 3], [7, 8, 9]
    t1 = bm.allocate_prompt(p1, reserve=0)  # 2 blocks
    bm.register_full_blocks(t1, span(p1), 3)
    bm.free(t1)
    t2 = bm.allocate_prompt(p2, reserve=0)  # takes the 2 never-used blocks
    bm.register_full_blocks(t2, span(p2), 3)
    bm.free(t2)
    assert bm.num_free == 4
    again = bm.allocate_prompt(p1, reserve=0)
    assert again.cached_tokens == 2  # still cached after its owner left
    # Pool pressure evicts p2's cached block (the only unreferenced one), never p1's (in use).
    bm.free(bm.allocate_prompt([50, 51, 52, 53], reserve=0))
    assert bm.allocate_prompt(p2, reserve=0).cached_tokens == 0
    bm.free(again)
    assert bm.allocate_prompt(p1, reserve=0).cached_tokens == 2


def test_prefix_caching_off_never_shares() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    p = list(range(12))
    a = bm.allocate_prompt(p)
    bm.register_full_blocks(a, span(p), 12)
    assert bm.allocate_prompt(p).cached_tokens == 0
    assert bm.prefix_queries == 0


def test_ensure_capacity_grows_by_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    t = bm.allocate_prompt([1, 2, 3], reserve=1)
    assert len(t.blocks) == 1
    bm.ensure_capacity(t, 5)
    assert len(t.blocks) == 2
    bm.ensure_capacity(t, 16)
    assert len(t.blocks) == 4
    with pytest.raises(NoFreeBlocks):
        bm.ensure_capacity(t, 17)


def test_tenants_salts_keep_prefix_cache_blocks_apart() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    prompt = list(range(13))  # 3 full blocks usable for sharing
    first = bm.allocate_prompt(prompt, reserve=1, salt="alice")
    bm.register_full_blocks(first, lambda a, b: prompt[a:b], len(prompt))
    assert bm.allocate_prompt(prompt, reserve=1, salt="alice").cached_tokens == 12  # same tenant: shared
    assert bm.allocate_prompt(prompt, reserve=1, salt="bob").cached_tokens == 0  # another tenant: never
    assert bm.allocate_prompt(prompt, reserve=1).cached_tokens == 0  # nor a caller without a tenant
