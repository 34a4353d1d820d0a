"""The exact-result cache in front of the LLM server.

A request is cached only when its answer is reproducible: greedy (temperature 0), or sampled
with an explicit seed (the engine seeds each position from the request seed alone, so the same
seed gives the same tokens whatever shares the batch). The key hashes the model name and
version, the served checkpoint's fingerprint (weights, tokenizer, generation defaults: another
checkpoint served under the same name and version never gets this one's answers), the tenant,
and every field of the request that can change the answer, with the model's sampling defaults
filled in; entries are JSON (never pickle: a shared Redis must not be a way to run code in the
ingress).

A cache failure never fails a request: a Redis that is down or slower than `redis_timeout_s`
is logged, counted, and the request is served uncached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Protocol

from deployments.config import ResultCacheConfig
from deployments.tools import ToolCallDelta
from deployments.types import GenerateChunk, GenerateRequest, GenerateResponse

logger = logging.getLogger("ray.serve")

# Fields of GenerateRequest that say how to serve it, not what the answer is.
_NOT_IN_KEY = {"cache"}


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """LRU bounded by entries and bytes, entries expire after the TTL. One per ingress replica."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_entries, self._max_bytes, self._ttl_s = max_entries, max_bytes, ttl_s
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self._ttl_s, value)
        self.bytes += len(value)
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= len(value)


class RedisBackend:
    """One Redis shared by every ingress replica; Redis's TTL and its maxmemory policy bound it."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float) -> None:
        import redis.asyncio as redis  # the `redis` extra; only needed when a URL is configured

        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout_s = timeout_s

    async def get(self, key: str) -> bytes | None:
        async with asyncio.timeout(self._timeout_s):
            return await self._client.get(key)

    async def put(self, key: str, value: bytes) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._client.set(key, value, px=self._ttl_ms)

    async def close(self) -> None:
        await self._client.aclose()


class CacheEvents(Protocol):
    """Where hits, misses and errors are counted (the metrics module)."""

    def cache_event(self, event: str) -> None: ...


class ResultCache:
    def __init__(self, config: ResultCacheConfig, model_name: str, model_version: int, events: CacheEvents) -> None:
        self._config = config
        self._scope = f"{model_name}:{model_version}"
        self._events = events
        self.backend: CacheBackend = (
            RedisBackend(config.url, config.ttl_s, config.redis_timeout_s)
            if config.url
            else MemoryBackend(config.max_entries, config.max_bytes, config.ttl_s)
        )

    def key(self, request: GenerateRequest, *, fingerprint: str, tenant: str | None = None) -> str | None:
        """The entry's key, or None when the request must not be cached (opted out, or its
        answer is not reproducible). `request` has the model's sampling defaults filled in
        (`GenerateRequest.with_defaults`); `fingerprint` is the checkpoint's (`ModelCard`)."""
        if not self._config.enabled or not request.cache:
            return None
        if not request.reproducible:
            return None
        fields = request.model_dump(mode="json", exclude=_NOT_IN_KEY)
        payload = {"model": fingerprint, "tenant": tenant, "request": fields}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return f"shardserve:result:{self._scope}:{digest}"

    async def lookup(self, key: str) -> GenerateResponse | None:
        try:
            raw = await self.backend.get(key)
        except Exception as exc:  # noqa: BLE001 - any backend failure means "serve uncached"
            self._failed("lookup", exc)
            return None
        if raw is None:
            self._events.cache_event("miss")
            return None
        try:
            response = GenerateResponse.model_validate_json(raw)
        except ValueError as exc:  # an entry written by another version, or corrupted
            self._failed("decode", exc)
            return None
        self._events.cache_event("hit")
        return response.model_copy(update={"cached": True, "request_id": uuid.uuid4().hex, "created": int(time.time())})

    async def store(self, key: str, response: GenerateResponse) -> None:
        value = response.model_dump_json().encode()
        if len(value) > self._config.max_entry_bytes:
            return
        try:
            await self.backend.put(key, value)
        except Exception as exc:  # noqa: BLE001 - a failed store only loses a future hit
            self._failed("store", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        self._events.cache_event("error")
        detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        logger.warning("result cache %s failed, serving uncached: %s", what, detail)


def replay(response: GenerateResponse) -> list[GenerateChunk]:
    """A cached answer as a stream: one chunk per output carrying its whole text."""
    return [
        GenerateChunk(
            request_id=response.request_id,
            index=out.index,
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            logprobs=out.logprobs,
            prompt_logprobs=out.prompt_logprobs,
            tool_calls=[ToolCallDelta.whole(i, c) for i, c in enumerate(out.tool_calls)] if out.tool_calls else None,
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=len(out.token_ids),
            cached=True,
        )
        for out in response.outputs
    ]
