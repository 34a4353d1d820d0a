"""Faults of a tensor-parallel (tp=2) replica under traffic: clients that go away, a rank that
hangs, a burst far past capacity, a rank killed while a second replica serves. Real rank
processes, real gloo; the faults are real signals.

(A rank killed with SIGKILL mid-generation is in test_parallel.py, on the tp=2 x pp=2 app.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray._private import state as gcs_state

from bench.workload import ClosedLoop
from deployments.app import bind_app
from deployments.config import ShardserveArgs

from .conftest import TEST_ARGS, assert_only_in_flight_requests_failed, wait_until

APP = "ranks"
STEP_TIMEOUT_S = 3.0
HEALTH_PERIOD_S = 1.0


def live_actors(class_prefix: str) -> dict[str, dict[str, Any]]:
    return {
        actor_id: a
        for actor_id, a in gcs_state.actors().items()
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix)
    }


def replicas() -> set[str]:
    return set(live_actors(f"ServeReplica:{APP}:LLMServer"))


def rank_pids() -> list[int]:
    return sorted(a["Pid"] for a in live_actors("RankWorker").values())


def created_pgs() -> int:
    return sum(1 for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED")


@pytest.fixture(scope="module")
def tp2(server: str) -> Iterator[str]:
    args = {**TEST_ARGS, "tensor_parallel_size": 2, "parallel": {"step_timeout_s": STEP_TIMEOUT_S}}
    overrides = {"health_check_period_s": HEALTH_PERIOD_S, "health_check_timeout_s": 5}
    serve.run(bind_app(ShardserveArgs.model_validate(args), overrides), name=APP, route_prefix=f"/{APP}")
    base = f"{server}/{APP}"
    wait_until(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, timeout_s=120)
    yield base
    serve.delete(APP)
    wait_until(lambda: not rank_pids(), timeout_s=60)


def engine_running() -> int:
    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    return handle.engine_stats.remote().result(timeout_s=10).num_running


def greedy(base: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "cache": False}
    res = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()["choices"][0]["text"]


async def test_twenty_streams_five_clients_leave_after_three_tokens(server: str, tp2: str) -> None:
    max_tokens = 48
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True, "cache": False}
    body["stream_options"] = {"include_usage": True}

    async def stream(client: httpx.AsyncClient, i: int, leave: bool) -> int | None:
        payload = {**body, "prompt": f"Stream number {i} says"}
        async with client.stream("POST", "/v1/completions", json=payload) as res:
            assert res.status_code == 200
            chunks = 0
            async for line in res.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                if event.get("usage"):
                    return event["usage"]["completion_tokens"]
                chunks += 1
                if leave and chunks == 3:
                    return None  # closes the connection mid-generation
        raise AssertionError("stream ended without usage")

    async with httpx.AsyncClient(base_url=tp2, timeout=120, limits=httpx.Limits(max_connections=40)) as client:
        results = await asyncio.gather(*(stream(client, i, leave=i % 4 == 0) for i in range(20)))
    left = time.monotonic()
    assert results.count(None) == 5
    assert [r for r in results if r is not None] == [max_tokens] * 15
    await asyncio.to_thread(wait_until, lambda: engine_running() == 0, 2.0)
    assert time.monotonic() - left < 2.5
    # The ranks are still in step: greedy text equals the unsharded model's.
    for prompt in ["Hello", "Stream number 4 says"]:
        assert greedy(tp2, prompt) == greedy(server, prompt)


def test_a_hung_rank_fails_its_requests_and_the_group_is_replaced(tp2: str) -> None:
    before_replicas, before_pids, before_pgs = replicas(), rank_pids(), created_pgs()
    assert len(before_pids) == 2
    body = {"prompt": "Hang on", "max_tokens": 800, "ignore_eos": True, "stream": True, "cache": False}
    with httpx.Client(base_url=tp2, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(before_pids[1], signal.SIGSTOP)  # blocks forever inside the next all-reduce
            stopped = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        failed_after = time.monotonic() - stopped
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "internal_error", rest[-3:]
        assert failed_after < STEP_TIMEOUT_S + HEALTH_PERIOD_S + 1.0, failed_after
        # check_health reports the fault: Serve replaces the replica and its whole group of ranks.
        wait_until(lambda: replicas() and not replicas() & before_replicas, timeout_s=60, interval_s=0.5)
        wait_until(lambda: len(rank_pids()) == 2 and not set(rank_pids()) & set(before_pids), timeout_s=120, interval_s=0.5)
        wait_until(lambda: client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200, 120, 1)
    with pytest.raises(ProcessLookupError):
        os.kill(before_pids[1], 0)  # the stopped rank was killed, not left behind
    assert created_pgs() == before_pgs  # the old group's placement group was released


async def test_a_burst_of_200_requests_does_not_fail_health_checks(tp2: str) -> None:
    before = replicas()
    # Long enough that the accepted part of the burst outlasts two health-check periods.
    body = {"max_tokens": 96, "temperature": 0, "ignore_eos": True, "cache": False}

    async def one(client: httpx.AsyncClient, i: int) -> int:
        return (await client.post("/v1/completions", json={**body, "prompt": f"Burst {i}"})).status_code

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=tp2, timeout=120, limits=httpx.Limits(max_connections=200)) as client:
        codes = await asyncio.gather(*(one(client, i) for i in range(200)))
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(200) >= 32
    # The burst spanned several health checks (period 1 s), and none failed.
    assert time.monotonic() - started > 2 * HEALTH_PERIOD_S
    assert replicas() == before
    app = serve.status().applications[APP]
    assert app.deployments["LLMServer"].status == "HEALTHY"


def test_a_killed_rank_fails_only_its_in_flight_requests_the_rest_are_served(tp2: str) -> None:
    """Two tp=2 replicas under steady load, a rank of one SIGKILLed: the requests in flight on
    its replica fail cleanly; that replica refuses the next ones and leaves at once, the ingress
    resends them to the other replica, so nothing that started after the kill fails (without
    this, every request routed to it failed with a 500 until three health checks had failed);
    a new replica with a new rank group takes its place. Runs last: it scales the module's app."""
    args = {**TEST_ARGS, "tensor_parallel_size": 2, "parallel": {"step_timeout_s": STEP_TIMEOUT_S}}
    overrides = {"health_check_period_s": HEALTH_PERIOD_S, "health_check_timeout_s": 5, "num_replicas": 2}
    serve.run(bind_app(ShardserveArgs.model_validate(args), overrides), name=APP, route_prefix=f"/{APP}")
    wait_until(lambda: len(replicas()) == 2 and len(rank_pids()) == 4, timeout_s=120, interval_s=0.5)
    before_replicas, before_pgs = replicas(), created_pgs()
    victim = rank_pids()[0]
    body = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "cache": False}
    with ClosedLoop(tp2, body=body) as load:
        wait_until(lambda: load.successes_after(0) >= 10, timeout_s=120)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(replicas() - before_replicas) == 1 and len(replicas()) == 2, timeout_s=120, interval_s=0.5)
        wait_until(lambda: len(rank_pids()) == 4 and victim not in rank_pids(), timeout_s=120, interval_s=0.5)
        recovered = time.monotonic()
        wait_until(lambda: load.successes_after(recovered) >= 20, timeout_s=120)
    assert_only_in_flight_requests_failed(load, killed_at)
    wait_until(lambda: created_pgs() == before_pgs, timeout_s=30)  # the failed replica's group went with it
