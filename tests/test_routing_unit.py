"""The prefix directory and the routing policy, without Ray: the router's keys, what a replica
reports it holds (from a real block manager and a real store index), and the pure policy."""

from __future__ import annotations

import asyncio

from deployments.engine.block_manager import BlockManager
from deployments.engine.engine import chunks_of
from deployments.engine.kv_keys import KVNamespace, block_keys
from deployments.prefix_keys import BLOCK_CHARS, block_hashes, pack, prompt_text, request_hashes, unpack
from deployments.replica.held_prefixes import HeldPrefixes
from deployments.routing import SentPrefixes, choose, leading, matches
from deployments.types import ChatMessage, GenerateRequest
from parallel.kv_tier.store import KVStore, part_path, rank_file


def test_block_hashes_are_chained_prefix_hashes_rooted_in_the_tenant() -> None:
    a = block_hashes("x" * 64 + "y" * 64 + "tail", 64)
    b = block_hashes("x" * 64 + "z" * 64, 64)
    c = block_hashes("q" * 64 + "y" * 64, 64)
    assert len(a) == 2  # the partial tail block is not hashed
    assert a[0] == b[0] and a[1] != b[1]
    assert a[1] != c[1]  # same block text after a different prefix: a different hash
    assert block_hashes("x" * 128, 64, "acme")[0] != block_hashes("x" * 128, 64)[0] != block_hashes("x" * 128, 64, "bob")[0]
    assert unpack(pack(a + a)) == {h[:8] for h in a}


def test_next_chat_turn_extends_the_previous_prompt() -> None:
    system = ChatMessage(role="system", content="You are terse. " * 20)
    turn1 = [system, ChatMessage(role="user", content="What is Ray? " * 5)]
    turn2 = [*turn1, ChatMessage(role="assistant", content="A framework."), ChatMessage(role="user", content="And Serve?")]
    t1, t2 = (prompt_text(GenerateRequest(messages=m)) for m in (turn1, turn2))
    assert t2.startswith(t1)
    sent = SentPrefixes(max_blocks_per_replica=1000, ttl_s=5)
    sent.add("r1", block_hashes(t1, 64), now=0)
    h2 = block_hashes(t2, 64)
    assert leading(h2, lambda e: sent.has("r1", e, now=1)) == len(block_hashes(t1, 64))
    assert leading(h2, lambda e: sent.has("r2", e, now=1)) == 0
    assert leading(h2, lambda e: sent.has("r1", e, now=6)) == 0  # past its ttl: the replica's report says


def test_sent_prefixes_are_lru_bounded_and_forget_removed_replicas() -> None:
    sent = SentPrefixes(max_blocks_per_replica=3, ttl_s=60)
    hashes = block_hashes("a" * 64 * 5, 64)
    sent.add("r", hashes, now=0)
    assert leading(hashes, lambda e: sent.has("r", e, 1)) == 0  # the leading blocks were evicted first
    sent.add("r", hashes[:2], now=0)
    assert leading(hashes, lambda e: sent.has("r", e, 1)) == 2
    sent.keep_only(["other"])
    assert leading(hashes, lambda e: sent.has("r", e, 1)) == 0


def test_choose_prefers_the_pool_then_a_less_loaded_replica_that_can_load_it_then_load() -> None:
    def pick(pool, tier, queues):
        return choose(pool, tier, queues, min_match_blocks=2, imbalanced_threshold=8, tier_threshold=2)

    assert pick({"a": 5, "b": 1}, {}, {"a": 3, "b": 0}) == (["a"], "pool")
    assert pick({"a": 5, "b": 1}, {}, {"a": 12, "b": 0}) == (None, "load")  # overloaded
    assert pick({"a": 1, "b": 0}, {}, {"a": 0, "b": 0}) == (None, "load")  # too short
    assert pick({"a": 4, "b": 4}, {}, {"a": 5, "b": 2}) == (["b"], "pool")  # tie: shorter queue
    assert pick({"a": 4}, {}, {"a": None}) == (["a"], "pool")  # unknown load: trust the match
    # b (just started) holds nothing but its node's store holds the prefix: it takes its share
    # as soon as a's queue is longer by more than tier_threshold.
    assert pick({"a": 10, "b": 0}, {"a": 10, "b": 10}, {"a": 2, "b": 0}) == (["a"], "pool")
    assert pick({"a": 10, "b": 0}, {"a": 10, "b": 10}, {"a": 3, "b": 0}) == (["b"], "tier")
    assert pick({"a": 10, "b": 0}, {"a": 2, "b": 2}, {"a": 5, "b": 0}) == (["a"], "pool")  # store holds too little
    assert pick({"a": 0, "b": 0, "c": 0}, {"a": 6, "b": 6, "c": 0}, {"a": 4, "b": 1, "c": 0}) == (["b", "a"], "tier")
    assert pick({"a": 0}, {"a": 0}, {"a": 0}) == (None, "load")
    assert pick({"a": 0, "b": 0}, {"a": 6, "b": 0}, {"a": 12, "b": 0}) == (None, "load")  # the loader is overloaded


def test_a_store_counts_for_every_replica_that_loads_from_it_and_no_other() -> None:
    h = block_hashes("s" * 64 * 4, 64)
    e = {x[:8] for x in h}
    entries = {
        "old": (frozenset(e), frozenset(e), "node1/ns"),  # served the prefix, and saved it
        "new": (frozenset(), frozenset(), "node1/ns"),  # just added on the same node
        "other_ckpt": (frozenset(), frozenset(), "node1/ns2"),  # a rollout's replica: other keys
        "no_tier": (frozenset(), frozenset(), None),  # ranks on other nodes: loads from no store
        "far": (frozenset(), frozenset(), "node2/ns"),
    }
    pool, tier = matches(entries, h, lambda rid, x: rid == "far")
    assert pool == {"old": 4, "new": 0, "other_ckpt": 0, "no_tier": 0, "far": 4}  # far: sent to it lately
    assert tier == {"old": 4, "new": 4, "other_ckpt": 0, "no_tier": 0, "far": 0}


def _cache_prompt(bm: BlockManager, tokens: list[int], salt: str | None = None) -> None:
    table = bm.allocate_prompt(tokens, salt=salt)
    bm.register_full_blocks(table, lambda a, b: tokens[a:b], len(tokens))
    bm.free(table)


def _report(held: HeldPrefixes, bm: BlockManager, store: KVStore | None = None) -> tuple[frozenset[bytes], frozenset[bytes]]:
    async def held_runs(runs: list[list[bytes]]) -> list[int]:
        assert store is not None
        return store.held_runs(runs)

    report = asyncio.run(held.report(bm.held_run, held_runs if store is not None else None))
    assert report.pop("kv_store", None) == held._store
    return unpack(report.get("kv_pool", b"")), unpack(report.get("kv_tier", b""))


def test_a_replica_reports_the_text_blocks_whose_kv_it_holds_until_they_are_evicted(tmp_path) -> None:
    bs, ns = 4, KVNamespace("fp", "float32", 4)
    bm = BlockManager(num_blocks=40, block_size=bs, namespace=ns)
    request = GenerateRequest(prompt="system prompt words " * 40)  # 800 characters: 12 text blocks
    tokens = list(range(1000, 1100))  # 100 tokens: 24 cacheable blocks
    keys = block_keys(ns.root(None), tokens[:96], bs)
    held = HeldPrefixes(block_size=bs, chunk_blocks=4, store="node/ns", pending_s=0.0)
    held.track_request(request, len(tokens), keys, chunks_of(keys, 4))
    text = request_hashes(request, BLOCK_CHARS)
    assert len(text) == 12 and len(held) == 1

    _cache_prompt(bm, tokens)
    pool, tier = _report(held, bm)
    assert leading(text, pool.__contains__) == 12
    assert tier == frozenset()

    # Half the prompt's blocks evicted, tail first (the pool's LRU order): half the text.
    other = list(range(5000, 5000 + 4 * (40 - 13)))
    _cache_prompt(bm, other)
    assert 0 < bm.held_run(keys) < len(keys)
    pool, _ = _report(held, bm)
    # In proportion: a text block is 64 of 800 characters, 8 of 100 tokens, 2 blocks.
    assert 0 < leading(text, pool.__contains__) == bm.held_run(keys) // 2 < 12

    # The node's store holds the first three chunks (12 blocks): the text up to about half.
    store = KVStore(str(tmp_path), budget_bytes=2**20)
    for key in chunks_of(keys, 4)[:3]:
        part = part_path(str(tmp_path), key, "test")
        rank_file(part, 0).write_bytes(b"x")
        assert store.commit(key, part, ["c"], [1])
    _cache_prompt(bm, list(range(9000, 9000 + 4 * 39)))  # everything of the prompt evicted
    pool, tier = _report(held, bm, store)
    assert bm.held_run(keys) == 0 and pool == frozenset()
    assert leading(text, tier.__contains__) == 6  # 12 blocks
    assert len(held) == 1

    # Once the store drops it too, the replica forgets the prompt.
    for key in chunks_of(keys, 4)[:3]:
        store.drop(key, ("c",))
    held._prompts[text[-1][:8]].tier_checked = -1.0  # due again
    assert _report(held, bm, store) == (frozenset(), frozenset()) and len(held) == 0


def test_tenants_report_apart_and_the_host_tier_counts_as_held() -> None:
    bs, ns = 4, KVNamespace("fp", "float32", 4)
    bm = BlockManager(num_blocks=10, block_size=bs, namespace=ns, host_blocks=16)
    tokens = list(range(37))
    request = GenerateRequest(prompt="p" * 300, tenant="acme")
    keys = block_keys(ns.root("acme"), tokens[:36], bs)
    held = HeldPrefixes(block_size=bs, chunk_blocks=4, store=None)
    held.track_request(request, len(tokens), keys, [])
    pool, _ = _report(held, bm)  # queued, not computed yet: reported, since it will be
    assert leading(request_hashes(request, BLOCK_CHARS), pool.__contains__) == 4
    _cache_prompt(bm, tokens, salt="acme")
    _cache_prompt(bm, list(range(500, 536)))  # the pool is taken over; acme's blocks go to the host tier
    assert not any(k in bm._by_hash for k in keys)
    pool, _ = _report(held, bm)
    assert leading(request_hashes(request, BLOCK_CHARS), pool.__contains__) == 4
    assert leading(request_hashes(GenerateRequest(prompt="p" * 300), BLOCK_CHARS), pool.__contains__) == 0
