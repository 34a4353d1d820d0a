"""The cluster KV tier under real Ray Serve: a prefix computed by one replica is loaded, with the
same greedy tokens, by the replica Serve starts after it was killed and by another deployment
of the model; a corrupted chunk and a killed store actor end in a recompute with the right
tokens; the tier's metrics count it all."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve
from ray._private import state as gcs_state

from deployments.app import bind_app
from deployments.config import ShardserveArgs
from deployments.types import EngineStats
from parallel.kv_tier.node_store import store_name
from parallel.kv_tier.store import STORE_NAMESPACE

from .conftest import TEST_ARGS, wait_until

ARGS = {
    **TEST_ARGS,
    "served_model_name": "tiered",
    "cache": {"enabled": False},  # every request reaches a replica
    "kv_tier": {"chunk_blocks": 2, "min_sightings": 1, "lookup_timeout_ms": 2000},
}
FAST_HEALTH = {"health_check_period_s": 1, "health_check_timeout_s": 5}
BLOCK = 16


def prompt(seed: int, length: int = 201) -> list[int]:
    """201 tokens: 12 blocks short of the last token, 6 chunks of 2 blocks."""
    return torch.randint(10, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def replica_pids(app: str) -> list[int]:
    return [
        a["Pid"]
        for a in gcs_state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{app}:LLMServer"
    ]


def store() -> ray.actor.ActorHandle:
    return ray.get_actor(store_name(ray.get_runtime_context().get_node_id()), namespace=STORE_NAMESPACE)


def held_chunks() -> int:
    return ray.get(store().stats.remote(), timeout=10).held_chunks


def stats(app: str) -> EngineStats:
    return serve.get_deployment_handle("LLMServer", app_name=app).engine_stats.remote().result(timeout_s=10)


def complete(base: str, tokens: list[int]) -> str:
    body = {"prompt": tokens, "max_tokens": 16, "temperature": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def deploy(name: str, args: dict = ARGS) -> None:
    serve.run(bind_app(ShardserveArgs.model_validate(args), FAST_HEALTH), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def tier_apps(server: str) -> Iterator[tuple[str, str]]:
    """Two deployments of the same model with the tier: each is another replica to the other."""
    deploy("tier_a")
    deploy("tier_b")
    yield f"{server}/tier_a", f"{server}/tier_b"
    serve.delete("tier_a")
    serve.delete("tier_b")


def test_a_prefix_outlives_the_replica_that_computed_it(server: str, tier_apps: tuple[str, str]) -> None:
    a, b = tier_apps
    p = prompt(1)
    cold = complete(a, p)
    assert cold == complete(server, p)  # the session app computes it (its chunks are 8 blocks: no sharing)
    wait_until(lambda: held_chunks() >= 6, timeout_s=30)

    (victim,) = replica_pids("tier_a")
    os.kill(victim, signal.SIGKILL)  # the replica crashes; Serve starts another with an empty pool
    wait_until(lambda: replica_pids("tier_a") not in ([], [victim]), timeout_s=60, interval_s=0.2)
    wait_until(lambda: _answers(a), timeout_s=120, interval_s=0.5)
    assert complete(a, p) == cold
    restarted = stats("tier_a")
    assert restarted.kv_tier_hit_tokens == 12 * BLOCK and restarted.kv_tier_load_failures == 0

    assert complete(b, p) == cold  # another deployment of the model
    assert stats("tier_b").kv_tier_hit_tokens == 12 * BLOCK


def test_a_corrupt_chunk_and_a_killed_store_cost_a_recompute(server: str, tier_apps: tuple[str, str]) -> None:
    a, b = tier_apps
    directory = Path(ray.get(store().directory.remote(), timeout=10))
    before = set(directory.glob("*.r0"))
    p = prompt(2)
    expected = complete(a, p)
    wait_until(lambda: len(set(directory.glob("*.r0")) - before) >= 6, timeout_s=30)
    victim = sorted(set(directory.glob("*.r0")) - before)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    failures = stats("tier_b").kv_tier_load_failures
    assert complete(b, p) == expected
    assert stats("tier_b").kv_tier_load_failures == failures + 1

    q = prompt(3)
    expected = complete(server, q)
    ray.kill(store(), no_restart=False)  # Ray restarts it, empty: every chunk is gone
    assert complete(b, q) == expected  # its lookup failed or found nothing: computed
    wait_until(lambda: _held_after_restart() is not None, timeout_s=60, interval_s=0.5)
    wait_until(lambda: complete(b, q) == expected and (_held_after_restart() or 0) >= 6, timeout_s=60, interval_s=0.5)
    hits = stats("tier_a").kv_tier_hit_tokens
    assert complete(a, q) == expected  # stored again from b's pool, loaded by a
    assert stats("tier_a").kv_tier_hit_tokens == hits + 12 * BLOCK


def test_tier_metrics_are_exported(server: str, tier_apps: tuple[str, str]) -> None:
    def exported() -> str | None:
        text = httpx.get(f"{tier_apps[0]}/metrics", timeout=10).text
        name = "shardserve:kv_tier_hit_tokens_total"
        lines = [line for line in text.splitlines() if line.startswith(name) and "tiered" in line]
        return text if any(float(line.rsplit(" ", 1)[1]) > 0 for line in lines) else None

    text = wait_until(exported, timeout_s=30, interval_s=0.5)
    for name in ("kv_tier_lookups_total", "kv_tier_saves_total", "kv_tier_loaded_bytes_total", "kv_tier_load_seconds_total"):
        assert f"shardserve:{name}" in text, name


def _held_after_restart() -> int | None:
    try:
        return held_chunks()
    except Exception:  # noqa: BLE001 - restarting
        return None


def _answers(base: str) -> bool:
    try:
        return httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_store_pulls_what_another_nodes_store_holds(ray_cluster: None, tmp_path: Path) -> None:
    """Two node stores (as two nodes would have; here both on this machine, under names of
    nodes of their own): a lookup that stops short in one pulls the rest from the other over
    Ray, checked against its digests; a chunk whose bytes are not what their store recorded is
    not kept."""
    from parallel.kv_tier.node_store import NodeStore
    from parallel.kv_tier.store import digest

    stores = {
        n: ray.remote(NodeStore).options(name=store_name(n), namespace=STORE_NAMESPACE).remote(str(tmp_path / n), 2**30, None, n)
        for n in ("test-node-a", "test-node-b")
    }
    a, b = stores["test-node-a"], stores["test-node-b"]
    ray.get([s.directory.remote() for s in stores.values()])  # started: their directories exist
    try:
        keys = [bytes([i]) * 32 for i in range(4)]
        payloads = {}
        for i, key in enumerate(keys[:3]):  # a holds three chunks of two ranks each
            part = str(tmp_path / "test-node-a" / f"{key.hex()}.w.r{{rank}}.part")
            files = [os.urandom(1000 + i), os.urandom(2000 + i)]
            for r, data in enumerate(files):
                Path(part.replace("{rank}", str(r))).write_bytes(data)
            payloads[key] = files
            assert ray.get(a.commit.remote(key, part, [digest(d) for d in files], [len(d) for d in files]))
        victim = tmp_path / "test-node-a" / f"{keys[2].hex()}.r1"
        victim.write_bytes(b"not what was recorded")

        assert ray.get(b.lookup.remote(keys)).held == []  # b has nothing yet; it starts pulling
        wait_until(lambda: ray.get(b.held_run.remote(keys)) == 2, timeout_s=30)
        reply = ray.get(b.lookup.remote(keys))
        assert len(reply.held) == 2 and ray.get(b.stats.remote()).pulled == 2
        for held, key in zip(reply.held, keys, strict=False):
            for r in range(2):
                assert Path(held.path.replace("{rank}", str(r))).read_bytes() == payloads[key][r]
                assert held.path.startswith(str(tmp_path / "test-node-b"))
    finally:
        for store in stores.values():
            ray.kill(store)
