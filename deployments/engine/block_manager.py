"""KV-cache block accounting with prefix caching. Pure Python: the tensors live in the runner.

Each sequence owns a block table (block ids in order). A full block is indexed by its key, a
SHA-256 of its tokens chained with the key of the block before it under the pool's namespace
(`deployments.engine.kv_keys`), so two prompts share a cached block only when everything up to
and including that block is identical. Blocks whose reference count drops
to zero stay indexed (and reusable) until the space is needed; then the least recently used is
evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.engine.kv_keys import BlockKey, KVNamespace, block_keys

TokenRange = Callable[[int, int], list[int]]
"""tokens(start, end): a sequence's tokens in [start, end)."""


class NoFreeBlocks(Exception):
    """The pool is exhausted; the scheduler preempts or waits."""


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockKey | None = None


@dataclass
class BlockTable:
    """A sequence's blocks, and how many of its leading tokens came from the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    hashes: list[BlockKey] = field(default_factory=list)  # keys of the leading full blocks
    root: BlockKey = b""  # the chain's start: the namespace with the tenant's salt


class HostIndex:
    """Which keys the runner's host tier holds, in which slot, least recently used first.

    A block evicted from the pool is copied to a slot (`put`); a prompt whose next block is
    not in the pool but is here gets it copied back (`get`). Slots read by this step's copies
    back are pinned until the step is built, so that no eviction of the same step reuses them.
    """

    def __init__(self, num_slots: int) -> None:
        self._slots: OrderedDict[BlockKey, int] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))
        self._pinned: set[int] = set()

    def peek(self, key: BlockKey) -> int | None:
        return self._slots.get(key)

    def get(self, key: BlockKey) -> int:
        slot = self._slots[key]
        self._slots.move_to_end(key)
        self._pinned.add(slot)
        return slot

    def put(self, key: BlockKey) -> int | None:
        """A slot to copy the block of `key` to; None if it is there already, or every slot is
        pinned."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, s in self._slots.items() if s not in self._pinned), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
        self._slots[key] = slot
        self._pinned.add(slot)  # written by this step's offloads: not reused before they run
        return slot

    def unpin(self) -> None:
        self._pinned.clear()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        namespace: KVNamespace | None = None,
        host_blocks: int = 0,
    ) -> None:
        """`namespace`: what the keys are under (None: a pool whose keys never leave it).
        `host_blocks`: slots of the runner's host tier behind the pool (0: none)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace or KVNamespace("process-local", "unknown", block_size)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never hashed, pop from end
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed, LRU first
        self._by_hash: dict[BlockKey, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached
        self.host = HostIndex(host_blocks) if host_blocks and enable_prefix_caching else None
        self.host_hits = 0  # prompt tokens copied back from the host tier
        self.host_offloads = 0  # blocks copied to the host tier
        self._offloads: list[tuple[int, int]] = []  # (block, slot) for the next step
        self._onloads: list[tuple[int, int]] = []  # (slot, block) for the next step

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def held_run(self, keys: list[BlockKey]) -> int:
        """About how many leading `keys` the pool or the host tier still holds, in O(log n)
        lookups: a prefix mostly outlives its tail (`free` releases tails first, LRU evicts
        them first), so the held keys are taken to be a prefix. Where they are not (a block
        computed twice at once is kept once; the host tier may refuse a block) the answer can
        be off by more than a block: it feeds the router's directory only, and allocation
        always checks every key."""

        def held(i: int) -> bool:
            return keys[i] in self._by_hash or (self.host is not None and self.host.peek(keys[i]) is not None)

        if not keys or not held(0):
            return 0
        if held(len(keys) - 1):
            return len(keys)
        lo, hi = 0, len(keys) - 1  # keys[hi] is not held; find the first that is not
        while lo < hi:
            mid = (lo + hi) // 2
            if held(mid):
                lo = mid + 1
            else:
                hi = mid
        return lo

    # ---- allocation ------------------------------------------------------------------------

    def allocate_prompt(self, tokens: list[int], reserve: int = 1, salt: str | None = None, reuse: bool = True) -> BlockTable:
        """Blocks for a new sequence's tokens plus `reserve` more token slots.

        Leading full blocks found in the prefix cache are shared, never recomputed; at least the
        last token is always left to compute, since its logits are needed. Raises NoFreeBlocks
        (allocating nothing) when the pool cannot hold it. A `salt` (the tenant) starts the key
        chain, so prompts of different tenants never share cached blocks. `reuse=False` computes
        every token (its blocks are still indexed for others once computed).
        """
        table = BlockTable(root=self.namespace.root(salt))
        cached: list[int] = []
        hashes: list[BlockKey] = []
        from_host: list[BlockKey] = []
        if self.enable_prefix_caching and reuse:
            usable = (len(tokens) - 1) // self.block_size  # keep >= 1 token to compute
            hashes = self._block_hashes(lambda a, b: tokens[a:b], 0, usable, table.root)
            for h in hashes:
                block_id = self._by_hash.get(h)
                if block_id is None:
                    break
                cached.append(block_id)
            if self.host is not None:
                for h in hashes[len(cached) :]:
                    if self.host.peek(h) is None or h in self._by_hash:
                        break
                    from_host.append(h)
        total = self.blocks_needed(len(tokens) + reserve)
        fresh_needed = total - len(cached)
        reclaimable = len(self._free) + sum(1 for b in self._evictable if b not in cached)
        if fresh_needed > reclaimable:
            raise NoFreeBlocks
        if self.enable_prefix_caching and reuse:
            self.prefix_queries += len(tokens)
            self.prefix_hits += len(cached) * self.block_size
        for block_id in cached:
            self._ref(block_id)
        slots = [self.host.get(h) for h in from_host] if self.host is not None else []  # pinned before any eviction
        table.blocks = cached + [self._take() for _ in range(fresh_needed)]
        for i, (h, slot) in enumerate(zip(from_host, slots, strict=True), start=len(cached)):
            block = self._blocks[table.blocks[i]]
            block.block_hash = h  # its K/V is copied in before the step's forward
            self._by_hash[h] = block.block_id
            self._onloads.append((slot, block.block_id))
        self.host_hits += len(from_host) * self.block_size
        table.cached_tokens = (len(cached) + len(from_host)) * self.block_size
        table.hashes = hashes[: len(cached) + len(from_host)]
        return table

    def take_host_copies(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The (offloads, onloads) of the allocations since the last call, for the next step."""
        copies = (tuple(self._offloads), tuple(self._onloads))
        self._offloads, self._onloads = [], []
        if self.host is not None:
            self.host.unpin()
        return copies

    def ensure_capacity(self, table: BlockTable, num_tokens: int) -> None:
        """Grow the table so it can hold num_tokens; raises NoFreeBlocks, allocating nothing."""
        extra = self.blocks_needed(num_tokens) - len(table.blocks)
        if extra > self.num_free:
            raise NoFreeBlocks
        for _ in range(extra):
            table.blocks.append(self._take())

    def register_full_blocks(self, table: BlockTable, tokens: TokenRange, num_computed: int) -> None:
        """Index the blocks whose tokens are all computed, so later prompts can share them.

        `tokens(start, end)` gives the sequence's tokens in a range: only blocks not indexed yet
        are read, so calling this after every step costs nothing between block boundaries.
        """
        if not self.enable_prefix_caching:
            return
        first = len(table.hashes)
        parent = table.hashes[-1] if table.hashes else table.root
        for i, h in enumerate(self._block_hashes(tokens, first, num_computed // self.block_size, parent), start=first):
            table.hashes.append(h)
            block = self._blocks[table.blocks[i]]
            if block.block_hash is None and h not in self._by_hash:
                block.block_hash = h
                self._by_hash[h] = block.block_id

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks (last block first, so a prefix outlives its tail)."""
        for block_id in reversed(table.blocks):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        table.blocks = []
        table.hashes = []

    # ---- internals -------------------------------------------------------------------------

    def _block_hashes(self, tokens: TokenRange, first: int, stop: int, parent: BlockKey) -> list[BlockKey]:
        """Chained keys of blocks [first, stop), continuing from the key of block first-1."""
        bs = self.block_size
        return block_keys(parent, tokens(first * bs, stop * bs), bs) if stop > first else []

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id, None)
        block.ref_count += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.pop()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)  # least recently used
            block = self._blocks[block_id]
            if block.block_hash is not None:
                if self.host is not None:
                    slot = self.host.put(block.block_hash)
                    if slot is not None:
                        self._offloads.append((block_id, slot))
                        self.host_offloads += 1
                del self._by_hash[block.block_hash]
                block.block_hash = None
        else:
            raise NoFreeBlocks
        self._blocks[block_id].ref_count = 1
        return block_id
