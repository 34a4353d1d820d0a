"""The cluster KV tier without Ray: block keys, the store's bookkeeping, and engines over real
runners that save chunks to a real store directory and load them back (another "replica" in
the same process, with a pool of its own). The Ray side is in test_kv_tier_http.py."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deployments.config import EngineConfig, KVTierConfig
from deployments.engine.engine import LLMEngine
from deployments.engine.kv_keys import KVNamespace, block_keys
from deployments.replica.kv_tier_client import KVTierClient
from parallel.kv_tier.store import KVStore, LookupReply
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec
from parallel.runners.local_runner import LocalModelRunner

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
NS = KVNamespace("fingerprint-a", "float32", 4)
TIER = KVTierConfig(chunk_blocks=2, lookup_timeout_ms=5000)


# ---- keys ---------------------------------------------------------------------------------------

KEYS_SCRIPT = (
    "from deployments.engine.kv_keys import KVNamespace, block_keys;"
    "ns = KVNamespace('fingerprint-a', 'float32', 4);"
    "print(b''.join(block_keys(ns.root('tenant'), list(range(100, 140)), 4)).hex())"
)


def test_keys_are_identical_in_another_process() -> None:
    here = b"".join(block_keys(NS.root("tenant"), list(range(100, 140)), 4)).hex()
    there = subprocess.run([sys.executable, "-c", KEYS_SCRIPT], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here and len(here) == 10 * 64


def test_keys_differ_by_model_tenant_and_layout() -> None:
    tokens = list(range(16))
    base = block_keys(NS.root(), tokens, 4)
    others = [
        block_keys(KVNamespace("fingerprint-b", "float32", 4).root(), tokens, 4),
        block_keys(KVNamespace("fingerprint-a", "bfloat16", 4).root(), tokens, 4),
        block_keys(KVNamespace("fingerprint-a", "float32", 4, tensor_parallel_size=2).root(), tokens, 4),
        block_keys(NS.root("tenant-1"), tokens, 4),
        block_keys(NS.root("tenant-2"), tokens, 4),
    ]
    every = {k for keys in [base, *others] for k in keys}
    assert len(every) == 6 * 4  # no key shared by any two namespaces, at any block
    assert block_keys(NS.root(), [*tokens[:8], 99, *tokens[9:]], 4)[:2] == base[:2]  # a prefix keeps its keys
    with pytest.raises(ValueError, match="fingerprint"):
        KVNamespace("", "float32", 4)


# ---- the store ----------------------------------------------------------------------------------


def _commit(store: KVStore, key: bytes, nbytes: int, ranks: int = 1) -> bool:
    part = str(Path(store.directory()) / f"{key.hex()}.w.r{{rank}}.part")
    for r in range(ranks):
        Path(part.replace("{rank}", str(r))).write_bytes(b"x" * nbytes)
    return store.commit(key, part, ["c"] * ranks, [nbytes] * ranks)


def test_store_counts_sightings_pins_and_evicts_least_recently_used(tmp_path: Path) -> None:
    store = KVStore(str(tmp_path / "s"), budget_bytes=300, pin_s=0.0)
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    assert store.lookup([a, b]).sightings == [1, 1]
    assert store.lookup([a, b]).sightings == [2, 2]
    assert _commit(store, a, 100) and _commit(store, b, 100)
    reply = store.lookup([a, b, c])
    assert [h.nbytes for h in reply.held] == [100, 100] and reply.sightings == [0, 0, 1]
    assert store.lookup([b]).held  # b is now the most recently used
    assert _commit(store, c, 100) and _commit(store, d, 100)  # 400 > 300: a goes
    assert [len(store.lookup([k]).held) for k in (a, b, c, d)] == [0, 1, 1, 1]
    assert not _commit(store, bytes(32), 1000)  # larger than the whole budget: refused
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(f"{k.hex()}.r0" for k in (b, c, d))
    assert store.stats().evictions == 1 and store.stats().held_bytes == 300


def test_store_keeps_pinned_chunks_and_refuses_missing_parts(tmp_path: Path) -> None:
    store = KVStore(str(tmp_path / "s"), budget_bytes=200, pin_s=60.0)
    a, b, c = (bytes([i]) * 32 for i in range(3))
    assert _commit(store, a, 100, ranks=2)
    assert store.lookup([a]).held  # pinned: a load may be reading it
    assert not _commit(store, b, 150)  # room only by evicting a pinned chunk: refused
    assert not store.commit(c, str(tmp_path / "s" / "gone.r{rank}.part"), ["c"], [10])
    assert store.lookup([a]).held[0].path.endswith(".r{rank}")


# ---- engines over real runners ------------------------------------------------------------------


def _engine(tier: KVTierClient | None, ns: KVNamespace = NS, blocks: int = 256) -> LLMEngine:
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=blocks))
    return LLMEngine(runner, runner.load(), EngineConfig().scheduler_spec(), namespace=ns, tier=tier)


async def _generate(engine: LLMEngine, tier: KVTierClient | None, prompt: list[int], salt: str | None = None) -> list[int]:
    hint = await tier.hint(engine.chunk_keys(prompt, salt, TIER.chunk_blocks)) if tier is not None else None
    (seq,) = engine.add(prompt, [(SamplingSpec(), 0)], 8, ignore_eos=True, cache_salt=salt, tier=hint)
    return [t.token_id async for batch in engine.stream(seq) for t in batch]


async def _until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


PROMPT = torch.randint(10, 500, (41,), generator=torch.Generator().manual_seed(3)).tolist()  # 10 usable blocks: 5 chunks


def test_another_engine_loads_what_one_saved_and_gets_the_same_tokens(tmp_path: Path) -> None:
    store = KVStore(str(tmp_path / "s"), budget_bytes=2**30)
    tier = KVTierClient(store, store.directory(), TIER)

    async def run() -> None:
        plain = await _generate(_engine(None), None, PROMPT)
        a = _engine(tier)
        assert await _generate(a, tier, PROMPT) == plain
        assert store.stats().commits == 0  # seen once: nothing stored
        assert await _generate(a, tier, PROMPT) == plain  # seen twice: a saves its pool's blocks
        await _until(lambda: store.stats().held_chunks == 5)
        assert a.counters().kv_tier_saves == 5 and a.counters().kv_tier_hit_tokens == 0

        b = _engine(tier)  # another replica: an empty pool
        assert await _generate(b, tier, PROMPT) == plain
        stats = b.counters()
        assert stats.kv_tier_hit_tokens == 40 and stats.kv_tier_loads == 1 and stats.kv_tier_load_failures == 0
        assert stats.prefix_cache_hits == 0  # none of it was in its own pool
        branch = [*PROMPT[:20], 7, 7, 7, 7, 7]
        assert await _generate(b, tier, branch) == await _generate(_engine(None), None, branch)

        other_tenant = _engine(tier)
        assert await _generate(other_tenant, tier, PROMPT, salt="tenant-2") == plain
        assert other_tenant.counters().kv_tier_hit_tokens == 0  # a salted prompt shares nothing

        other_model = _engine(tier, KVNamespace("fingerprint-b", "float32", 4))
        await _generate(other_model, tier, PROMPT)
        assert other_model.counters().kv_tier_hit_tokens == 0

    asyncio.run(run())


def test_a_corrupt_or_missing_chunk_is_recomputed(tmp_path: Path) -> None:
    store = KVStore(str(tmp_path / "s"), budget_bytes=2**30)
    tier = KVTierClient(store, store.directory(), TIER.model_copy(update={"min_sightings": 1}))

    async def run() -> None:
        plain = await _generate(_engine(None), None, PROMPT)
        await _generate(_engine(tier), tier, PROMPT)
        await _until(lambda: store.stats().held_chunks == 5)
        files = sorted((tmp_path / "s").iterdir())
        raw = bytearray(files[2].read_bytes())
        raw[-5] ^= 0xFF  # one byte of K/V flipped
        files[2].write_bytes(bytes(raw))
        files[4].unlink()
        b = _engine(tier)
        assert await _generate(b, tier, PROMPT) == plain
        stats = b.counters()
        assert stats.kv_tier_load_failures == 2 and stats.kv_tier_hit_tokens < 40
        assert store.stats().held_chunks == 3 and store.stats().dropped == 2  # the two that failed were dropped

    asyncio.run(run())


def test_a_store_that_does_not_answer_costs_a_recompute_only(tmp_path: Path) -> None:
    class Silent(KVStore):
        def lookup(self, keys: list[bytes]) -> LookupReply:
            raise ConnectionError("store actor died")

    store = Silent(str(tmp_path / "s"), budget_bytes=2**30)
    tier = KVTierClient(store, store.directory(), TIER)

    async def run() -> None:
        plain = await _generate(_engine(None), None, PROMPT)
        assert await _generate(_engine(tier), tier, PROMPT) == plain
        assert tier.lookup_failures == 1

    asyncio.run(run())


# ---- the host tier behind a replica's pool --------------------------------------------------------


def test_evicted_blocks_go_to_the_host_tier_and_come_back_in_the_same_step() -> None:
    from deployments.engine.block_manager import BlockManager

    bm = BlockManager(num_blocks=7, block_size=4, namespace=NS, host_blocks=8)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ta = bm.allocate_prompt(a, reserve=0)  # 3 blocks
    bm.register_full_blocks(ta, lambda s, e: a[s:e], 9)
    bm.free(ta)
    assert bm.take_host_copies() == ((), ())
    tb = bm.allocate_prompt(list(range(30, 54)), reserve=0)  # 6 blocks: five free, then a's least recently used
    evicted, onloads = bm.take_host_copies()
    assert len(evicted) == 1 and onloads == ()
    assert evicted[0][0] in tb.blocks  # the block a's second block was in went to b
    bm.free(tb)
    again = bm.allocate_prompt(a, reserve=0)
    offloads, onloads = bm.take_host_copies()
    assert offloads == () and again.cached_tokens == 8 and bm.host_hits == 4  # one block from the pool, one from the host
    assert onloads == ((evicted[0][1], again.blocks[1]),)  # from the slot it went to, into a's table


def test_an_engine_reads_back_from_its_host_tier_the_tokens_it_would_compute() -> None:
    def engine(host: bool) -> LLMEngine:
        kv = KVCacheSpec.fixed(block_size=4, num_blocks=24, host_blocks_bytes=64 * 4096 if host else None)
        runner = LocalModelRunner(dataclasses.replace(SPEC, max_model_len=64), kv)
        info = runner.load()
        assert info.num_host_blocks == (64 if host else 0)
        return LLMEngine(runner, info, EngineConfig().scheduler_spec(), namespace=NS)

    prompts = [torch.randint(10, 500, (41,), generator=torch.Generator().manual_seed(s)).tolist() for s in (5, 6, 7)]

    async def run(e: LLMEngine) -> list[list[int]]:
        return [await _generate(e, None, p) for p in [*prompts, prompts[0], prompts[1]]]

    with_host = engine(True)
    assert asyncio.run(run(with_host)) == asyncio.run(run(engine(False)))
    stats = with_host.counters()
    assert stats.host_cache_offloads > 0 and stats.host_cache_hit_tokens >= 40  # the pool held one prompt at a time


def test_chunks_that_came_back_from_the_host_tier_are_saved_with_their_own_kv(tmp_path: Path) -> None:
    """A prompt seen the second time as its blocks come back from the host tier: its chunks are
    saved only once those copies have landed, so another engine loads the right K/V."""
    store = KVStore(str(tmp_path / "s"), budget_bytes=2**30)
    tier = KVTierClient(store, store.directory(), TIER)
    small = dataclasses.replace(SPEC, max_model_len=64)

    def engine(host: bool) -> LLMEngine:
        runner = LocalModelRunner(
            small, KVCacheSpec.fixed(block_size=4, num_blocks=24, host_blocks_bytes=64 * 4096 if host else None)
        )
        return LLMEngine(runner, runner.load(), EngineConfig().scheduler_spec(), namespace=NS, tier=tier)

    others = [torch.randint(10, 500, (41,), generator=torch.Generator().manual_seed(s)).tolist() for s in (8, 9)]

    async def run() -> None:
        plain = await _generate(_engine(None), None, PROMPT)
        a = engine(host=True)
        await _generate(a, tier, PROMPT)  # seen once
        for other in others:  # push PROMPT's blocks out of the pool into the host tier
            await _generate(a, tier, other)
        assert await _generate(a, tier, PROMPT) == plain  # seen twice: back from the host, then saved
        assert a.counters().host_cache_hit_tokens > 0
        await _until(lambda: store.stats().held_chunks == 5)
        b = engine(host=False)
        assert await _generate(b, tier, PROMPT) == plain
        assert b.counters().kv_tier_hit_tokens == 40

    asyncio.run(run())


def test_store_drops_only_the_copy_it_was_told_of_and_discards_failed_saves(tmp_path: Path) -> None:
    (tmp_path / "shardserve-kv-deadnode").mkdir()
    (tmp_path / "shardserve-kv-livenode").mkdir()
    store = KVStore(str(tmp_path / "shardserve-kv-mine"), budget_bytes=1000, live_nodes=["livenode", "mine"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shardserve-kv-livenode", "shardserve-kv-mine"]
    key = bytes(32)
    assert _commit(store, key, 10)
    store.drop(key, ("another copy's digest",))
    assert store.lookup([key]).held
    store.drop(key, ("c",))
    assert not store.lookup([key]).held and store.stats().held_bytes == 0
    part = str(Path(store.directory()) / "k.w-1.r{rank}.part")
    for r in range(2):
        Path(part.replace("{rank}", str(r))).write_bytes(b"x")
    store.discard(part)
    assert list(Path(store.directory()).iterdir()) == []


def test_preemption_with_both_tiers_keeps_the_tokens(tmp_path: Path) -> None:
    """Eight prompts sharing a prefix at once in a pool too small for them (sequences are
    preempted and come back), twice, with the host tier and the cluster tier both in play."""
    store = KVStore(str(tmp_path / "s"), budget_bytes=2**30)
    tier = KVTierClient(store, store.directory(), TIER.model_copy(update={"min_sightings": 1}))
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=512, host_blocks_bytes=256 * 4096))
    info = runner.load()
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(10, 500, (17,), generator=g).tolist()
    prompts = [prefix + torch.randint(10, 500, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (8,), generator=g)]

    async def together(engine: LLMEngine, with_tier: bool) -> list[list[int]]:
        async def one(p: list[int], i: int) -> list[int]:
            hint = await tier.hint(engine.chunk_keys(p, None, TIER.chunk_blocks)) if with_tier else None
            (seq,) = engine.add(p, [(SamplingSpec(), i)], 24, ignore_eos=True, tier=hint)
            return [t.token_id async for batch in engine.stream(seq) for t in batch]

        return list(await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts))))

    async def run() -> None:
        plain = LLMEngine(runner, info, EngineConfig().scheduler_spec(), namespace=NS)
        expected = await together(plain, False)
        small_info = dataclasses.replace(info, num_kv_blocks=30)
        for _ in range(2):
            small = LLMEngine(runner, small_info, EngineConfig().scheduler_spec(), namespace=NS, tier=tier)
            assert await together(small, True) == expected
            assert small.counters().num_preemptions > 0
        assert small.counters().kv_tier_hit_tokens > 0

    asyncio.run(run())
