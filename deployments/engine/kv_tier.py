"""What the engine does with the cluster KV tier: which of a new sequence's blocks to load from it
instead of computing, and which of its computed chunks to save to it. Pure logic over a block
table; the copies themselves are the runner's (`StepInput.saves` / `loads`), and the store is
reached through the replica (`TierSink`), so the engine imports neither Ray nor the store.

A chunk is `chunk_blocks` consecutive full blocks from the start of the prompt; its key is the
key of its last block. A load covers the chunks the tier holds past what the replica's own pool
already has (the first of them perhaps only in part). The sequence waits one step for it: the
forward that follows never depends on a copy that may fail, and a failed chunk (a file gone, a
digest that differs, a rank that could not read it) is computed like any uncached block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from deployments.engine.kv_keys import BlockKey
from parallel.runner import ChunkCopy, ChunkWritten


@dataclass(frozen=True)
class TierChunk:
    path: str
    checksums: tuple[str, ...]
    nbytes: int


@dataclass
class TierHint:
    """What the tier said about one prompt when it arrived."""

    chunk_blocks: int
    keys: list[BlockKey]
    """Key of each whole chunk of the prompt (those that hold no token to compute)."""
    held: list[TierChunk]
    """The leading chunks the tier holds."""
    wanted: set[int]
    """Chunks to save once computed (asked for often enough)."""
    queued: set[int] = field(default_factory=set)
    """Chunks whose save is queued or done."""


@dataclass
class TierLoad:
    """A sequence's load in flight: one copy per chunk, in order."""

    copies: list[ChunkCopy]
    keys: list[BlockKey]
    """Each copy's chunk key."""
    ends: list[int]
    """Block count computed once each chunk, and every one before it, has loaded."""
    nbytes: int
    started: float


class TierSink(Protocol):
    """The replica's side of the tier, as the engine sees it."""

    def part_path(self, key: BlockKey) -> str:
        """Where a save of the chunk `key` is written ("{rank}": each rank's file)."""
        ...

    def commit(self, key: BlockKey, part: str, written: tuple[ChunkWritten, ...]) -> None:
        """Hand a written chunk to the store (without waiting for it)."""
        ...

    def forget(self, key: BlockKey, checksums: tuple[str, ...]) -> None:
        """A chunk's files are gone or not what the store recorded (`checksums`): the store
        drops it, unless it holds another copy by now."""
        ...

    def discard(self, part: str) -> None:
        """A save failed on some rank: the files the others wrote go."""
        ...


def plan_load(hint: TierHint, blocks: list[int], local_blocks: int, usable_blocks: int, started: float) -> TierLoad | None:
    """Copies of the held chunks past the `local_blocks` the pool already has, up to
    `usable_blocks` (the prompt's last token is always computed: its logits are needed)."""
    cb = hint.chunk_blocks
    end = min(len(hint.held) * cb, usable_blocks)
    if end <= local_blocks:
        return None
    copies, keys, ends, nbytes = [], [], [], 0
    for c in range(local_blocks // cb, -(-end // cb)):
        lo, hi = max(local_blocks, c * cb), min(end, (c + 1) * cb)
        chunk = hint.held[c]
        copies.append(ChunkCopy(chunk.path, tuple(blocks[lo:hi]), lo - c * cb, chunk.checksums))
        keys.append(hint.keys[c])
        ends.append(hi)
        nbytes += chunk.nbytes * (hi - lo) // cb
    return TierLoad(copies, keys, ends, nbytes, started)


def loaded_blocks(load: TierLoad, local_blocks: int, loaded: list[bool]) -> int:
    """Blocks usable once the copies are done: up to the first chunk that failed."""
    usable = local_blocks
    for ok, end in zip(loaded, load.ends, strict=True):
        if not ok:
            break
        usable = end
    return usable


def due_saves(hint: TierHint, blocks: list[int], computed_blocks: int, sink: TierSink) -> list[tuple[BlockKey, ChunkCopy]]:
    """Saves of wanted chunks whose blocks are all computed now (marked queued)."""
    cb = hint.chunk_blocks
    out = []
    for c in sorted(hint.wanted - hint.queued):
        if (c + 1) * cb > computed_blocks or (c + 1) * cb > len(blocks):
            continue
        hint.queued.add(c)
        key = hint.keys[c]
        out.append((key, ChunkCopy(sink.part_path(key), tuple(blocks[c * cb : (c + 1) * cb]))))
    return out
