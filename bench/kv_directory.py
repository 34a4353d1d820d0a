"""The `directory` scenario of `python -m bench.kv_tier`: what knowing where KV lives costs, measured
here and extrapolated to 1,000 replicas with a million cached blocks each.

- The node store's index: bytes per chunk held (and per prefix seen once), a lookup's cost in the
  store, and its round trip from another process (a Ray actor call).
- The router's directory: a replica's report (8 bytes per text block it holds), what one router
  keeps per entry once unpacked, a request's match against one replica's entries, and what a
  replica spends on its report (`HeldPrefixes.report`, on its event loop, once a second).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.kv_tier import BLOCK_BYTES


def _allocated(build: Any) -> tuple[Any, int]:
    """What `build()` returns, and the bytes it left allocated."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    value = build()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return value, sum(s.size_diff for s in after.compare_to(before, "filename"))


def store_index(chunks: int) -> dict[str, Any]:
    import ray

    from parallel.kv_tier.store import KVStore

    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        store = KVStore(os.path.join(tmp, "s"), budget_bytes=2**62)
        keys = [os.urandom(32) for _ in range(chunks)]
        parts = os.path.join(tmp, "s", "p.r{rank}.part")

        def commit_all() -> None:
            for key in keys:
                Path(parts.replace("{rank}", "0")).write_bytes(b"x")
                store.commit(key, parts, ["0" * 32], [1])

        def see_all() -> None:
            seen_keys = [os.urandom(32) for _ in range(chunks)]
            for i in range(0, chunks, 12):
                store.lookup(seen_keys[i : i + 12])

        _, held_bytes = _allocated(commit_all)
        _, seen_bytes = _allocated(see_all)
        prompt_keys = keys[:12]
        t0 = time.perf_counter()
        for _ in range(10_000):
            store.lookup(prompt_keys)
        in_store_s = (time.perf_counter() - t0) / 10_000
    actor_dir = tempfile.mkdtemp(prefix="shardserve-kv-bench-")
    actor = ray.remote(KVStore).options(num_cpus=0).remote(actor_dir, 2**30)
    ray.get(actor.lookup.remote(prompt_keys))
    t0 = time.perf_counter()
    for _ in range(500):
        ray.get(actor.lookup.remote(prompt_keys))
    round_trip_s = (time.perf_counter() - t0) / 500
    ray.kill(actor)
    shutil.rmtree(actor_dir, ignore_errors=True)
    return {
        "bytes_per_chunk": held_bytes / chunks,
        "bytes_per_seen_key": seen_bytes / chunks,
        "lookup_12_chunks_in_store_us": in_store_s * 1e6,
        "lookup_round_trip_ms": round_trip_s * 1000,
    }


def router_directory(entries: int, prompts: int = 1024, prompt_blocks: int = 94) -> dict[str, Any]:
    from deployments.engine.block_manager import BlockManager
    from deployments.engine.kv_keys import KVNamespace, block_keys
    from deployments.prefix_keys import pack, unpack
    from deployments.replica.held_prefixes import HeldPrefixes
    from deployments.routing import leading

    hashes = [os.urandom(16) for _ in range(entries)]
    blob = pack(hashes)
    held, unpacked_bytes = _allocated(lambda: unpack(blob))
    prompt = hashes[:24]  # a 1,500-character prompt's text blocks
    t0 = time.perf_counter()
    for _ in range(100_000):
        leading(prompt, held.__contains__)
    match_s = (time.perf_counter() - t0) / 100_000

    # A replica's report: `prompts` remembered prompts of `prompt_blocks` 16-token blocks, all held.
    bs, ns = 16, KVNamespace("fingerprint", "float32", 16)
    bm = BlockManager(num_blocks=prompts * (prompt_blocks + 1), block_size=bs, namespace=ns)
    tracker = HeldPrefixes(block_size=bs, chunk_blocks=8, store=None, max_keys=prompts * prompt_blocks)
    for p in range(prompts):
        tokens = [p * 100_000 + t for t in range(prompt_blocks * bs + 1)]
        table = bm.allocate_prompt(tokens)
        bm.register_full_blocks(table, lambda a, b, t=tokens: t[a:b], len(tokens))
        bm.free(table)
        keys = block_keys(ns.root(None), tokens[: prompt_blocks * bs], bs)
        tracker.track([os.urandom(16) for _ in range(24)], 24 * 64 + 10, len(tokens), keys, [])
    async def timed() -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        report = await tracker.report(bm.held_run, None)
        return report, time.perf_counter() - t0

    report, report_s = asyncio.run(timed())
    per_entry = unpacked_bytes / entries
    return {
        "report_bytes_per_entry": len(blob) / entries,
        "router_bytes_per_entry": per_entry,
        "match_24_blocks_us": match_s * 1e6,
        "replica_report_ms": report_s * 1000,
        "replica_report_prompts": prompts,
        "replica_report_bytes": len(report["kv_pool"]),
        "at_1000_replicas_1m_blocks_each": {
            "report_mib_per_replica": 1_000_000 * len(blob) / entries / 2**20,
            "router_gib": 1000 * 1_000_000 * per_entry / 2**30,
            "match_per_request_ms": 1000 * match_s * 1000,
        },
    }


def directory(chunks: int = 100_000) -> dict[str, Any]:
    blocks = 1_000 * 1_000_000
    store = store_index(chunks)
    return {
        **store,
        "router": router_directory(entries=chunks * 10),
        "at_1000_replicas_1m_blocks_each": {
            "chunks": blocks // 8,
            "index_gib": blocks // 8 * store["bytes_per_chunk"] / 2**30,
            "kv_tib": blocks * BLOCK_BYTES / 2**40,
        },
    }
