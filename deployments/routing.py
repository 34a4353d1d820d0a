"""Prefix-aware routing: send a request to the LLM server replica that holds its prompt's prefix
in its KV cache, or to one that can load it from its KV store, unless that is overloaded.

Ray Serve builds one request router per deployment handle (here: in each ingress replica) and
asks it, for every request, which replicas to try. The router keys a prompt by chained hashes
of fixed-size blocks of its text (`deployments/prefix_keys.py`; a block's hash covers everything
before it), and looks them up in a directory of what each replica holds:

- each replica's report (`LLMServer.record_routing_stats`, which Serve polls every
  `ROUTING_STATS_PERIOD_S` and hands to every router): the prefixes in its KV pool and host
  tier (or queued there in the last 30 s), those in the cluster-tier store it loads from, and
  which store that is (its node and KV namespace), translated from its engine's token blocks
  (`deployments/replica/held_prefixes.py`). A prefix evicted from a replica leaves its report; a
  replica that restarts or is added reports what it holds, and what its store holds, as
  reported by the replicas that served those prefixes and still remember them, counts for it
  at once;
- what this router sent each replica in the last `sent_ttl_s` (a report is a period or two
  old, so the next turn of a chat must not wait for one to follow its conversation).

Policy (`choose`): the replica with the longest held prefix wins, unless another replica that can
load about as much from its store has a queue shorter by more than `tier_threshold` (then that
one: loading costs a fraction of computing), or it is overloaded (its queue longer than the
shortest by more than `imbalanced_threshold`: then load alone decides). With no replica holding
the prefix, replicas whose store holds it are preferred, the shortest queue first, unless they
are overloaded too.

No blocking call on the routing path: reports arrive with Serve's replica updates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.prefix_keys import BLOCK_CHARS, ENTRY_BYTES, request_hashes, unpack
from deployments.types import GenerateRequest

TIER_AS_WARM = 0.75
"""A replica whose store holds at least this share of what the best replica's pool holds is as
good a place for the request, if it is less loaded."""


class SentPrefixes:
    """The block hashes this router sent each replica lately, least recently used dropped first
    and each forgotten `ttl_s` after it was sent (by then the replica's report says)."""

    def __init__(self, max_blocks_per_replica: int, ttl_s: float) -> None:
        self._max = max_blocks_per_replica
        self._ttl = ttl_s
        self._blocks: dict[Any, OrderedDict[bytes, float]] = {}

    def has(self, replica: Any, entry: bytes, now: float) -> bool:
        seen = self._blocks.get(replica)
        sent = seen.get(entry) if seen else None
        return sent is not None and now - sent < self._ttl

    def add(self, replica: Any, hashes: list[bytes], now: float) -> None:
        seen = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h[:ENTRY_BYTES]] = now
            seen.move_to_end(h[:ENTRY_BYTES])
        while len(seen) > self._max:
            seen.popitem(last=False)

    def keep_only(self, replicas: Iterable[Any]) -> None:
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]


def leading(hashes: list[bytes], held: Callable[[bytes], bool]) -> int:
    """How many of the hashes, from the first, are held."""
    n = 0
    for h in hashes:
        if not held(h[:ENTRY_BYTES]):
            break
        n += 1
    return n


Entries = tuple[frozenset[bytes], frozenset[bytes], str | None]
"""What a replica holds, what the store it loads from holds, and which store that is."""


class Reports:
    """The replicas' directory entries, unpacked once per report."""

    def __init__(self) -> None:
        self._unpacked: dict[Any, tuple[dict[str, Any], frozenset[bytes], frozenset[bytes]]] = {}

    def entries(self, replica: RunningReplica) -> Entries:
        """(pool, store, store name): what the replica holds, what the store it loads from
        holds, and which store that is (None: it loads from none)."""
        stats = replica.routing_stats or {}
        known = self._unpacked.get(replica.replica_id)
        if known is None or known[0] is not stats:
            known = (stats, unpack(stats.get("kv_pool", b"")), unpack(stats.get("kv_tier", b"")))
            self._unpacked[replica.replica_id] = known
        return known[1], known[2], stats.get("kv_store")

    def keep_only(self, replicas: Iterable[Any]) -> None:
        keep = set(replicas)
        for replica in [r for r in self._unpacked if r not in keep]:
            del self._unpacked[replica]


def matches(
    entries: dict[Any, Entries], hashes: list[bytes], sent: Callable[[Any, bytes], bool]
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Each replica's matched blocks in its own KV (reported, or `sent` it lately) and in the
    store it loads from (what any replica that loads from that store reported of it)."""
    stores: dict[str, list[frozenset[bytes]]] = {}
    for _, held_there, store in entries.values():
        if store is not None:
            stores.setdefault(store, []).append(held_there)
    in_store = {store: leading(hashes, lambda e, s=sets: any(e in x for x in s)) for store, sets in stores.items()}
    pool = {rid: leading(hashes, lambda e, rid=rid: e in entries[rid][0] or sent(rid, e)) for rid in entries}
    return pool, {rid: in_store[store] if store is not None else 0 for rid, (_, _, store) in entries.items()}


def choose(
    pool: dict[Any, int],
    tier: dict[Any, int],
    queue_lens: dict[Any, int | None],
    min_match_blocks: int,
    imbalanced_threshold: int,
    tier_threshold: int,
) -> tuple[list[Any] | None, str]:
    """The replicas to try first and why ("pool", "tier"), or (None, "load") to route by load
    alone. Pure policy: `pool` is each replica's matched blocks in its own KV, `tier` in its
    node's store; unknown queue lengths (None) are trusted to be short."""
    known = [q for q in queue_lens.values() if q is not None]
    warm = {r: max(pool.get(r, 0), tier.get(r, 0)) for r in set(pool) | set(tier)}
    best = max(pool, key=lambda r: (pool[r], -(queue_lens.get(r) or 0)), default=None)
    if best is not None and pool[best] >= min_match_blocks:
        best_queue = queue_lens.get(best)
        if best_queue is not None:
            loaders = [
                r
                for r, m in warm.items()
                if r != best
                and m >= max(min_match_blocks, TIER_AS_WARM * pool[best])
                and (queue_lens.get(r) or 0) < best_queue - tier_threshold
            ]
            if loaders:
                return sorted(loaders, key=lambda r: queue_lens.get(r) or 0), "tier"
            if known and best_queue - min(known) > imbalanced_threshold:
                return None, "load"
        return [best], "pool"
    shortest = min(known) if known else 0
    loaders = [
        r for r, m in warm.items() if m >= min_match_blocks and (queue_lens.get(r) or 0) - shortest <= imbalanced_threshold
    ]
    if loaders:
        return sorted(loaders, key=lambda r: queue_lens.get(r) or 0), "tier"
    return None, "load"


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Configured by `request_router_config` on the LLMServer deployment (deployments/app.py
    sets it when `routing: prefix_affinity`)."""

    def initialize_state(
        self,
        min_match_blocks: int = 2,
        imbalanced_threshold: int = 8,
        tier_threshold: int = 2,
        sent_ttl_s: float = 5.0,
        max_blocks_per_replica: int = 65536,
    ) -> None:
        self._min_match_blocks = min_match_blocks
        self._imbalanced_threshold = imbalanced_threshold
        self._tier_threshold = tier_threshold
        self._sent = SentPrefixes(max_blocks_per_replica, sent_ttl_s)
        self._reports = Reports()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Every answer ends with all replicas, so when none of them accepts the request
            # (all full) the base router must back off before asking again, not spin.
            pending_request.routing_context.should_backoff = True
        by_load = [candidate_replicas]  # the base router probes these and takes the shortest queue
        hashes = self._hashes(pending_request)
        if not hashes:
            return by_load
        pool, tier = self._matches(candidate_replicas, hashes)
        cache = self.replica_queue_len_cache
        queue_lens = {r.replica_id: cache.get(r.replica_id) for r in candidate_replicas}
        first, _ = choose(pool, tier, queue_lens, self._min_match_blocks, self._imbalanced_threshold, self._tier_threshold)
        if first is None:
            return by_load
        by_id = {r.replica_id: r for r in candidate_replicas}
        return [[by_id[r] for r in first], candidate_replicas]

    def _matches(self, replicas: list[RunningReplica], hashes: list[bytes]) -> tuple[dict[Any, int], dict[Any, int]]:
        now = time.monotonic()
        entries = {r.replica_id: self._reports.entries(r) for r in replicas}
        return matches(entries, hashes, lambda rid, e: self._sent.has(rid, e, now))

    def _get_pending_request_matching_metadata(self, request_metadata: Any = None) -> PendingRequest | None:
        """A replica chosen for a request goes to that request while it still waits; else to
        the oldest waiting one (FIFOMixin's order). Serve's non-FIFO mode would give the
        exact match only, and in Ray 2.60 it lost requests that arrived together."""
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes(pending_request)
        if hashes:
            self._sent.add(replica_id, hashes, time.monotonic())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._sent.keep_only(r.replica_id for r in replicas)
        self._reports.keep_only(r.replica_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.keep_only(self.curr_replicas)
        self._reports.keep_only(self.curr_replicas)

    def _hashes(self, pending_request: PendingRequest | None) -> list[bytes]:
        args = pending_request.args if pending_request is not None else None
        if not args or not isinstance(args[0], GenerateRequest):
            return []
        return request_hashes(args[0], BLOCK_CHARS)
