"""Each node's KV store as a Ray actor, and chunks that cross nodes.

Replicas read and write chunk files in their own node's shared memory only. When a replica asks
its store for a prompt's chunks and the store's run stops short, the store asks the other
nodes' stores (found by name) how far they hold the rest, and pulls the longest run from the
one that holds most: each rank's file as raw bytes over Ray, checked against the digests its
store recorded, written and committed here like a replica's save. The request that asked does
not wait for it (its lookup has a deadline of milliseconds); the next ones on this node load
the chunks locally. A peer that is gone, slow or sends bytes that do not match costs nothing but
the pull.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from parallel.kv_tier.store import (
    STORE_NAMESPACE,
    KVStore,
    LookupReply,
    StoreStats,
    default_directory,
    digest,
    part_path,
    rank_file,
)

logger = logging.getLogger(__name__)

MAX_PULLS = 4
"""Pulls in flight at once per store (each of up to a prompt's chunks)."""
PEERS_REFRESH_S = 10.0


def store_name(node_id: str) -> str:
    return f"kv-store-{node_id}"


class NodeStore(KVStore):
    def __init__(self, directory: str, budget_bytes: int, live_nodes: list[str] | None, node_id: str) -> None:
        super().__init__(directory, budget_bytes, live_nodes=live_nodes)
        self._name = store_name(node_id)
        self._peers: list[Any] = []
        self._peers_at = -PEERS_REFRESH_S
        self._pulling: set[bytes] = set()
        self._pull_ids = itertools.count()
        self.pulled_chunks = 0

    async def lookup(self, keys: list[bytes]) -> LookupReply:  # type: ignore[override]
        """KVStore's answer; past its run, a pull of the rest from another node starts."""
        reply = KVStore.lookup(self, keys)
        rest = keys[len(reply.held) :]
        if rest and rest[0] not in self._pulling and len(self._pulling) < MAX_PULLS:
            self._pulling.add(rest[0])
            asyncio.get_running_loop().create_task(self._pull(rest))
        return reply

    # Every method is a coroutine: the actor then runs them all on its event loop, one at a time
    # between awaits, beside the pulls (no lock needed).

    async def directory(self) -> str:  # type: ignore[override]
        return KVStore.directory(self)

    async def commit(self, key: bytes, part: str, checksums: list[str], nbytes: list[int]) -> bool:  # type: ignore[override]
        return KVStore.commit(self, key, part, checksums, nbytes)

    async def drop(self, key: bytes, checksums: tuple[str, ...]) -> None:  # type: ignore[override]
        KVStore.drop(self, key, checksums)

    async def discard(self, part: str) -> None:  # type: ignore[override]
        KVStore.discard(self, part)

    async def stats(self) -> StoreStats:  # type: ignore[override]
        stats = KVStore.stats(self)
        stats.pulled = self.pulled_chunks
        return stats

    async def held_run(self, keys: list[bytes]) -> int:
        """How many of `keys`, from the first, this store holds (a peer asks; nothing changes)."""
        return KVStore.held_runs(self, [keys])[0]

    async def held_runs(self, runs: list[list[bytes]]) -> list[int]:  # type: ignore[override]
        return KVStore.held_runs(self, runs)

    async def read(self, keys: list[bytes]) -> list[tuple[tuple[str, ...], list[bytes]]]:
        """The files of the chunks of `keys` this store holds, from the first, as (digests, each
        rank's bytes): what a peer pulls."""
        out = []
        for key in keys:
            entry = self._chunks.get(key)
            if entry is None:
                break
            try:
                files = [rank_file(entry.path, r).read_bytes() for r in range(len(entry.checksums))]
            except OSError:
                break
            out.append((entry.checksums, files))
        return out

    async def _pull(self, keys: list[bytes]) -> None:
        try:
            peers = self._peer_stores()
            runs = await asyncio.gather(*(p.held_run.remote(keys) for p in peers), return_exceptions=True)
            held = [(n, p) for n, p in zip(runs, peers, strict=True) if isinstance(n, int) and n > 0]
            if not held:
                return
            run, peer = max(held, key=lambda t: t[0])
            chunks = await peer.read.remote(keys[:run])
            for key, (checksums, files) in zip(keys, chunks, strict=False):
                if key in self._chunks:
                    continue
                if len(files) != len(checksums) or any(digest(d) != c for d, c in zip(files, checksums, strict=True)):
                    logger.warning("a chunk pulled from another node is not what its store recorded; not kept")
                    break
                part = part_path(str(self._dir), key, f"pull-{next(self._pull_ids)}")
                for r, data in enumerate(files):
                    rank_file(part, r).write_bytes(data)
                if not KVStore.commit(self, key, part, list(checksums), [len(d) for d in files]):
                    break
                self.pulled_chunks += 1
        except Exception as exc:  # noqa: BLE001 - a pull is an optimisation: the chunks are computed instead
            logger.warning("pulling KV chunks from another node failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._pulling.discard(keys[0])

    def _peer_stores(self) -> list[Any]:
        """The other nodes' stores (looked up by name every PEERS_REFRESH_S)."""
        import ray

        now = time.monotonic()
        if now - self._peers_at >= PEERS_REFRESH_S:
            names = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == STORE_NAMESPACE and a["name"].startswith("kv-store-") and a["name"] != self._name
            ]
            self._peers = [ray.get_actor(n, namespace=STORE_NAMESPACE) for n in names]
            self._peers_at = now
        return self._peers


def store_for_node(budget_bytes: int):
    """This node's store actor, started by the first replica that asks (detached: it belongs
    to no replica, so it outlives them all; `ray.kill` or the cluster's end stops it). Later
    callers get the running one, whatever budget they ask for."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    live = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    return (
        ray.remote(NodeStore)
        .options(
            name=store_name(node_id),
            namespace=STORE_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(str(default_directory(node_id)), budget_bytes, live, node_id)
    )
