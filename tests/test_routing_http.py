"""Prefix-aware routing across two replicas: every later turn of a chat finds its earlier turns
in the KV cache of the replica it is sent to."""

from __future__ import annotations

import uuid

import httpx

from .conftest import TEST_ARGS, wait_until
from .test_metrics import scrape, value


def test_chat_turns_follow_their_prefix_to_one_replica(server: str) -> None:
    from ray import serve

    from deployments.app import bind_app, llm_server_options
    from deployments.config import ShardserveArgs

    config = ShardserveArgs.model_validate({**TEST_ARGS, "routing": "prefix_affinity"})
    assert "request_router_config" in llm_server_options(config)
    serve.run(bind_app(config, {"num_replicas": 2}), name="routed", route_prefix="/routed")
    try:
        with httpx.Client(base_url=f"{server}/routed", timeout=60) as http:
            wait_until(lambda: value(scrape(http), "shardserve:num_replicas", deployment="LLMServer") == 2, timeout_s=30)
            before = scrape(http)
            sent_prompt_tokens, reusable = 0, 0
            for _ in range(6):
                messages = [{"role": "system", "content": f"Conversation {uuid.uuid4().hex}. " + "Be brief and kind. " * 12}]
                previous_prompt = 0
                for turn in range(3):
                    messages.append({"role": "user", "content": f"Question number {turn} about the topic?"})
                    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "cache": False}
                    res = http.post("/v1/chat/completions", json=body)
                    assert res.status_code == 200, res.text
                    usage = res.json()["usage"]
                    sent_prompt_tokens += usage["prompt_tokens"]
                    reusable += previous_prompt
                    previous_prompt = usage["prompt_tokens"]
                    messages.append({"role": "assistant", "content": res.json()["choices"][0]["message"]["content"]})

            def delta(name: str) -> float:
                return value(after, name) - value(before, name)

            def caught_up() -> bool:
                nonlocal after
                after = scrape(http)
                return delta("shardserve:prompt_tokens_total") == sent_prompt_tokens

            after = before
            wait_until(caught_up, timeout_s=20, interval_s=0.5)
            # Whole blocks of every earlier turn's prompt were found cached (a block or two is
            # lost at each turn's boundary); a turn sent to the other replica would find none.
            hits = delta("shardserve:prefix_cache_hits_total")
            assert hits >= 0.8 * reusable, (hits, reusable)
    finally:
        serve.delete("routed")
