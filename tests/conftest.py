"""One real Ray + Ray Serve for the whole test session, serving the tiny built-in model.

Integration tests talk to it over HTTP on loopback (httpx, the official openai client) and
through Serve handles. Unit tests do not use these fixtures and need no Ray.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from parallel.model.cpu_kernels import compiler_available

KERNELS_REQUIRED = bool(os.environ.get("SHARDSERVE_REQUIRE_KERNELS"))
"""Set by CI (.ci/run): the CPU kernels must build, so even a missing compiler fails the tests."""


def kernels_expected() -> bool:
    """Whether the CPU kernels must build here: a C compiler is present (one that fails is an
    error to see, not a reason to skip), or CI requires them."""
    return compiler_available() or KERNELS_REQUIRED


needs_c_compiler = pytest.mark.skipif(
    not kernels_expected(), reason="no C compiler (cc, gcc or $CC) on this machine: the CPU kernels cannot be built"
)

APP_NAME = "shardserve"
TEST_ARGS: dict[str, Any] = {
    "model": "shardserve/tiny-llama",
    "served_model_name": "tiny-llama",
    "max_model_len": 1024,
    "engine": {"max_num_seqs": 16, "max_waiting_requests": 16},
    "limits": {"max_request_body_bytes": 65536, "max_n": 4},
}


def free_port(preferred: int | None = None) -> int:
    if preferred is not None:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail the test with a clear message at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {predicate}")
        time.sleep(interval_s)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests with their own Ray cluster (`own_cluster`) run first, before the shared one starts."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    remove_kv_store_files()


def remove_kv_store_files() -> None:
    """The node KV stores' shared memory (a store wipes its own at start; Ray's end does not)."""
    import shutil

    from parallel.kv_tier.store import default_directory

    for directory in default_directory("x").parent.glob("shardserve-kv-*"):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def server(ray_cluster: None) -> Iterator[str]:
    """Base URL of the shardserve app (real Serve proxy on 127.0.0.1)."""
    import httpx
    from ray import serve

    from deployments.app import build_app

    port = free_port(8000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(TEST_ARGS), name=APP_NAME, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ready(httpx, base), timeout_s=120)
    yield base
    serve.shutdown()


def _ready(httpx: Any, base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def http(server: str) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def engine_stats(server: str) -> Callable[[], Any]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
    return lambda: handle.engine_stats.remote().result(timeout_s=10)


SLOW_MAX_TOKENS = 1800


@pytest.fixture(scope="session")
def slow_app(server: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The 32M-parameter bench model (~5 ms a token here): a long generation outlasts any
    cancellation by seconds, so tests of disconnects do not race the model."""
    from ray import serve

    from deployments.app import build_app

    args = {"model": "shardserve/bench-llama", "served_model_name": "slow", "limits": TEST_ARGS["limits"]}
    serve.run(build_app(args), name="slow", route_prefix="/slow")
    handle = serve.get_deployment_handle("LLMServer", app_name="slow")
    yield f"{server}/slow", lambda: handle.engine_stats.remote().result(timeout_s=10)
    serve.delete("slow")


def start_redis_server(port: int) -> Any:
    """A redis-server of the test's own on loopback (a subprocess.Popen), answering PING.
    Skipped only outside CI when redis-server is not installed."""
    import shutil
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(answers, timeout_s=20)
    return proc


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on loopback: the one .ci/run starts (SHARDSERVE_TEST_REDIS_URL), or
    one started here."""
    if os.environ.get("SHARDSERVE_TEST_REDIS_URL"):
        yield os.environ["SHARDSERVE_TEST_REDIS_URL"]
        return
    port = free_port()
    proc = start_redis_server(port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def assert_only_in_flight_requests_failed(load: Any, killed_at: float) -> None:
    """After a worker of one replica was killed under a ClosedLoop: the requests in flight on it
    failed cleanly (500/503 with a message, no traceback, within 5 s), and nothing sent a second
    after the kill failed (its replica refused them and the ingress resent them elsewhere)."""
    import json

    failures = load.failures()
    assert len(failures) <= load.clients, failures  # at most one in flight per client
    for o in failures:
        assert o.started < killed_at + 1.0, o  # in flight when the step failed, not sent after
        assert o.ended - killed_at < 5.0, o
        error = json.loads(o.body)["error"]
        assert o.status in (500, 503) and "Traceback" not in o.body and error["message"], o
    served_after = [o for o in load.outcomes if o.started > killed_at + 1.0]
    assert len(served_after) >= 20 and all(o.status == 200 for o in served_after)
