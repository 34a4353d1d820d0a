"""A real two-node Ray cluster on one machine: a head and a worker started with `ray start`
(separate raylets, their own resources), `serve deploy` of serve_config.yaml with
tensor_parallel_size 2, and a redeploy with a changed config under load.

It runs first (conftest orders it), on its own cluster, and stops that cluster before the
session's shared one starts: only one Ray cluster at a time on this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import free_port, wait_until

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=60)
    gcs, dashboard, head_metrics, worker_metrics = free_port(), free_port(), free_port(), free_port()
    # Ray's token authentication, as a production cluster runs it: every node, the serve CLI
    # and every driver present the same token.
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # The head keeps Serve's controller, proxy and ingress; the ranks need the worker's CPUs.
    run("ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--metrics-export-port={head_metrics}", "--disable-usage-stats", **env)  # fmt: skip
    try:
        run("ray", "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=8",
            "--resources", '{"worker_node": 1}', f"--metrics-export-port={worker_metrics}", "--disable-usage-stats",
            **env)  # fmt: skip
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}",
               "ray_metrics": [head_metrics, worker_metrics]}  # fmt: skip
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def serve_config(tmp: Path, http_port: int, **arg_changes: Any) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["args"] |= {"tensor_parallel_size": 2, **arg_changes}
    for d in app["deployments"]:
        if d["name"] == "LLMServer":
            d.pop("autoscaling_config")
            d["num_replicas"] = 1
    path = tmp / f"serve_config_{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rank_nodes(gcs: str) -> dict[str, Any]:
    """Node of each live rank actor and of the worker node, asked from a separate driver."""
    script = """
import json, ray
from ray._private import state
ray.init(address=%r, log_to_driver=False)
ranks = [a for a in state.actors().values() if a["ActorClassName"] == "RankWorker" and a["State"] == "ALIVE"]
worker = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]]
print(json.dumps({"ranks": [a["Address"]["NodeID"] for a in ranks], "worker": worker}))
""" % gcs  # noqa: UP031
    out = run(sys.executable, "-c", script).stdout.strip().splitlines()[-1]
    return json.loads(out)


def test_deploy_tp2_on_two_nodes_and_redeploy_without_failures(two_nodes: dict[str, Any], tmp_path: Path) -> None:
    port = free_port(8000)
    base = f"http://127.0.0.1:{port}"
    address = ["--address", two_nodes["dashboard"]]
    run("serve", "deploy", str(serve_config(tmp_path, port)), *address, timeout=180)

    def status() -> dict[str, Any]:
        return yaml.safe_load(run("serve", "status", *address).stdout)

    def running() -> bool:
        app = status()["applications"].get("shardserve", {})
        assert app.get("status") != "DEPLOY_FAILED", app
        return app.get("status") == "RUNNING"

    wait_until(running, timeout_s=300, interval_s=2)
    assert all(d["status"] == "HEALTHY" for d in status()["applications"]["shardserve"]["deployments"].values())

    placed = rank_nodes(two_nodes["gcs"])
    assert len(placed["ranks"]) == 2 and set(placed["ranks"]) == set(placed["worker"]), placed

    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "cache": False}
    with httpx.Client(base_url=base, timeout=60) as http:
        first = http.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        assert http.get("/v1/models/doc-llama").json()["model_version_status"][0]["version"] == "1"

        outcomes: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                while not stop.is_set():
                    try:
                        outcomes.append(client.post("/v1/completions", json=body).status_code)
                    except httpx.HTTPError:
                        outcomes.append(-1)

        clients = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for c in clients:
            c.start()
        try:
            run("serve", "deploy", str(serve_config(tmp_path, port, model_version=2)), *address, timeout=180)

            def rolled_over() -> bool:
                res = http.get("/v1/models/doc-llama")
                return res.status_code == 200 and res.json()["model_version_status"][0]["version"] == "2" and running()

            wait_until(rolled_over, timeout_s=300, interval_s=1)
            wait_until(lambda: len(outcomes) >= 10, timeout_s=60)
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=60)
        assert outcomes and set(outcomes) == {200}, {s: outcomes.count(s) for s in set(outcomes)}
        again = http.post("/v1/completions", json=body)
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert len(rank_nodes(two_nodes["gcs"])["ranks"]) == 2  # the old worker group is gone

    def ray_serve_metrics() -> bool:
        """Ray's own ray_serve_* metrics keep flowing through the nodes' exporters. Both nodes run
        a proxy on the same port (EveryNode; Serve binds with SO_REUSEPORT), so the kernel may hand
        every connection of this test to the worker's proxy: its requests count on that node."""
        texts = []
        for port in two_nodes["ray_metrics"]:
            try:
                texts.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            except httpx.HTTPError:
                return False
        return any("ray_serve_num_http_requests" in text for text in texts)

    wait_until(ray_serve_metrics, timeout_s=90, interval_s=2)
    run("serve", "shutdown", "-y", *address, timeout=120)


PULL_SCRIPT = """
import json, os, sys, time
from pathlib import Path
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from parallel.kv_tier.node_store import NodeStore, store_name
from parallel.kv_tier.store import STORE_NAMESPACE, digest

ray.init(address=sys.argv[1], log_to_driver=False)
tmp = Path(sys.argv[2])
head, worker = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: "worker_node" in n["Resources"])
live = [head["NodeID"], worker["NodeID"]]
stores = [  # the nodes' stores, under the names they find each other by (a replica may have started one)
    ray.remote(NodeStore).options(
        name=store_name(n["NodeID"]), namespace=STORE_NAMESPACE, num_cpus=0, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
    ).remote(str(tmp / n["NodeID"][:8]), 2**30, live, n["NodeID"])
    for n in (head, worker)
]
a, b = stores
dirs = [Path(d) for d in ray.get([s.directory.remote() for s in stores])]
keys = [bytes([i]) * 32 for i in range(3)]
payloads = {}
for i, key in enumerate(keys[:2]):
    part = str(dirs[0] / f"{key.hex()}.w.r{{rank}}.part")
    files = [os.urandom(100_000 + i), os.urandom(200_000 + i)]
    for r, data in enumerate(files):
        Path(part.replace("{rank}", str(r))).write_bytes(data)
    payloads[key] = files
    assert ray.get(a.commit.remote(key, part, [digest(d) for d in files], [len(d) for d in files]))
assert ray.get(b.lookup.remote(keys)).held == []
deadline = time.monotonic() + 60
while ray.get(b.held_run.remote(keys)) < 2:
    assert time.monotonic() < deadline, "the worker node's store pulled nothing"
    time.sleep(0.2)
reply = ray.get(b.lookup.remote(keys))
same = all(
    Path(h.path.replace("{rank}", str(r))).read_bytes() == payloads[k][r]
    for h, k in zip(reply.held, keys) for r in range(2)
)
from ray.util.state import list_actors
where = [list_actors(filters=[("name", "=", store_name(n))])[0].node_id for n in live]
print(json.dumps({"held": len(reply.held), "same": same, "pulled": ray.get(b.stats.remote()).pulled,
                  "nodes": where, "live": live, "paths": [h.path for h in reply.held], "dirs": [str(d) for d in dirs]}))
for s in stores:
    ray.kill(s)
"""


def test_a_node_store_pulls_chunks_from_the_other_nodes_store(two_nodes: dict[str, Any], tmp_path: Path) -> None:
    """The cluster KV tier across two raylets: the worker node's store, asked for a prompt whose
    chunks only the head node's store holds, pulls them over Ray (each rank's file as bytes,
    checked against the digests the head's store recorded) into its own directory."""
    out = run(sys.executable, "-c", PULL_SCRIPT, two_nodes["gcs"], str(tmp_path), timeout=180, PYTHONPATH=str(ROOT))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["held"] == 2 and result["pulled"] >= 2 and result["same"], result
    assert result["nodes"] == result["live"], result  # each store on its own node
    assert all(p.startswith(result["dirs"][1]) for p in result["paths"]), result  # the worker's own copies
