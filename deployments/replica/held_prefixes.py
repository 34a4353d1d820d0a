"""This replica's entries in the router's prefix directory: which prompt prefixes its KV pool (or
host tier) still holds, and which its node's store holds, in the router's keys.

The router keys prefixes by the request's text (it has no tokenizer), the engine by token blocks.
The replica has both, so it remembers, for the prompts it served, which token block each text
block needs (in proportion: a text block ending at character c needs the tokens up to about
c / len(text) of the prompt), and reports, when Serve asks (`record_routing_stats`), the text
blocks whose token blocks it still holds. Serve hands the report to every router with the
replica's other state; a replica that dies or is replaced takes its entries with it, and a new
one reports what it holds from its first answer, which is what the router needs at scale-up.

A report costs O(log n) pool lookups per remembered prompt (`BlockManager.held_run`) and one
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
from deployments.prefix_keys import BLOCK_CHARS, block_hashes, pack, prompt_text
from deployments.types import GenerateRequest

HeldRuns = Callable[[list[list[BlockKey]]], Awaitable[list[int] | None]]


@dataclass
class _Prompt:
    text_hashes: list[bytes]
    needs: list[int]  # token blocks text block i needs; nondecreasing
    keys: list[BlockKey]  # the prompt's cacheable token blocks
    chunks: list[BlockKey]  # its whole chunks in the cluster tier
    tier_blocks: int = 0  # blocks the node store held at the last check
    tier_checked: float = field(default=-math.inf)
    tracked_at: float = field(default_factory=time.monotonic)
    was_held: bool = False  # the pool held some of it once: a prompt still queued is not forgotten


class HeldPrefixes:
    def __init__(
        self, block_size: int, chunk_blocks: int, block_chars: int = BLOCK_CHARS, max_prompts: int = 1024, tier_checks: int = 128,
        grace_s: float = 120.0,
    ) -> None:
        """`grace_s`: how long a prompt never computed (still queued, or refused) is remembered."""
        self._block_chars = block_chars
        self._block_size = block_size
        self._chunk_blocks = chunk_blocks
        self._max_prompts = max_prompts
        self._tier_checks = tier_checks
        self._grace_s = grace_s
        self._prompts: OrderedDict[bytes, _Prompt] = OrderedDict()  # by the last text hash, LRU first

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
        last = text_hashes[-1]
        known = self._prompts.pop(last, None)
        self._prompts[last] = known or _Prompt(text_hashes, needs, keys, chunks)
        while len(self._prompts) > self._max_prompts:
            self._prompts.popitem(last=False)

    async def report(self, held_run: Callable[[list[BlockKey]], int], held_runs: HeldRuns | None) -> dict[str, Any]:
        """The entries the router reads: `kv_pool`, the text blocks whose KV this replica holds,
        and `kv_tier`, those its node's store holds (packed, `prefix_keys.unpack`). Prompts of
        which nothing is held any more are forgotten."""
        if held_runs is not None:
            await self._check_tier(held_runs)
        pool: list[bytes] = []
        tier: list[bytes] = []
        for last, p in list(self._prompts.items()):
            run = held_run(p.keys)
            pool += p.text_hashes[: bisect.bisect_right(p.needs, run)]
            tier += p.text_hashes[: bisect.bisect_right(p.needs, p.tier_blocks)]
            p.was_held = p.was_held or run > 0
            settled = p.was_held or time.monotonic() - p.tracked_at > self._grace_s
            if run == 0 and p.tier_blocks == 0 and settled and (held_runs is None or not p.chunks or p.tier_checked > -math.inf):
                del self._prompts[last]
        return {"kv_pool": pack(pool), "kv_tier": pack(tier), "prompts": len(self._prompts)}

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
