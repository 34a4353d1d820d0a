"""The result cache in the running app: HTTP hits and opt-outs, streamed hits, Redis shared
across ingress restarts, a Redis that is down, and one stopped under load and started again."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import TEST_ARGS, free_port, start_redis_server, wait_until


def unique_prompt() -> str:
    return f"The cache test {uuid.uuid4().hex[:8]} says"


def complete(http: httpx.Client, body: dict[str, Any], path: str = "/v1/completions", **kw: Any) -> httpx.Response:
    res = http.post(path, json=body, **kw)
    assert res.status_code == 200, res.text
    return res


def streamed_text(http: httpx.Client, body: dict[str, Any], path: str = "/v1/completions") -> tuple[str, list[dict]]:
    with http.stream("POST", path, json={**body, "stream": True}) as res:
        assert res.status_code == 200
        events = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0].get("text", "") for e in events if e["choices"]), events


def test_greedy_repeat_is_a_hit_with_the_same_answer(http, engine_stats) -> None:
    body = {"prompt": unique_prompt(), "max_tokens": 8, "temperature": 0}
    first = complete(http, body)
    assert first.headers["x-shardserve-cache"] == "miss"
    generated = engine_stats().generation_tokens
    second = complete(http, body)
    assert second.headers["x-shardserve-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    assert engine_stats().generation_tokens == generated  # the engine did no work


def test_requests_differing_in_any_answer_field_do_not_share_entries(http) -> None:
    base = {"prompt": unique_prompt(), "max_tokens": 6, "temperature": 0}
    complete(http, base)
    for change in [{"max_tokens": 5}, {"stop": ["zzz"]}, {"temperature": 0.8, "seed": 1}, {"temperature": 0.8, "seed": 2}]:
        assert complete(http, {**base, **change}).headers["x-shardserve-cache"] == "miss", change
    assert complete(http, {**base, "temperature": 0.8, "seed": 1}).headers["x-shardserve-cache"] == "hit"


def test_unseeded_sampling_is_never_cached(http) -> None:
    body = {"prompt": unique_prompt(), "max_tokens": 4, "temperature": 0.9}
    assert [complete(http, body).headers["x-shardserve-cache"] for _ in range(2)] == ["miss", "miss"]


def test_opt_out_by_body_field_and_cache_control(http) -> None:
    body = {"prompt": unique_prompt(), "max_tokens": 4, "temperature": 0}
    assert complete(http, {**body, "cache": False}).headers["x-shardserve-cache"] == "miss"
    assert complete(http, {**body, "cache": False}).headers["x-shardserve-cache"] == "miss"  # nothing was stored
    complete(http, body)
    assert complete(http, body, headers={"Cache-Control": "no-cache"}).headers["x-shardserve-cache"] == "miss"
    assert complete(http, body).headers["x-shardserve-cache"] == "hit"


def test_stream_fills_the_cache_and_a_hit_is_replayed_as_sse(http) -> None:
    body = {"prompt": unique_prompt(), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    streamed, _ = streamed_text(http, body)
    whole = complete(http, body)
    assert whole.headers["x-shardserve-cache"] == "hit"  # the streamed miss stored the answer
    assert whole.json()["choices"][0]["text"] == streamed
    replayed, events = streamed_text(http, body)
    assert replayed == streamed
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_and_tfserving_routes_hit_too(http) -> None:
    chat = {"messages": [{"role": "user", "content": unique_prompt()}], "max_tokens": 5, "temperature": 0}
    first = complete(http, chat, "/v1/chat/completions")
    second = complete(http, chat, "/v1/chat/completions")
    assert second.headers["x-shardserve-cache"] == "hit"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    predict = {"instances": [unique_prompt()], "parameters": {"max_tokens": 4}}
    assert complete(http, predict, "/v1/models/tiny-llama:predict").headers["x-shardserve-cache"] == "miss"
    assert complete(http, predict, "/v1/models/tiny-llama:predict").headers["x-shardserve-cache"] == "hit"


@pytest.fixture(scope="module")
def redis_app(server: str, redis_url: str) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app({**TEST_ARGS, "cache": {"url": redis_url}}), name="rediscache", route_prefix="/rediscache")
    yield f"{server}/rediscache"
    serve.delete("rediscache")


def _kill_ingress(app_name: str) -> None:
    import ray
    from ray import serve

    status = serve.status().applications[app_name].deployments["Ingress"]
    assert status.status == "HEALTHY"
    replicas = [a for a in ray._private.state.actors().values() if a["Name"].startswith(f"SERVE_REPLICA::{app_name}#Ingress")]
    alive = [a for a in replicas if a["State"] == "ALIVE"]
    assert len(alive) == 1
    ray.kill(ray.get_actor(alive[0]["Name"], namespace="serve"), no_restart=True)


def test_redis_cache_survives_an_ingress_restart(redis_app: str, redis_url: str) -> None:
    import redis

    body = {"prompt": unique_prompt(), "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=redis_app, timeout=60) as http:
        first = complete(http, body)
        assert first.headers["x-shardserve-cache"] == "miss"
        keys = redis.Redis.from_url(redis_url).keys("shardserve:result:tiny-llama:1:*")
        assert keys, "the answer was not written to Redis"
        _kill_ingress("rediscache")

        def served_again() -> httpx.Response | None:
            try:
                res = http.post("/v1/completions", json=body)
            except httpx.HTTPError:
                return None
            return res if res.status_code == 200 else None

        again = wait_until(served_again, timeout_s=60, interval_s=0.5)
        assert again.headers["x-shardserve-cache"] == "hit"
        assert again.json()["choices"] == first.json()["choices"]


def test_redis_down_serves_uncached_and_counts_errors(server: str) -> None:
    from ray import serve

    from deployments.app import build_app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    serve.run(build_app({**TEST_ARGS, "cache": {"url": dead}}), name="deadredis", route_prefix="/deadredis")
    try:
        with httpx.Client(base_url=f"{server}/deadredis", timeout=60) as http:
            body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
            for _ in range(2):
                assert complete(http, body).headers["x-shardserve-cache"] == "miss"
            metrics = http.get("/metrics").text
        errors = [line for line in metrics.splitlines() if line.startswith("shardserve:result_cache_errors_total{")]
        assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 2  # at least both lookups
    finally:
        serve.delete("deadredis")


def test_redis_stopped_under_load_serves_uncached_then_hits_again(server: str) -> None:
    """A client repeats a cached request while Redis is killed: every answer is 200 and the same,
    served uncached (errors counted) once Redis is gone; a Redis started again on the same port is
    used again without a redeploy."""
    import threading

    from ray import serve

    from deployments.app import build_app

    port = free_port()
    redis = start_redis_server(port)
    serve.run(
        build_app({**TEST_ARGS, "cache": {"url": f"redis://127.0.0.1:{port}/0"}}), name="stopredis", route_prefix="/stopredis"
    )
    try:
        with httpx.Client(base_url=f"{server}/stopredis", timeout=60) as http:
            body = {"prompt": unique_prompt(), "max_tokens": 6, "temperature": 0}
            first = complete(http, body)
            wait_until(lambda: complete(http, body).headers["x-shardserve-cache"] == "hit", timeout_s=30, interval_s=0.2)
            answers: list[httpx.Response] = []
            done = threading.Event()

            def client() -> None:
                with httpx.Client(base_url=f"{server}/stopredis", timeout=60) as own:
                    while not done.is_set():
                        answers.append(own.post("/v1/completions", json=body))

            thread = threading.Thread(target=client)
            thread.start()
            try:
                wait_until(lambda: len(answers) >= 5, timeout_s=30)
                redis.kill()
                redis.wait(timeout=10)
                killed_at = len(answers)
                wait_until(lambda: len(answers) >= killed_at + 10, timeout_s=60)
            finally:
                done.set()
                thread.join(timeout=60)
            assert [r.status_code for r in answers] == [200] * len(answers)
            assert all(r.json()["choices"] == first.json()["choices"] for r in answers)
            assert {r.headers["x-shardserve-cache"] for r in answers[killed_at + 1 :]} == {"miss"}
            errors = [
                line
                for line in http.get("/metrics").text.splitlines()
                if line.startswith("shardserve:result_cache_errors_total{")
            ]
            assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 9

            redis = start_redis_server(port)  # empty: the next answer fills it, the one after hits
            wait_until(lambda: complete(http, body).headers["x-shardserve-cache"] == "hit", timeout_s=30, interval_s=0.2)
    finally:
        serve.delete("stopredis")
        redis.kill()
        redis.wait(timeout=10)
