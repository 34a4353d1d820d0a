"""The result cache's keys, bounds and backends, without Ray (Redis tests use a real server)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from deployments.config import ResultCacheConfig
from deployments.ingress.result_cache import MemoryBackend, ResultCache, replay
from deployments.streams import StreamRecorder
from deployments.types import CompletionOutput, GenerateChunk, GenerateRequest, GenerateResponse, Usage

from .conftest import free_port, wait_until


class Events:
    def __init__(self) -> None:
        self.counts = {"hit": 0, "miss": 0, "error": 0}

    def cache_event(self, event: str) -> None:
        self.counts[event] += 1


def make_cache(**config) -> tuple[ResultCache, Events]:
    events = Events()
    return ResultCache(ResultCacheConfig(**config), "m", 1, events), events


def answer(text: str = "hello", request_id: str = "r1") -> GenerateResponse:
    return GenerateResponse(
        request_id=request_id,
        model="m",
        created=1,
        prompt="p",
        prompt_token_ids=[1, 2],
        outputs=[CompletionOutput(index=0, text=text, token_ids=[5, 6], finish_reason="length")],
        usage=Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
    )


GREEDY = GenerateRequest(prompt="hi", temperature=0, max_tokens=8)
FP = "checkpoint-a"


def test_only_reproducible_requests_get_a_key() -> None:
    cache, _ = make_cache()
    assert cache.key(GREEDY, fingerprint=FP) is not None
    assert cache.key(GenerateRequest(prompt="hi", temperature=0.7, seed=3), fingerprint=FP) is not None
    assert cache.key(GenerateRequest(prompt="hi", temperature=0.7), fingerprint=FP) is None  # sampled, no seed
    assert cache.key(GREEDY.model_copy(update={"cache": False}), fingerprint=FP) is None  # opted out
    off, _ = make_cache(enabled=False)
    assert off.key(GREEDY, fingerprint=FP) is None


def test_every_answer_changing_field_changes_the_key() -> None:
    cache, _ = make_cache()
    variants = [
        GREEDY,
        GREEDY.model_copy(update={"prompt": "hi!"}),
        GREEDY.model_copy(update={"max_tokens": 9}),
        GREEDY.model_copy(update={"stop": ["x"]}),
        GREEDY.model_copy(update={"temperature": 0.5, "seed": 1}),
        GREEDY.model_copy(update={"temperature": 0.5, "seed": 2}),
        GREEDY.model_copy(update={"top_p": 0.9}),
        GREEDY.model_copy(update={"logprobs": 1}),
        GREEDY.model_copy(update={"echo": True}),
        GREEDY.model_copy(update={"n": 2}),
        GREEDY.model_copy(update={"ignore_eos": True}),
        GREEDY.model_copy(update={"repetition_penalty": 1.05}),
        GREEDY.model_copy(update={"top_k": 20}),
        GREEDY.model_copy(update={"min_p": 0.1}),
        GREEDY.model_copy(update={"presence_penalty": 0.5}),
        GREEDY.model_copy(update={"frequency_penalty": 0.5}),
        GREEDY.model_copy(update={"logit_bias": {5: 10.0}}),
        GREEDY.model_copy(update={"logit_bias": {5: -10.0}}),
    ]
    keys = [cache.key(v, fingerprint=FP) for v in variants]
    assert len(set(keys)) == len(variants)
    tenants = [cache.key(GREEDY, fingerprint=FP, tenant=t) for t in ("a", "b", None)]
    assert len(set(tenants)) == 3
    other_version = ResultCache(ResultCacheConfig(), "m", 2, Events())
    other_model = ResultCache(ResultCacheConfig(), "n", 1, Events())
    scopes = [c.key(GREEDY, fingerprint=FP) for c in (cache, other_version, other_model)]
    assert len(set(scopes)) == 3
    # Another checkpoint served under the same name and version: never the same entry.
    assert cache.key(GREEDY, fingerprint="checkpoint-b") != cache.key(GREEDY, fingerprint=FP)
    # `cache` says how to serve the request, not what the answer is: it is not in the key.
    assert cache.key(GREEDY, fingerprint=FP) == make_cache()[0].key(GREEDY.model_copy(), fingerprint=FP)


async def test_hit_miss_and_fresh_request_id() -> None:
    cache, events = make_cache()
    key = cache.key(GREEDY, fingerprint=FP)
    assert await cache.lookup(key) is None
    await cache.store(key, answer())
    hit = await cache.lookup(key)
    assert hit is not None and hit.cached and hit.outputs[0].text == "hello" and hit.request_id != "r1"
    assert events.counts == {"hit": 1, "miss": 1, "error": 0}


async def test_memory_backend_is_lru_bounded_by_entries_and_bytes() -> None:
    backend = MemoryBackend(max_entries=3, max_bytes=10_000, ttl_s=60)
    for k in "abcd":
        await backend.put(k, b"x")
    assert len(backend) == 3 and await backend.get("a") is None
    await backend.get("b")  # b is now the most recently used
    await backend.put("e", b"x")
    assert await backend.get("b") == b"x" and await backend.get("c") is None

    by_bytes = MemoryBackend(max_entries=100, max_bytes=250, ttl_s=60)
    for i in range(10):
        await by_bytes.put(str(i), b"y" * 100)
    assert by_bytes.bytes <= 250 and len(by_bytes) == 2


async def test_memory_bytes_stay_bounded_over_many_unique_prompts() -> None:
    cache, _ = make_cache(max_bytes=200_000, max_entries=100_000)
    for i in range(10_000):
        request = GenerateRequest(prompt=f"prompt {i}", temperature=0)
        await cache.store(cache.key(request, fingerprint=FP), answer(text=f"answer {i}"))
    assert 0 < cache.backend.bytes <= 200_000


async def test_entries_expire_after_ttl() -> None:
    cache, _ = make_cache(ttl_s=0.05)
    key = cache.key(GREEDY, fingerprint=FP)
    await cache.store(key, answer())
    assert await cache.lookup(key) is not None
    await asyncio.sleep(0.1)
    assert await cache.lookup(key) is None


async def test_oversized_answers_are_not_stored() -> None:
    cache, _ = make_cache(max_entry_bytes=256)
    key = cache.key(GREEDY, fingerprint=FP)
    await cache.store(key, answer(text="z" * 1000))
    assert await cache.lookup(key) is None


def test_stream_recorder_rebuilds_the_answer_and_replay_inverts_it() -> None:
    recorder = StreamRecorder(n=2)
    common = {"request_id": "r", "prompt_tokens": 2}
    recorder.add(
        GenerateChunk(index=0, text="he", token_ids=[1], completion_tokens=1, prompt="p", prompt_token_ids=[7, 8], **common)
    )
    recorder.add(GenerateChunk(index=1, text="yo", token_ids=[3], completion_tokens=1, finish_reason="stop", **common))
    assert recorder.response("m", with_logprobs=False) is None  # output 0 not finished yet
    recorder.add(GenerateChunk(index=0, text="llo", token_ids=[2], completion_tokens=2, finish_reason="length", **common))
    whole = recorder.response("m", with_logprobs=False)
    assert whole is not None
    assert [o.text for o in whole.outputs] == ["hello", "yo"] and whole.outputs[0].token_ids == [1, 2]
    assert whole.prompt_token_ids == [7, 8] and whole.usage.completion_tokens == 3
    chunks = replay(whole)
    assert [(c.index, c.text, c.finish_reason, c.cached) for c in chunks] == [
        (0, "hello", "length", True),
        (1, "yo", "stop", True),
    ]


async def test_redis_backend_shares_entries_between_caches(redis_url: str) -> None:
    writer, _ = make_cache(url=redis_url)
    reader, events = make_cache(url=redis_url)  # another ingress replica, or one restarted
    request = GenerateRequest(prompt=f"shared {free_port()}", temperature=0)
    key = writer.key(request, fingerprint=FP)
    await writer.store(key, answer(text="from redis"))
    hit = await reader.lookup(key)
    assert hit is not None and hit.outputs[0].text == "from redis"
    assert events.counts["hit"] == 1
    await writer.backend.close()
    await reader.backend.close()


@pytest.mark.parametrize("kind", ["down", "slow"])
async def test_redis_down_or_slow_means_uncached_not_failed(kind: str) -> None:
    port = free_port()
    stop = threading.Event()
    if kind == "slow":  # accepts connections, never answers
        listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=lambda: (listener.accept(), stop.wait()), daemon=True).start()
    cache, events = make_cache(url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.05)
    key = cache.key(GREEDY, fingerprint=FP)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cache.lookup(key) is None
    await cache.store(key, answer())
    assert loop.time() - started < 1.0
    wait_until(lambda: events.counts["error"] == 2, timeout_s=1)
    stop.set()
    if kind == "slow":
        listener.close()
