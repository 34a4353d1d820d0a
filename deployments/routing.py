"""Prefix-aware routing: send a request to the LLM server replica that already holds its
prompt's prefix in its KV cache, unless that replica is overloaded.

Ray Serve builds one request router per deployment handle (here: in each ingress replica) and
asks it, for every request, which replicas to try. This router remembers, per replica, hashes
of the prompts it routed there, in fixed-size blocks of characters chained like the engine's
KV-cache blocks (a block's hash covers everything before it), so the longest run of leading
blocks a replica has seen is the prefix it most likely still has cached. A multi-turn chat's
next turn starts with the previous turn's prompt, so it follows its conversation.

Load wins over affinity: when the best-matching replica's queue is longer than the shortest
one's by more than `imbalanced_threshold`, or it refuses the request (full), the request goes
to the least-loaded replica, as it does when nothing matches.

The index is local to each router (no shared actor, no blocking call on the routing path);
with several ingress replicas each one learns from its own traffic.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
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

from deployments.types import GenerateRequest


def prompt_text(request: GenerateRequest) -> str:
    """The prompt as one string whose prefixes mirror the model's prompt prefixes."""
    if request.messages is not None:
        return "".join(f"\x1e{m.role}\x1f{m.text()}" for m in request.messages)
    if request.prompt_token_ids is not None:
        return ",".join(map(str, request.prompt_token_ids))
    return request.prompt or ""


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """Chained hashes of the text's full blocks: equal hashes mean equal prefixes."""
    hashes, previous = [], b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + text[start : start + block_chars].encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Which block hashes each replica has been sent, least recently used dropped first."""

    def __init__(self, max_blocks_per_replica: int) -> None:
        self._max = max_blocks_per_replica
        self._blocks: dict[Any, OrderedDict[bytes, None]] = {}

    def matched(self, replica: Any, hashes: list[bytes]) -> int:
        """Leading blocks of `hashes` this replica has seen."""
        seen = self._blocks.get(replica)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def add(self, replica: Any, hashes: list[bytes]) -> None:
        seen = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self._max:
            seen.popitem(last=False)

    def keep_only(self, replicas: Iterable[Any]) -> None:
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]


def choose(
    matches: dict[Any, int], queue_lens: dict[Any, int | None], min_match_blocks: int, imbalanced_threshold: int
) -> Any | None:
    """The replica to prefer for its cached prefix, or None to route by load alone.

    Pure policy: the longest match wins (ties: the shorter queue), if it is long enough and
    that replica's queue is not longer than the shortest known queue by more than the threshold.
    """
    if not matches:
        return None
    best = max(matches, key=lambda r: (matches[r], -(queue_lens.get(r) or 0)))
    if matches[best] < min_match_blocks:
        return None
    known = [q for q in queue_lens.values() if q is not None]
    best_queue = queue_lens.get(best)
    if best_queue is not None and known and best_queue - min(known) > imbalanced_threshold:
        return None
    return best


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Configured by `request_router_config` on the LLMServer deployment (deployments/app.py
    sets it when `routing: prefix_affinity`)."""

    def initialize_state(
        self,
        block_chars: int = 64,
        min_match_blocks: int = 2,
        imbalanced_threshold: int = 8,
        max_blocks_per_replica: int = 65536,
    ) -> None:
        self._block_chars = block_chars
        self._min_match_blocks = min_match_blocks
        self._imbalanced_threshold = imbalanced_threshold
        self._index = PrefixIndex(max_blocks_per_replica)

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
        matches = {r.replica_id: self._index.matched(r.replica_id, hashes) for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queue_lens = {r.replica_id: cache.get(r.replica_id) for r in candidate_replicas}
        best = choose(matches, queue_lens, self._min_match_blocks, self._imbalanced_threshold)
        if best is None:
            return by_load
        return [[r for r in candidate_replicas if r.replica_id == best], candidate_replicas]

    def _get_pending_request_matching_metadata(self, request_metadata: Any = None) -> PendingRequest | None:
        """A replica chosen for a request goes to that request while it still waits; else to
        the oldest waiting one (FIFOMixin's order). Serve's non-FIFO mode would give the
        exact match only, and in Ray 2.60 it lost requests that arrived together."""
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes(pending_request)
        if hashes:
            self._index.add(replica_id, hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._index.keep_only(r.replica_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.keep_only(self.curr_replicas)

    def _hashes(self, pending_request: PendingRequest | None) -> list[bytes]:
        args = pending_request.args if pending_request is not None else None
        if not args or not isinstance(args[0], GenerateRequest):
            return []
        return block_hashes(prompt_text(args[0]), self._block_chars)
