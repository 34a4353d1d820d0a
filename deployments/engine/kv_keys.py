"""Keys of KV blocks that mean the same thing in every process and on every node.

A full block's key is SHA-256 over its parent's key and its own tokens, so equal keys mean equal
prefixes (vLLM's chained block hash). The chain starts at a namespace root that holds
everything else that makes K/V differ for the same tokens: the checkpoint's fingerprint, the KV
dtype, the block size, the tensor/pipeline layout (each rank's shard differs), the adapter and
the tenant's salt. A key is 32 bytes, so it travels: the prefix cache of one replica, the
cluster tier's chunks and the router's directory all speak it.

Python's `hash()` of a tuple, used before, is neither collision-resistant (a client who knows
another user's prefix could craft tokens whose block collides with it and be answered from that
user's KV, vLLM's CVE-2025-25183) nor equal across processes (string hashing is salted per
process).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

BlockKey = bytes
"""A block's 32-byte chained SHA-256."""

_VERSION = b"shardserve-kv-1"


@dataclass(frozen=True)
class KVNamespace:
    """What besides the tokens decides a block's K/V. Any change starts a new namespace, so KV
    made by other weights under the same model name is never read."""

    model_fingerprint: str
    """The checkpoint's fingerprint (`ServedCheckpoint.fingerprint`: weights, config, dtype)."""
    kv_dtype: str
    block_size: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    adapter: str | None = None

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ValueError("a KV namespace needs the model's fingerprint: without it, keys would not name the weights")

    def root(self, salt: str | None = None) -> BlockKey:
        """The chain's start for one tenant (`salt`) or for requests without one: a salted
        root shares nothing with another salt's nor with the unsalted one."""
        fields = json.dumps(asdict(self), sort_keys=True).encode()
        tenant = b"\x00" if salt is None else b"\x01" + salt.encode()
        return hashlib.sha256(_VERSION + b"\x00" + fields + b"\x00" + tenant).digest()


def chain_key(parent: BlockKey, tokens: Sequence[int]) -> BlockKey:
    """The key of a block of `tokens` after the block whose key is `parent`."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}I", *tokens)).digest()


def chunk_key(last_block: BlockKey, chunk_blocks: int) -> BlockKey:
    """The key of the chunk of `chunk_blocks` blocks that ends with the block `last_block`: the
    size is in it, so replicas configured with other chunk sizes never read each other's."""
    return hashlib.sha256(b"chunk" + struct.pack("<I", chunk_blocks) + last_block).digest()


def block_keys(root: BlockKey, tokens: Sequence[int], block_size: int) -> list[BlockKey]:
    """Keys of every full block of `tokens`, from the root."""
    keys, parent = [], root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_key(parent, tokens[start : start + block_size])
        keys.append(parent)
    return keys
