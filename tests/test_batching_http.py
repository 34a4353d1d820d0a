"""Continuous batching seen from outside: concurrency and prefix caching never change tokens."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from ray import serve

from deployments.app import build_app

from .conftest import SLOW_MAX_TOKENS, TEST_ARGS, wait_until

PROMPTS = [f"Request number {i}: the {'quick ' * (i % 7)}brown fox {'jumps ' * (i % 5)}over" for i in range(32)]


async def complete(client: httpx.AsyncClient, prompt: str, prefix: str = "") -> str:
    res = await client.post(f"{prefix}/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert res.status_code == 200, res.text
    return res.json()["choices"][0]["text"]


async def test_32_concurrent_requests_match_each_alone(server, engine_stats) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=120, limits=httpx.Limits(max_connections=40)) as client:
        alone = [await complete(client, p) for p in PROMPTS]
        steps_before = (await asyncio.to_thread(engine_stats)).num_steps
        together = await asyncio.gather(*(complete(client, p) for p in PROMPTS))
        steps = (await asyncio.to_thread(engine_stats)).num_steps - steps_before
    assert list(together) == alone
    # Batched: far fewer steps than 32 requests x 24 tokens run one by one.
    assert steps < 32 * 24 / 4, steps


@pytest.fixture(scope="module")
def no_prefix_app(server):
    args = {**TEST_ARGS, "engine": {**TEST_ARGS["engine"], "enable_prefix_caching": False}}
    serve.run(build_app(args), name="noprefix", route_prefix="/noprefix")
    wait_until(lambda: httpx.get(f"{server}/noprefix/ready", timeout=5).status_code == 200, timeout_s=60)
    yield "/noprefix"
    serve.delete("noprefix")


async def test_prefix_caching_on_and_off_give_identical_tokens(server, no_prefix_app, engine_stats) -> None:
    system = "You are a helpful assistant. " * 12
    questions = [f"{system} Question {i}: what is {i} plus {i}?" for i in range(6)]
    before = await asyncio.to_thread(engine_stats)
    async with httpx.AsyncClient(base_url=server, timeout=120) as client:
        on = [await complete(client, q) for q in questions]
        off = [await complete(client, q, no_prefix_app) for q in questions]
    after = await asyncio.to_thread(engine_stats)
    assert on == off
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 5 * 64  # the shared system prompt's blocks


def test_cancelled_stream_frees_its_blocks(slow_app) -> None:
    base, engine_stats = slow_app
    before = engine_stats().generation_tokens
    with httpx.Client(base_url=base, timeout=60) as client:
        body = {"prompt": "Hello there", "max_tokens": SLOW_MAX_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as res:
            events = (line for line in res.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                next(events)
    wait_until(lambda: engine_stats().num_running == 0, timeout_s=20)
    stats = engine_stats()
    assert stats.kv_cache_usage == 0.0
    assert stats.generation_tokens - before < SLOW_MAX_TOKENS  # it stopped early: the client left
