"""Faults of whole replicas and of Serve itself, under steady load: a model replica killed, the
Serve controller killed, and a replica drained by a 2 -> 1 downscale with streams in flight."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray._private import state as gcs_state

from bench.workload import ClosedLoop
from deployments.app import bind_app
from deployments.config import ShardserveArgs

from .conftest import TEST_ARGS, assert_only_in_flight_requests_failed, wait_until

APP = "pair"
ARGS = {**TEST_ARGS, "served_model_name": "pair", "routing": "power_of_two", "cache": {"enabled": False}}
FAST_HEALTH = {"health_check_period_s": 1, "health_check_timeout_s": 5}
# The drain tests need streams still running on both replicas when their pushed metrics are read
# (every 2 s): the tiny model finishes 900 tokens in ~3 s here, the 32M bench model takes ~10 s.
DRAIN_ARGS = {**ARGS, "model": "shardserve/bench-llama"}


def replica_pids() -> dict[str, int]:
    return {
        actor_id: a["Pid"]
        for actor_id, a in gcs_state.actors().items()
        if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{APP}:LLMServer"
    }


def deploy(num_replicas: int, args: dict = ARGS, **overrides: object) -> None:
    options = {"num_replicas": num_replicas, **FAST_HEALTH, **overrides}
    serve.run(bind_app(ShardserveArgs.model_validate(args), options), name=APP, route_prefix=f"/{APP}")
    wait_until(lambda: len(replica_pids()) == num_replicas, timeout_s=60)


@pytest.fixture()
def pair(server: str) -> Iterator[str]:
    deploy(2)
    yield f"{server}/{APP}"
    serve.delete(APP)


def test_killed_replica_fails_only_its_in_flight_requests(pair: str) -> None:
    victim_id, victim_pid = next(iter(replica_pids().items()))
    with ClosedLoop(pair) as load:
        wait_until(lambda: load.successes_after(0) >= 10, timeout_s=120)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        wait_until(lambda: len(replica_pids()) == 2 and victim_id not in replica_pids(), timeout_s=60, interval_s=0.2)
        recovered = time.monotonic()
        wait_until(lambda: load.successes_after(recovered) >= 20, timeout_s=120)  # the next 20 after the new replica is up
    failures = load.failures()
    assert len(failures) <= load.clients, failures  # at most one in flight per client
    for o in failures:
        assert o.started < killed_at, o  # only requests already in flight when it died
        assert o.ended - killed_at < 5.0, o
        assert o.status == 503, o
        error = json.loads(o.body)["error"]
        assert error["code"] == "replica_failed" and "Traceback" not in o.body, error


def model_process_pids() -> dict[str, int]:
    """The model process (`engine.model_process`) of each replica of the app."""
    out = {}
    for actor_id, pid in replica_pids().items():
        (child,) = [c for c in psutil.Process(pid).children() if "parallel.runners.model_process" in " ".join(c.cmdline())]
        out[actor_id] = child.pid
    return out


def test_a_killed_model_process_fails_only_its_in_flight_requests(pair: str) -> None:
    """A replica's model process SIGKILLed under load: the requests in flight on that replica
    fail cleanly, it refuses the next ones and leaves, the ingress resends those to the other
    replica, and a new replica with its own model process takes its place."""
    victim_id, victim = next(iter(model_process_pids().items()))
    with ClosedLoop(pair) as load:
        wait_until(lambda: load.successes_after(0) >= 10, timeout_s=120)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(replica_pids()) == 2 and victim_id not in replica_pids(), timeout_s=60, interval_s=0.2)
        recovered = time.monotonic()
        wait_until(lambda: load.successes_after(recovered) >= 20, timeout_s=120)
    assert_only_in_flight_requests_failed(load, killed_at)
    assert victim not in {c.pid for pid in replica_pids().values() for c in psutil.Process(pid).children()}


def test_controller_killed_under_load_fails_no_request(pair: str) -> None:
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    old_pid = ray.get(controller.__ray_call__.remote(lambda self: os.getpid()))
    with ClosedLoop(pair) as load:
        wait_until(lambda: load.successes_after(0) >= 10, timeout_s=120)
        ray.kill(controller, no_restart=False)  # Ray restarts it; the data plane keeps serving
        killed_at = time.monotonic()

        def controller_back() -> bool:
            try:
                actor = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
                return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=5) != old_pid
            except Exception:  # noqa: BLE001 - still restarting
                return False

        wait_until(controller_back, timeout_s=60, interval_s=0.5)
        wait_until(lambda: load.successes_after(killed_at) >= 15, timeout_s=120)
    assert load.failures() == []
    wait_until(lambda: serve.status().applications[APP].status == "RUNNING", timeout_s=60, interval_s=0.5)


def stream_tokens(base: str, i: int, max_tokens: int, results: list) -> None:
    body = {"prompt": f"Drain {i}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    usage, error = None, None
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as res:
            for line in res.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    usage = event.get("usage") or usage
                    error = event.get("error") or error
    except httpx.HTTPError as exc:
        error = {"transport": repr(exc)}
    results.append((usage["completion_tokens"] if usage else None, error))


def running_per_replica(base: str) -> dict[str, float]:
    """shardserve:num_requests_running of each LLMServer replica of the app, from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("shardserve:num_requests_running{"):
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


def start_streams(base: str, max_tokens: int) -> tuple[list, list[threading.Thread]]:
    results: list = []
    threads = [threading.Thread(target=stream_tokens, args=(base, i, max_tokens, results)) for i in range(5)]
    for t in threads:
        t.start()
    # Both replicas are generating (the metrics every replica pushes say so) before the downscale.
    wait_until(lambda: sum(1 for v in running_per_replica(base).values() if v > 0) == 2, timeout_s=30, interval_s=0.3)
    return results, threads


def test_downscale_2_to_1_lets_in_flight_streams_finish(server: str) -> None:
    deploy(2, DRAIN_ARGS)
    try:
        results, threads = start_streams(f"{server}/{APP}", max_tokens=700)
        deploy(1, DRAIN_ARGS)  # the drained replica finishes its streams first (graceful_shutdown_timeout_s)
        for t in threads:
            t.join(timeout=120)
        assert sorted(results, key=str) == [(700, None)] * 5
    finally:
        serve.delete(APP)


def test_downscale_with_a_1s_shutdown_timeout_ends_streams_cleanly(server: str) -> None:
    deploy(2, DRAIN_ARGS, graceful_shutdown_timeout_s=1)
    try:
        base = f"{server}/{APP}"
        results, threads = start_streams(base, max_tokens=900)
        deploy(1, DRAIN_ARGS, graceful_shutdown_timeout_s=1)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        finished = [r for r in results if r == (900, None)]
        cut = [r for r in results if r != (900, None)]
        assert cut, "the drained replica's streams outlived its 1 s shutdown timeout"
        assert len(finished) + len(cut) == 5
        for tokens, error in cut:
            assert tokens is None and error is not None
            assert "Traceback" not in json.dumps(error)
    finally:
        serve.delete(APP)
