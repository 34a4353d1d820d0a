"""The replica's side of the cluster KV tier: its node's store, asked about each prompt before it
is queued, and told about each chunk the engine saved.

Everything here fails soft: a store that does not answer within `lookup_timeout_ms`, a dead
store actor or a refused commit only means the prompt is computed, as without the tier. The
engine reaches the store only through this object (`deployments.engine.kv_tier.TierSink`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import uuid
from typing import Any

from deployments.config import KVTierConfig, ShardserveArgs
from deployments.engine.kv_keys import BlockKey
from deployments.engine.kv_tier import TierChunk, TierHint
from parallel.kv_tier.node_store import store_for_node
from parallel.kv_tier.store import default_directory, part_path
from parallel.runner import ChunkWritten, ModelRunner

logger = logging.getLogger("ray.serve")


class KVTierClient:
    def __init__(self, store: Any, directory: str, config: KVTierConfig) -> None:
        """`store`: the node's store actor (or, in tests without Ray, a KVStore itself)."""
        self._store = store
        self._directory = directory
        self._config = config
        self._writer = uuid.uuid4().hex[:12]
        self._saves = itertools.count()
        self.lookups = 0
        self.lookup_failures = 0

    @classmethod
    def for_this_node(cls, config: KVTierConfig) -> KVTierClient | None:
        """The client of this node's store (started if it is not running); None, and a
        warning, when it cannot be reached: the replica then serves without the tier."""
        import ray

        try:
            base = default_directory(ray.get_runtime_context().get_node_id()).parent
            budget = config.memory_mb * 2**20 if config.memory_mb else int(shutil.disk_usage(base).free * config.memory_fraction)
            store = store_for_node(budget)
            directory = ray.get(store.directory.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the tier is an optimisation; serve without it
            logger.warning("KV tier off for this replica: its node's store did not start (%s: %s)", type(exc).__name__, exc)
            return None
        logger.info("KV tier: node store in %s", directory)
        return cls(store, directory, config)

    @property
    def chunk_blocks(self) -> int:
        return self._config.chunk_blocks

    async def hint(self, keys: list[BlockKey]) -> TierHint | None:
        """What the store holds of a prompt's chunks (and wants of them); None when it does not
        answer in time."""
        if not keys:
            return None
        self.lookups += 1
        try:
            reply = await asyncio.wait_for(self._call("lookup", keys), self._config.lookup_timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - a timeout, a dead store: compute the prompt
            self.lookup_failures += 1
            logger.debug("KV tier lookup failed: %s: %s", type(exc).__name__, exc)
            return None
        held = [TierChunk(h.path, h.checksums, h.nbytes) for h in reply.held]
        wanted = {i for i, seen in enumerate(reply.sightings) if seen >= self._config.min_sightings}
        return TierHint(self._config.chunk_blocks, list(keys), held, wanted)

    async def held_runs(self, runs: list[list[BlockKey]]) -> list[int] | None:
        """How many chunks of each run the store holds (for the router's directory); None when
        it does not answer in time."""
        try:
            return await asyncio.wait_for(self._call("held_runs", runs), self._config.lookup_timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - the directory then reports nothing from the tier
            logger.debug("KV tier held_runs failed: %s: %s", type(exc).__name__, exc)
            return None

    def part_path(self, key: BlockKey) -> str:
        """Unique to this save: two saves of one chunk in flight never share a file."""
        return part_path(self._directory, key, f"{self._writer}-{next(self._saves)}")

    def commit(self, key: BlockKey, part: str, written: tuple[ChunkWritten, ...]) -> None:
        """Hand the chunk to the store without waiting: if it refuses or is gone, the part
        files are left for it (refused) or for the next store on the node (gone) to delete."""
        self._tell("commit", key, part, [w.checksum for w in written], [w.nbytes for w in written])

    def forget(self, key: BlockKey, checksums: tuple[str, ...]) -> None:
        self._tell("drop", key, checksums)

    def discard(self, part: str) -> None:
        self._tell("discard", part)

    def _tell(self, method: str, *args: Any) -> None:
        """Call the store without waiting for its answer."""
        fn = getattr(self._store, method)
        fn.remote(*args) if hasattr(fn, "remote") else fn(*args)

    async def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self._store, method)
        if hasattr(fn, "remote"):
            return await fn.remote(*args)
        return fn(*args)


def tier_client(args: ShardserveArgs, runner: ModelRunner) -> KVTierClient | None:
    """The replica's client of its node's store, or None where the tier is off: by config,
    without prefix caching, or with ranks on other nodes than the replica's (chunk files do not
    cross nodes; the stores pull them for the replicas of their own node)."""
    if not (args.kv_tier.enabled and args.engine.enable_prefix_caching):
        return None
    import ray

    here = ray.get_runtime_context().get_node_id()
    reports = getattr(runner, "reports", None) or []  # a sharded runner's ranks
    if any(r.node_id != here for r in reports):
        logger.warning("KV tier off for this replica: some of its ranks are on other nodes than its node store")
        return None
    return KVTierClient.for_this_node(args.kv_tier)
