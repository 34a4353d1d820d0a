"""This replica's entries in the router's prefix directory: which prompt prefixes its KV pool (or
host tier) still holds, and which its node's store holds, in the router's keys.

The router keys prefixes by the request's text (it has no tokenizer), the engine by token blocks.
The replica has both, so it remembers, for the prompts it served, which token block each text
block needs (in proportion: a text block ending at character c needs the tokens up to about
c / len(text) of the prompt), and reports, when Serve asks (`record_routing_stats`), the text
blocks whose token blocks it still holds. Serve hands the report to every router with the
replica's other state; a replica that dies or is replaced takes its entries with it, and a new
one reports what it holds from its first answer, which is what the router needs at scale-up.

The report also names the store this replica loads from (its node and its KV namespace: a
replica of another checkpoint, or one without the tier, cannot load what the store holds), and
the router counts a store's entries for every replica that names it. A report costs O(log n)
pool lookups per remembered prompt (`BlockManager.held_run`) plus packing what is held, and one
call to the node store for a bounded number of prompts (what the store holds changes only as it
saves and evicts, so each prompt is checked again in turn, not every time).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.kv_keys import BlockKey
from deployments.prefix_keys import BLOCK_CHARS, ENTRY_BYTES, block_hashes, pack, prompt_text
from deployments.types import GenerateRequest

HeldRuns = Callable[[list[list[BlockKey]]], Awaitable[list[int] | None]]


@dataclass
class _Prompt:
    text_hashes: list[bytes]  # directory entries of its text blocks
    needs: list[int]  # token blocks text block i needs; nondecreasing
    keys: list[BlockKey]  # the prompt's cacheable token blocks
    chunks: list[BlockKey]  # its whole chunks in the cluster tier
    tier_blocks: int = 0  # blocks the node store held at the last check
    tier_checked: float = field(default=-math.inf)
    tracked_at: float = field(default_factory=time.monotonic)
    was_held: bool = False  # the pool has held some of it


class HeldPrefixes:
    def __init__(
        self,
        block_size: int,
        chunk_blocks: int,
        store: str | None,
        block_chars: int = BLOCK_CHARS,
        max_keys: int = 262_144,
        tier_checks: int = 128,
        pending_s: float = 30.0,
        tier_ttl_s: float = 60.0,
    ) -> None:
        """`store`: which store this replica loads from, as the router groups replicas (None: it
        has no tier). `max_keys`: token blocks remembered in all (8 MiB of keys), least recently
        queued prompts forgotten first. `pending_s`: how long a prompt queued here and not
        computed yet is reported as held (it will be, unless refused). `tier_ttl_s`: how long
        a store check holds (a store that stops answering stops being reported)."""
        self._block_chars = block_chars
        self._block_size = block_size
        self._chunk_blocks = chunk_blocks
        self._store = store
        self._max_keys = max_keys
        self._tier_checks = tier_checks
        self._pending_s = pending_s
        self._tier_ttl_s = tier_ttl_s
        self._prompts: OrderedDict[bytes, _Prompt] = OrderedDict()  # by the last text hash, LRU first
        self._keys = 0

    def __len__(self) -> int:
        return len(self._prompts)

    def track_request(self, request: GenerateRequest, num_tokens: int, keys: list[BlockKey], chunks: list[BlockKey]) -> None:
        text = prompt_text(request)
        self.track(block_hashes(text, self._block_chars, request.tenant), len(text), num_tokens, keys, chunks)

    def track(
        self, text_hashes: list[bytes], text_chars: int, num_tokens: int, keys: list[BlockKey], chunks: list[BlockKey]
    ) -> None:
        """Remember a prompt just queued: its text blocks (`prefix_keys.block_hashes`), its
        length in characters and tokens, its token block keys and its chunk keys."""
        if not text_hashes or not keys or text_chars <= 0:
            return
        bs, chars = self._block_size, self._block_chars
        needs = [min(len(keys), -(-math.ceil((i + 1) * chars * num_tokens / text_chars) // bs)) for i in range(len(text_hashes))]
        entries = [h[:ENTRY_BYTES] for h in text_hashes]
        last = entries[-1]
        known = self._prompts.pop(last, None)
        prompt = _Prompt(entries, needs, keys, chunks)
        if known is not None:
            self._keys -= len(known.keys)
            if known.chunks == chunks:
                prompt.tier_blocks, prompt.tier_checked = known.tier_blocks, known.tier_checked
        self._prompts[last] = prompt
        self._keys += len(keys)
        while self._keys > self._max_keys and len(self._prompts) > 1:
            _, dropped = self._prompts.popitem(last=False)
            self._keys -= len(dropped.keys)

    async def report(self, held_run: Callable[[list[BlockKey]], int], held_runs: HeldRuns | None) -> dict[str, Any]:
        """The entries the router reads: `kv_pool`, the text blocks whose KV this replica holds
        (or will: queued here in the last `pending_s`), `kv_tier`, those its store holds (packed,
        `prefix_keys.unpack`), and `kv_store`, which store that is. Prompts of which nothing is
        held any more are forgotten. Nothing changes while nothing is held (Serve sends every
        router every replica's report again when one changes)."""
        if held_runs is not None:
            await self._check_tier(held_runs)
        now = time.monotonic()
        pool: list[bytes] = []
        tier: list[bytes] = []
        for last, p in list(self._prompts.items()):
            run = held_run(p.keys)
            p.was_held = p.was_held or run > 0
            pending = not p.was_held and now - p.tracked_at < self._pending_s
            pool += p.text_hashes if pending else p.text_hashes[: bisect.bisect_right(p.needs, run)]
            tier_blocks = p.tier_blocks if now - p.tier_checked < self._tier_ttl_s else 0
            tier += p.text_hashes[: bisect.bisect_right(p.needs, tier_blocks)]
            checked = held_runs is None or not p.chunks or p.tier_checked > -math.inf
            if run == 0 and tier_blocks == 0 and not pending and checked:
                del self._prompts[last]
                self._keys -= len(p.keys)
        entries: dict[str, Any] = {"kv_store": self._store} if self._store is not None else {}
        if pool:
            entries["kv_pool"] = pack(pool)
        if tier:
            entries["kv_tier"] = pack(tier)
        return entries

    async def _check_tier(self, held_runs: HeldRuns) -> None:
        """Ask the store about the prompts checked longest ago (new ones first)."""
        due = sorted((p for p in self._prompts.values() if p.chunks), key=lambda p: p.tier_checked)[: self._tier_checks]
        if not due:
            return
        runs = await held_runs([p.chunks for p in due])
        if runs is None:
            return
        now = time.monotonic()
        for p, n in zip(due, runs, strict=True):
            p.tier_blocks = n * self._chunk_blocks
            p.tier_checked = now
