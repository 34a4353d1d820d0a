"""A chunk of the cluster KV tier as a file: several consecutive blocks of one rank's pool, every
layer, contiguous, behind a small fixed header. No pickle: the header is a struct of integers
and the dtype's name, the rest raw K/V bytes, and the whole file has a digest the store keeps.

Layout after the header: [blocks, 2 (K, V), layers, block_size, kv_heads, head_dim], so the
blocks of a chunk are contiguous runs (a load that needs only the chunk's tail reads those).
The files live in shared memory (/dev/shm) owned by the node's store actor; the process that
holds the pool (the replica, its model process or a rank actor) reads and writes them directly.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

import torch

from parallel.kv_tier.store import digest, new_digest, rank_file
from parallel.model.paged_model import PagedKVCache
from parallel.runner import ChunkCopy, ChunkWritten, LoadOutcome, StepInput

logger = logging.getLogger(__name__)

MAGIC = b"SSKVCHK1"
_HEADER = struct.Struct("<8sIIIIII16s")  # magic, blocks, layers, block_size, heads, head_dim, elem, dtype
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank_path(copy: ChunkCopy, rank: int) -> str:
    return str(rank_file(copy.path, rank))


def write_chunk(cache: PagedKVCache, copy: ChunkCopy, rank: int) -> ChunkWritten:
    """The chunk's blocks, every layer, written to this rank's file."""
    ids = torch.tensor(copy.block_ids, device=cache.k.device)
    kv = torch.stack((cache.k.index_select(1, ids), cache.v.index_select(1, ids)))  # [2, L, n, bs, h, d]
    data = kv.permute(2, 0, 1, 3, 4, 5).contiguous().cpu()
    _, layers, _, block_size, heads, head_dim = kv.shape
    dtype = str(cache.k.dtype).removeprefix("torch.")
    header = _HEADER.pack(MAGIC, len(copy.block_ids), layers, block_size, heads, head_dim, data.element_size(), dtype.encode())
    payload = memoryview(data.view(torch.uint8).numpy()).cast("B")
    check = new_digest()  # over the header and the payload, without joining them
    check.update(header)
    check.update(payload)
    path = rank_path(copy, rank)
    try:
        with open(path, "wb") as fh:
            fh.write(header)
            fh.write(payload)
    except OSError:
        Path(path).unlink(missing_ok=True)  # (shared memory full, say): no half file left behind
        raise
    return ChunkWritten(len(header) + payload.nbytes, check.hexdigest())


def read_chunk(cache: PagedKVCache, copy: ChunkCopy, rank: int) -> LoadOutcome:
    """Copy the chunk's blocks [first, first + n) into the pool. "missing" or "bad" (the blocks
    to be recomputed) when the file is gone, or differs from its digest or from the pool."""
    path = rank_path(copy, rank)
    try:
        fh = open(path, "rb")  # closed by the with below; a missing file is its own outcome
    except OSError:
        return "missing"
    try:
        with fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as buf:
            if copy.checksums and digest(buf) != copy.checksums[rank]:
                raise ValueError("digest differs from the store's")
            _copy_in(cache, copy, buf)  # returns holding no view of the map: it may close
        return "ok"
    except (OSError, ValueError, IndexError, RuntimeError) as exc:
        name = os.path.basename(path)
        logger.warning("KV tier chunk %s not loaded (%s: %s); recomputing its blocks", name, type(exc).__name__, exc)
        return "bad"


def _copy_in(cache: PagedKVCache, copy: ChunkCopy, buf: mmap.mmap) -> None:
    magic, blocks, layers, block_size, heads, head_dim, _, dtype = _HEADER.unpack_from(buf)
    want = (cache.k.shape[0], cache.block_size, cache.k.shape[3], cache.k.shape[4])
    if magic != MAGIC or (layers, block_size, heads, head_dim) != want:
        raise ValueError(f"chunk shape {(layers, block_size, heads, head_dim)} is not the pool's {want}")
    name = dtype.rstrip(b"\0").decode()
    if _DTYPES.get(name) != cache.k.dtype:
        raise ValueError(f"chunk dtype {name} is not the pool's {cache.k.dtype}")
    n = len(copy.block_ids)
    if copy.first + n > blocks:
        raise ValueError(f"blocks {copy.first}..{copy.first + n} asked of a chunk of {blocks}")
    raw = torch.frombuffer(buf, dtype=torch.uint8, offset=_HEADER.size)
    data = raw.view(cache.k.dtype).view(blocks, 2, layers, block_size, heads, head_dim)[copy.first : copy.first + n]
    data = data.to(cache.k.device).permute(1, 2, 0, 3, 4, 5)  # [2, L, n, bs, h, d]
    ids = torch.tensor(copy.block_ids, device=cache.k.device)
    cache.k.index_copy_(1, ids, data[0])
    cache.v.index_copy_(1, ids, data[1])
    del raw, data


def apply_copies(
    cache: PagedKVCache, host: PagedKVCache | None, step: StepInput, rank: int = 0
) -> tuple[list[ChunkWritten | None], list[LoadOutcome]]:
    """A step's copies on one rank, before its forward. Reads first: blocks evicted to the host
    tier and chunks saved to the cluster tier (this step may write over both); then writes:
    blocks back from the host tier and chunks loaded from the cluster tier."""
    if step.offloads:
        assert host is not None, "offloads without a host tier"
        _move_blocks(cache, host, step.offloads)
    saved: list[ChunkWritten | None] = []
    for copy in step.saves:
        try:
            saved.append(write_chunk(cache, copy, rank))
        except OSError as exc:
            logger.warning("KV tier chunk %s not saved (%s)", os.path.basename(rank_path(copy, rank)), exc)
            saved.append(None)
    if step.onloads:
        assert host is not None, "onloads without a host tier"
        _move_blocks(host, cache, step.onloads)
    loaded = [read_chunk(cache, copy, rank) for copy in step.loads]
    return saved, loaded


def _move_blocks(src: PagedKVCache, dst: PagedKVCache, pairs: tuple[tuple[int, int], ...]) -> None:
    """Copy K and V of blocks `pairs[i][0]` of src into blocks `pairs[i][1]` of dst, whichever
    devices the two are on."""
    ids = torch.tensor(pairs, dtype=torch.long).T
    for a, b in ((src.k, dst.k), (src.v, dst.v)):
        b.index_copy_(1, ids[1].to(b.device), a.index_select(1, ids[0].to(a.device)).to(b.device))
