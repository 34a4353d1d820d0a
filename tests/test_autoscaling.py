"""The default app's autoscaling, driven for real: replicas rise from min under load and come
back to min after it, and no request fails while replicas start or drain."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import yaml

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


def default_app_with_short_delays() -> tuple[dict[str, Any], dict[str, Any]]:
    """serve_config.yaml's app and LLMServer autoscaling, with test-sized delays and targets."""
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    autoscaling = copy.deepcopy(llm["autoscaling_config"])
    assert autoscaling["policy"]["policy_function"] == "deployments.autoscaling:EngineLoadPolicy"
    autoscaling.update(metrics_interval_s=0.5, look_back_period_s=2, upscale_delay_s=1, downscale_delay_s=4)
    autoscaling["policy"]["policy_kwargs"]["target_num_seqs"] = 4
    return app["args"], autoscaling


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


class Load:
    """Clients in threads, each sending streamed requests back to back until stopped; every
    outcome is kept so that the test can check that none failed."""

    def __init__(self, base: str, clients: int, max_tokens: int) -> None:
        self.base, self.max_tokens = base, max_tokens
        self.outcomes: list[tuple[int, int]] = []  # (status, tokens streamed)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _client(self, i: int) -> None:
        body = {"prompt": f"client {i} says", "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        body |= {"cache": False, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self._stop.is_set():
                tokens, status = 0, 0
                try:
                    with http.stream("POST", "/v1/completions", json=body) as res:
                        status = res.status_code
                        for line in res.iter_lines():
                            event = json.loads(line[6:]) if line.startswith("data: {") else {}
                            if "error" in event:
                                status = 599
                            elif event.get("usage"):
                                tokens = event["usage"]["completion_tokens"]
                except httpx.HTTPError:
                    status = 598
                self.outcomes.append((status, tokens))


def test_replicas_follow_load_and_no_request_fails(server: str) -> None:
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    args, autoscaling = default_app_with_short_delays()
    config = ShardserveArgs.model_validate({**args, "max_model_len": 1024})
    serve.run(bind_app(config, {"autoscaling_config": autoscaling}), name="autoscale", route_prefix="/autoscale")
    base = f"{server}/autoscale"
    try:
        assert running_replicas("autoscale") == 1
        with Load(base, clients=12, max_tokens=48) as heavy:
            wait_until(lambda: running_replicas("autoscale") == 2, timeout_s=90, interval_s=0.25)
            wait_until(lambda: len(heavy.outcomes) >= 24, timeout_s=60)  # both replicas serve for a while
        with Load(base, clients=1, max_tokens=48) as light:  # in flight while a replica drains
            wait_until(lambda: running_replicas("autoscale") == 1, timeout_s=90, interval_s=0.25)
            wait_until(lambda: len(light.outcomes) >= 2, timeout_s=60)
        for load in (heavy, light):
            assert load.outcomes and all(o == (200, 48) for o in load.outcomes), [o for o in load.outcomes if o != (200, 48)]
    finally:
        serve.delete("autoscale")
