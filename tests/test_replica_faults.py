"""Faults of whole replicas and of Serve itself, under steady load: a model replica killed, the
Serve controller killed, and a replica drained by a 2 -> 1 downscale with streams in flight."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import ray
from ray import serve
from ray._private import state as gcs_state

from deployments.app import bind_app
from deployments.config import ShardserveArgs

from .conftest import TEST_ARGS, wait_until

APP = "pair"
ARGS = {**TEST_ARGS, "served_model_name": "pair", "routing": "power_of_two", "cache": {"enabled": False}}
FAST_HEALTH = {"health_check_period_s": 1, "health_check_timeout_s": 5}


def replica_pids() -> dict[str, int]:
    return {
        actor_id: a["Pid"]
        for actor_id, a in gcs_state.actors().items()
        if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{APP}:LLMServer"
    }


def deploy(num_replicas: int, **overrides: object) -> None:
    options = {"num_replicas": num_replicas, **FAST_HEALTH, **overrides}
    serve.run(bind_app(ShardserveArgs.model_validate(ARGS), options), name=APP, route_prefix=f"/{APP}")
    wait_until(lambda: len(replica_pids()) == num_replicas, timeout_s=60)


@pytest.fixture()
def pair(server: str) -> Iterator[str]:
    deploy(2)
    yield f"{server}/{APP}"
    serve.delete(APP)


@dataclass
class Outcome:
    started: float
    ended: float
    status: int
    body: str


@dataclass
class Load:
    """Closed-loop clients sending short greedy completions until stopped; every outcome kept."""

    base: str
    clients: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            self._threads.append(threading.Thread(target=self._client, args=(i,), daemon=True))
            self._threads[-1].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _client(self, i: int) -> None:
        body = {"prompt": f"Client {i} asks", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    res = client.post("/v1/completions", json=body)
                    status, text = res.status_code, res.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                self.outcomes.append(Outcome(started, time.monotonic(), status, text))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def wait_for(self, successes: int, after: float, timeout_s: float = 120) -> None:
        wait_until(lambda: sum(1 for o in self.outcomes if o.status == 200 and o.started > after) >= successes, timeout_s)


def test_killed_replica_fails_only_its_in_flight_requests(pair: str) -> None:
    victim_id, victim_pid = next(iter(replica_pids().items()))
    with Load(pair) as load:
        load.wait_for(20, after=0)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        wait_until(lambda: len(replica_pids()) == 2 and victim_id not in replica_pids(), timeout_s=60, interval_s=0.2)
        load.wait_for(50, after=time.monotonic())  # the next 50 requests after the new replica is up
    failures = load.failures()
    assert len(failures) <= load.clients, failures  # at most one in flight per client
    for o in failures:
        assert o.started < killed_at, o  # only requests already in flight when it died
        assert o.ended - killed_at < 5.0, o
        assert o.status == 503, o
        error = json.loads(o.body)["error"]
        assert error["code"] == "replica_failed" and "Traceback" not in o.body, error


def test_controller_killed_under_load_fails_no_request(pair: str) -> None:
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    old_pid = ray.get(controller.__ray_call__.remote(lambda self: os.getpid()))
    with Load(pair) as load:
        load.wait_for(10, after=0)
        ray.kill(controller, no_restart=False)  # Ray restarts it; the data plane keeps serving
        killed_at = time.monotonic()

        def controller_back() -> bool:
            try:
                actor = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
                return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=5) != old_pid
            except Exception:  # noqa: BLE001 - still restarting
                return False

        wait_until(controller_back, timeout_s=60, interval_s=0.5)
        load.wait_for(30, after=killed_at)
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


def test_downscale_2_to_1_lets_in_flight_streams_finish(pair: str) -> None:
    results, threads = start_streams(pair, max_tokens=700)
    deploy(1)  # the drained replica finishes its streams first (graceful_shutdown_timeout_s)
    for t in threads:
        t.join(timeout=120)
    assert sorted(results, key=str) == [(700, None)] * 5


def test_downscale_with_a_1s_shutdown_timeout_ends_streams_cleanly(server: str) -> None:
    deploy(2, graceful_shutdown_timeout_s=1)
    try:
        base = f"{server}/{APP}"
        results, threads = start_streams(base, max_tokens=900)
        deploy(1, graceful_shutdown_timeout_s=1)
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
