"""The router's keys for prompt prefixes, shared by the router (in the ingress) and the replicas
that tell it what they hold.

The router has no tokenizer (the replicas tokenize), so its keys are over the request's text:
chained hashes of fixed-size blocks of characters, each covering everything before it, rooted in
the tenant (whose KV is never shared with another tenant's). A replica, which has both the text
and the tokens, translates what its engine holds (token blocks) into these keys
(`deployments/replica/held_prefixes.py`); the router matches a request's keys against them.

A directory entry is the first `ENTRY_BYTES` of a key: a collision costs a routing choice,
never a token, since the engine checks its own SHA-256 keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from deployments.types import GenerateRequest

BLOCK_CHARS = 64
"""Characters per text block, for the router and the replicas alike (a chat turn's boundary is
lost within one block)."""

ROUTING_STATS_PERIOD_S = 2.0
"""How often Serve asks each replica for its directory entries (`request_routing_stats_period_s`):
well inside the 5 s the router trusts what it sent; Serve's controller also sweeps its health
checks at the shorter of this and the health-check period, so not shorter than needed."""

ENTRY_BYTES = 8
"""Bytes of a key kept in a replica's directory entries (8: 1 in 2^64 per pair compared)."""


def prompt_text(request: GenerateRequest) -> str:
    """The prompt as one string whose prefixes mirror the model's prompt prefixes."""
    if request.messages is not None:
        return "".join(f"\x1e{m.role}\x1f{m.text()}" for m in request.messages)
    if request.prompt_token_ids is not None:
        return ",".join(map(str, request.prompt_token_ids))
    return request.prompt or ""


def block_hashes(text: str, block_chars: int, tenant: str | None = None) -> list[bytes]:
    """Chained hashes of the text's full blocks: equal hashes mean equal prefixes (of one tenant)."""
    hashes = []
    previous = b"" if tenant is None else hashlib.blake2b(b"tenant\x00" + tenant.encode(), digest_size=16).digest()
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + text[start : start + block_chars].encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


def request_hashes(request: GenerateRequest, block_chars: int) -> list[bytes]:
    return block_hashes(prompt_text(request), block_chars, request.tenant)


def pack(hashes: Iterable[bytes]) -> bytes:
    """Directory entries as one compact blob (what a replica reports: no pickle of a set)."""
    return b"".join(sorted({h if len(h) == ENTRY_BYTES else h[:ENTRY_BYTES] for h in hashes}))


def unpack(blob: bytes) -> frozenset[bytes]:
    return frozenset(blob[i : i + ENTRY_BYTES] for i in range(0, len(blob) - ENTRY_BYTES + 1, ENTRY_BYTES))
