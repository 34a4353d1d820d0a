"""The node's KV store: chunks of KV blocks in shared memory, owned by one actor per node, not by
the replicas that wrote them, so they outlive a replica's crash, redeploy or scale-down.

A chunk is a run of consecutive blocks (every layer, each rank's shard in a file of its own:
`parallel.kv_tier.chunk_files`), named by the key of its last block, which covers the whole
prefix before it (`deployments.engine.kv_keys`). Writers write a part file and `commit` it; the
store renames it into place, accounts its bytes and evicts the least recently used chunks past
its budget. A `lookup` answers which leading chunks of a prompt are held (pinned for a while so
that a load in flight does not lose its file) and how often each of the others was asked for,
so that a replica stores only prefixes seen more than once (as Dynamo's KVBM decides). It is a
cache, not a source of truth: whatever fails on the way is a recompute for the replica.

The class is plain Python (tests use it in-process); `parallel.kv_tier.node_store` runs it as
each node's Ray actor and moves chunks between nodes. Its files are raw bytes read with a
digest, never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STORE_NAMESPACE = "shardserve"
"""The Ray namespace of the store actors, whatever namespace a Serve app runs in."""


@dataclass(frozen=True)
class HeldChunk:
    path: str
    """The chunk's files, "{rank}" standing for each rank's."""
    checksums: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class LookupReply:
    held: list[HeldChunk]
    """The leading chunks of those asked for that the store holds, in order."""
    sightings: list[int]
    """For each chunk asked for: how many lookups asked for it while it was not held, this one
    included (0 where held). The caller decides from it what is worth storing."""


@dataclass
class _Entry:
    path: str
    checksums: tuple[str, ...]
    nbytes: int
    pinned_until: float = 0.0


@dataclass
class StoreStats:
    held_chunks: int = 0
    held_bytes: int = 0
    budget_bytes: int = 0
    lookups: int = 0
    chunks_asked: int = 0
    chunks_hit: int = 0
    commits: int = 0
    committed_bytes: int = 0
    evictions: int = 0
    refused: int = 0
    dropped: int = 0
    pulled: int = 0
    """Chunks pulled from other nodes' stores (parallel.kv_tier.node_store)."""
    directory: str = ""


def default_directory(node_id: str) -> Path:
    """Shared memory (a tmpfs: RAM, not disk) where the system has it."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"shardserve-kv-{node_id[:16]}"


class KVStore:
    def __init__(self, directory: str, budget_bytes: int, pin_s: float = 30.0, live_nodes: list[str] | None = None) -> None:
        """Starts empty: files a dead store left in `directory` are unknown, so they go, and
        so do the directories of stores of nodes no longer in the cluster (`live_nodes`: their
        ids; a node's id changes when Ray restarts on it)."""
        self._dir = Path(directory)
        shutil.rmtree(self._dir, ignore_errors=True)
        if live_nodes is not None:
            live = {default_directory(n).name for n in live_nodes}
            for other in self._dir.parent.glob("shardserve-kv-*"):
                if other.name not in live:
                    shutil.rmtree(other, ignore_errors=True)
        self._dir.mkdir(parents=True)
        self._budget = budget_bytes
        self._pin_s = pin_s
        self._chunks: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._sightings: OrderedDict[bytes, int] = OrderedDict()
        self._max_sightings = 1 << 20
        self._stats = StoreStats(budget_bytes=budget_bytes, directory=str(self._dir))
        logger.info("KV store in %s, budget %.0f MiB", self._dir, budget_bytes / 2**20)

    # ---- what replicas call -----------------------------------------------------------------

    def directory(self) -> str:
        return str(self._dir)

    def lookup(self, keys: list[bytes]) -> LookupReply:
        """The longest run of held chunks from the first key, pinned; the rest counted as seen."""
        now = time.monotonic()
        self._stats.lookups += 1
        self._stats.chunks_asked += len(keys)
        held: list[HeldChunk] = []
        sightings: list[int] = []
        for key in keys:
            entry = self._chunks.get(key)
            if entry is not None:
                if len(held) == len(sightings):  # still in the leading run
                    self._chunks.move_to_end(key)
                    entry.pinned_until = now + self._pin_s
                    held.append(HeldChunk(entry.path, entry.checksums, entry.nbytes))
                sightings.append(0)
                continue
            seen = self._sightings.pop(key, 0) + 1
            self._sightings[key] = seen
            sightings.append(seen)
        while len(self._sightings) > self._max_sightings:
            self._sightings.popitem(last=False)
        self._stats.chunks_hit += len(held)
        return LookupReply(held, sightings)

    def held_runs(self, runs: list[list[bytes]]) -> list[int]:
        """How many chunks of each run, from its first, this store holds; nothing changes (no
        sighting, no pin, no LRU move): the router's directory asks, not a load."""
        out = []
        for keys in runs:
            n = 0
            while n < len(keys) and keys[n] in self._chunks:
                n += 1
            out.append(n)
        return out

    def commit(self, key: bytes, part: str, checksums: list[str], nbytes: list[int]) -> bool:
        """Take a written chunk in (every rank's part file, with the digests its writer
        computed); False when it is refused (a part missing, or no room once every unpinned
        chunk is evicted), its parts then deleted."""
        parts = [rank_file(part, r) for r in range(len(checksums))]
        if key in self._chunks:  # another replica's copy came first
            self._chunks.move_to_end(key)
            _unlink(parts)
            return True
        total = sum(nbytes)
        try:
            sizes_ok = all(p.stat().st_size == n for p, n in zip(parts, nbytes, strict=True))
        except OSError:
            sizes_ok = False
        if not sizes_ok or not self._make_room(total):
            self._stats.refused += 1
            _unlink(parts)
            return False
        final = str(self._dir / f"{key.hex()}.r{{rank}}")
        for r, p in enumerate(parts):
            os.replace(p, rank_file(final, r))
        self._chunks[key] = _Entry(final, tuple(checksums), total)
        self._sightings.pop(key, None)
        self._stats.commits += 1
        self._stats.committed_bytes += total
        self._stats.held_bytes += total
        return True

    def drop(self, key: bytes, checksums: tuple[str, ...]) -> None:
        """Forget a chunk a reader found gone or not what was recorded (`checksums`: what it
        was told), unless the store holds another copy of it by now."""
        entry = self._chunks.get(key)
        if entry is not None and entry.checksums == tuple(checksums):
            del self._chunks[key]
            self._remove(entry)
            self._stats.dropped += 1

    def discard(self, part: str) -> None:
        """Delete a save's part files (some rank could not write its own: never committed)."""
        pattern = Path(part.replace("{rank}", "*"))  # every rank's file
        if pattern.parent == self._dir:
            _unlink(list(self._dir.glob(pattern.name)))

    def stats(self) -> StoreStats:
        self._stats.held_chunks = len(self._chunks)
        return self._stats

    # ---- internals --------------------------------------------------------------------------

    def _make_room(self, nbytes: int) -> bool:
        if self._stats.held_bytes + nbytes <= self._budget:
            return True
        if nbytes > self._budget:
            return False
        now = time.monotonic()
        victims = []
        room = self._budget - self._stats.held_bytes
        for key, entry in self._chunks.items():  # least recently used first
            if room >= nbytes:
                break
            if entry.pinned_until <= now:
                victims.append(key)
                room += entry.nbytes
        if room < nbytes:
            return False
        for key in victims:
            self._remove(self._chunks.pop(key))
            self._stats.evictions += 1
        return True

    def _remove(self, entry: _Entry) -> None:
        self._stats.held_bytes -= entry.nbytes
        _unlink([rank_file(entry.path, r) for r in range(len(entry.checksums))])


def _unlink(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def new_digest() -> hashlib.blake2b:
    """A chunk file's digest as writers compute it and the store records it, to feed in parts."""
    return hashlib.blake2b(digest_size=16)


def digest(data: bytes | memoryview | mmap.mmap) -> str:
    check = new_digest()
    check.update(data)
    return check.hexdigest()


def rank_file(path: str, rank: int) -> Path:
    """One rank's file of a chunk whose files are named by `path` ("{rank}" standing for it)."""
    return Path(path.replace("{rank}", str(rank)))


def part_path(directory: str, key: bytes, writer: str) -> str:
    """Where a writer puts its copy of a chunk before `commit` ("{rank}": each rank's file)."""
    return os.path.join(directory, f"{key.hex()}.{writer}.r{{rank}}.part")
