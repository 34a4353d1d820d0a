"""Two versions from a model repository served side by side: TF-Serving version and label
routes, OpenAI `name:version`, the status route listing both, the result cache and the metrics
kept apart by version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from parallel.checkpoints.compress_cli import main as shardserve_cli

from .conftest import TEST_ARGS, wait_until
from .test_metrics import scrape


@pytest.fixture(scope="module")
def versioned(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    repo = tmp_path_factory.mktemp("repo")
    assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(repo), "--name", "tiny", "--int8"]) == 0
    assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(repo), "--name", "tiny"]) == 0  # a plain copy
    args = {
        **{k: v for k, v in TEST_ARGS.items() if k not in ("model", "served_model_name")},
        "repository": {"base_path": str(repo), "name": "tiny", "version_policy": "all", "labels": {"stable": 1, "canary": 2}},
    }
    serve.run(build_app(args), name="versions", route_prefix="/versions")
    yield f"{server}/versions"
    serve.delete("versions")


def test_status_lists_every_served_version(versioned: str) -> None:
    with httpx.Client(base_url=versioned, timeout=60) as http:
        status = http.get("/v1/models/tiny").json()
        assert [s["version"] for s in status["model_version_status"]] == ["2", "1"]
        assert all(s["state"] == "AVAILABLE" for s in status["model_version_status"])
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "tiny:1", "tiny:2"]
        assert http.get("/v1/models/tiny/versions/1").json()["model_version_status"][0]["version"] == "1"
        assert http.get("/v1/models/tiny/labels/canary").json()["model_version_status"][0]["version"] == "2"
        assert http.get("/v1/models/tiny/versions/3").status_code == 404
        # Memory on the server: version 1 is int8, version 2 a float32 copy of the same model.
        meta = {v: http.get(f"/v1/models/tiny/versions/{v}/metadata").json()["metadata"]["model"] for v in (1, 2)}
        assert meta[1]["num_parameters"] == meta[2]["num_parameters"]
        assert meta[1]["weight_bytes"] < 0.6 * meta[2]["weight_bytes"]
        assert http.get("/v1/models/tiny/labels/nightly").status_code == 404


def test_predict_by_version_and_label_and_openai_name_version(versioned: str) -> None:
    body = {"instances": ["Hello there"], "parameters": {"max_tokens": 6}}
    with httpx.Client(base_url=versioned, timeout=60) as http:
        for path, version in [
            ("/v1/models/tiny:predict", "2"),
            ("/v1/models/tiny/versions/1:predict", "1"),
            ("/v1/models/tiny/labels/stable:predict", "1"),
            ("/v1/models/tiny/labels/canary:predict", "2"),
        ]:
            res = http.post(path, json=body)
            assert res.status_code == 200 and res.json()["model_spec"]["version"] == version, (path, res.text)
        assert http.post("/v1/models/tiny/versions/7:predict", json=body).status_code == 404
        for model in ("tiny", "tiny:1", "tiny:2"):
            res = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
            assert res.status_code == 200, (model, res.text)
        missing = http.post("/v1/completions", json={"model": "tiny:9", "prompt": "Hi", "max_tokens": 3})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_cache_and_metrics_are_kept_apart_by_version(versioned: str) -> None:
    body = {"prompt": "Versioned cache", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=versioned, timeout=60) as http:
        assert http.post("/v1/completions", json={**body, "model": "tiny:1"}).headers["x-shardserve-cache"] == "miss"
        assert http.post("/v1/completions", json={**body, "model": "tiny:1"}).headers["x-shardserve-cache"] == "hit"
        assert http.post("/v1/completions", json={**body, "model": "tiny:2"}).headers["x-shardserve-cache"] == "miss"

        def both_versions_report() -> bool:
            samples = scrape(http)
            tokens = [dict(ls) for (n, ls), v in samples.items() if n == "shardserve:generation_tokens_total" and v > 0]
            versions = {labels.get("model_version") for labels in tokens}
            return {"1", "2"} <= versions

        wait_until(both_versions_report, timeout_s=20, interval_s=0.5)


def test_canary_split_and_a_rollout_under_load(server: str, tmp_path: Path) -> None:
    """Publish version 2 and redeploy: requests move to it with none failed; a canary split
    sends unversioned requests to both; rolling back is one config change."""
    import threading

    from ray import serve

    from deployments.app import build_app

    assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(tmp_path), "--name", "tiny"]) == 0
    base = {k: v for k, v in TEST_ARGS.items() if k not in ("model", "served_model_name")}
    repo = {"base_path": str(tmp_path), "name": "tiny"}
    serve.run(build_app({**base, "repository": repo}), name="rollout", route_prefix="/rollout")
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"{server}/rollout", timeout=60) as client:
            while not stop.is_set():
                try:
                    res = client.post("/v1/completions", json={"prompt": "Roll", "max_tokens": 4, "cache": False})
                    outcomes.append(res.status_code)
                except httpx.HTTPError:
                    outcomes.append(-1)

    def newest(http: httpx.Client) -> str:
        return http.get("/v1/models/tiny").json()["model_version_status"][0]["version"]

    with httpx.Client(base_url=f"{server}/rollout", timeout=60) as http:
        client = threading.Thread(target=load, daemon=True)
        client.start()
        try:
            assert newest(http) == "1"
            assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(tmp_path), "--name", "tiny"]) == 0
            serve.run(build_app({**base, "repository": repo}), name="rollout", route_prefix="/rollout")  # publish -> redeploy
            wait_until(lambda: newest(http) == "2", timeout_s=120, interval_s=0.5)
            canary = {**repo, "version_policy": "all", "traffic": {1: 0.5, 2: 0.5}}
            serve.run(build_app({**base, "repository": canary}), name="rollout", route_prefix="/rollout")
            before = scrape(http)
            for _ in range(30):
                assert http.post("/v1/completions", json={"prompt": "Canary", "max_tokens": 2, "cache": False}).status_code == 200

            def both_got_traffic() -> bool:
                after = scrape(http)
                moved = set()
                for (name, labels), value in after.items():
                    if name == "shardserve:request_success_total" and value > before.get((name, labels), 0):
                        moved.add(dict(labels).get("model_version"))
                return {"1", "2"} <= moved

            wait_until(both_got_traffic, timeout_s=20, interval_s=0.5)
            rollback = {**repo, "version_policy": "specific", "versions": [1]}
            serve.run(build_app({**base, "repository": rollback}), name="rollout", route_prefix="/rollout")
            wait_until(lambda: newest(http) == "1", timeout_s=120, interval_s=0.5)
        finally:
            stop.set()
            client.join(timeout=60)
            serve.delete("rollout")
    assert outcomes and set(outcomes) == {200}, {s: outcomes.count(s) for s in set(outcomes)}


def test_a_request_waiting_for_a_version_a_redeploy_drops_is_served_by_the_newest(server: str, tmp_path: Path) -> None:
    """Serve leaves a call queued for a deployment even after a redeploy deletes it; the ingress
    notices the version left the app and sends the request to the newest version, instead of
    holding it until the old ingress is killed (a 500). Version 1 takes one request at a time
    and is kept busy, so the next one waits for it in Serve's queue; version 2 is pruned, so
    the two answer differently and the test tells which one served."""
    from ray import serve

    from deployments.app import bind_app, build_app
    from deployments.config import ShardserveArgs
    from deployments.types import GenerateRequest

    assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(tmp_path), "--name", "tiny"]) == 0
    pruned = ["--prune", "0.6", "--min-agreement", "0", "--max-perplexity-ratio", "1000"]
    assert shardserve_cli(["compress", "shardserve/tiny-llama", "--repo", str(tmp_path), "--name", "tiny", *pruned]) == 0
    base = {k: v for k, v in TEST_ARGS.items() if k not in ("model", "served_model_name")}
    repo = {"base_path": str(tmp_path), "name": "tiny", "version_policy": "all", "traffic": {1: 1.0}}
    one_at_a_time = {1: {"max_ongoing_requests": 1}}
    app = bind_app(ShardserveArgs.model_validate({**base, "repository": repo}), version_overrides=one_at_a_time)
    serve.run(app, name="dropped", route_prefix="/dropped")
    try:
        handle = serve.get_app_handle("dropped")
        request = GenerateRequest(prompt="Dropped", max_tokens=4, temperature=0, cache=False)
        by_version = {v: handle.generate.remote(request, version=v).result(timeout_s=60).outputs[0].text for v in (1, 2)}
        assert by_version[1] != by_version[2]
        busy = GenerateRequest(prompt="Busy", max_tokens=1000, n=4, ignore_eos=True, temperature=0, cache=False)
        holding = handle.options(stream=True).generate_stream.remote(busy)
        next(holding)  # version 1 is generating it, and takes no other request until it ends
        waiting = handle.generate.remote(request)
        with pytest.raises(TimeoutError):
            waiting.result(timeout_s=0.5)  # queued behind the busy request of version 1

        policy = {"base_path": str(tmp_path), "name": "tiny", "version_policy": "specific", "versions": [2]}
        serve.run(build_app({**base, "repository": policy}), name="dropped", route_prefix="/dropped")
        answer = waiting.result(timeout_s=60)
        assert answer.outputs[0].text == by_version[2]
        finished = [chunk.finish_reason for chunk in holding if chunk.finish_reason]
        assert finished == ["length"] * 4  # the drained version finished what it had
    finally:
        serve.delete("dropped")
