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


def per_replica(http: httpx.Client, name: str) -> dict[str, float]:
    """One counter's value on each LLM server replica (the hub labels each sample with it)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == name and "replica" in s.labels:
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def test_a_replica_added_under_load_takes_its_share_of_known_prefixes_from_the_kv_tier(server: str) -> None:
    """Serve's autoscaler adds a second replica while every prefix of the load is held by the
    first: the router's directory says the node's store holds them too, so the new replica is
    sent its share at once (the overflow rule alone, a queue longer by more than
    `imbalanced_threshold`, never fires under 8 clients) and loads them instead of computing."""
    import threading

    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs
    from deployments.prefix_keys import BLOCK_CHARS, request_hashes, unpack
    from deployments.types import GenerateRequest

    config = ShardserveArgs.model_validate({**TEST_ARGS, "routing": "prefix_affinity"})
    prefixes = [f"Manual {i} {uuid.uuid4().hex}: " + "the pump must be primed before the valve opens. " * 14 for i in range(4)]
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 600}
    serve.run(bind_app(config, {"autoscaling_config": scaling}), name="scaled", route_prefix="/scaled")
    stop = threading.Event()
    try:
        handle = serve.get_deployment_handle("LLMServer", "scaled")
        with httpx.Client(base_url=f"{server}/scaled", timeout=60) as http:

            def ask(prefix: str) -> None:
                body = {"prompt": prefix + f" Question {uuid.uuid4().hex}?", "max_tokens": 4, "temperature": 0, "cache": False}
                res = http.post("/v1/completions", json=body)
                assert res.status_code == 200, res.text

            for _ in range(3):  # seen twice, a prompt's chunks are saved to the node's store
                for p in prefixes:
                    ask(p)
            first = GenerateRequest(prompt=prefixes[0])

            def in_store() -> bool:
                report = handle.record_routing_stats.remote().result()
                return all(h[:8] in unpack(report["kv_tier"]) for h in request_hashes(first, BLOCK_CHARS)[:8])

            wait_until(in_store, timeout_s=30, interval_s=0.5)

            def pushed() -> dict[str, float] | None:  # the replica pushes its counters every few seconds
                served = per_replica(http, "shardserve:request_success_total")
                return served if sum(served.values()) >= 12 else None

            (old,) = wait_until(pushed, timeout_s=20, interval_s=0.5)

            def client(k: int) -> None:
                while not stop.is_set():
                    ask(prefixes[k % len(prefixes)])

            clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
            for t in clients:
                t.start()

            def new_replica_served() -> tuple[str, float] | None:
                served = per_replica(http, "shardserve:request_success_total")
                new = [(r, n) for r, n in served.items() if r != old and n >= 8]
                return new[0] if new else None

            new, _ = wait_until(new_replica_served, timeout_s=150, interval_s=0.5)
            stop.set()
            for t in clients:
                t.join(timeout=60)
            loaded = per_replica(http, "shardserve:kv_tier_hit_tokens_total")
            assert loaded.get(new, 0.0) > 0, loaded  # its known prefixes came from the store
    finally:
        stop.set()
        serve.delete("scaled")
