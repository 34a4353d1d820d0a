"""/metrics after traffic: the values move by exactly what the traffic did."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import kernels_expected, wait_until


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    res = http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "replica")
            samples[(s.name, labels)] = samples.get((s.name, labels), 0.0) + s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum over replicas of the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def settled(http: httpx.Client, push_interval_s: float = 2.5) -> dict[tuple[str, frozenset], float]:
    """A scrape once the engine counters stop moving for a push interval: the replicas push
    their counters every 2 s, so an earlier test's last requests can still arrive after it ended."""
    import time

    def engine(samples: dict) -> dict:
        return {k: v for k, v in samples.items() if k[0].startswith(("shardserve:generation", "shardserve:request_success"))}

    def still() -> dict | None:
        first = scrape(http)
        time.sleep(push_interval_s)
        return first if engine(scrape(http)) == engine(first) else None

    return wait_until(still, timeout_s=30, interval_s=0)


def test_metrics_move_with_traffic(http) -> None:
    before = settled(http)
    n, max_tokens = 3, 5
    for _ in range(n):
        body = {"prompt": f"metrics {uuid.uuid4().hex}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).status_code == 200
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def engine_caught_up() -> bool:
        nonlocal after
        after = scrape(http)
        return delta("shardserve:request_success_total", finished_reason="length") >= n

    after = before
    wait_until(engine_caught_up, timeout_s=20, interval_s=0.5)  # replicas push every 2 s
    route = "/v1/completions"
    assert delta("shardserve:http_requests_total", route=route, status="200") == n
    assert delta("shardserve:http_requests_total", route=route, status="400") == 1
    assert delta("shardserve:result_cache_misses_total") == n
    assert delta("shardserve:request_success_total", finished_reason="length") == n
    assert delta("shardserve:generation_tokens_total") == n * max_tokens
    assert delta("shardserve:time_to_first_token_seconds_count") == n
    assert delta("shardserve:e2e_request_latency_seconds_count") == n
    assert delta("shardserve:request_time_per_output_token_seconds_count") == n
    assert delta("shardserve:inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert delta("shardserve:prompt_tokens_total") > 0
    assert delta("shardserve:prefix_cache_queries_total") > 0
    assert value(after, "shardserve:num_requests_running") == 0
    assert 0 <= value(after, "shardserve:kv_cache_usage_perc") <= 1
    assert value(after, "shardserve:num_replicas", deployment="LLMServer") == 1
    assert value(after, "shardserve:num_replicas", deployment="Ingress") == 1
    assert value(after, "shardserve:time_to_first_token_seconds_sum") > 0
    kernels = ("cpu_paged", "fused") if kernels_expected() else ("gather_sdpa", "eager")
    info = dict(zip(("attention_backend", "layer_ops"), kernels, strict=True))
    assert value(after, "shardserve:model_info", model_name="tiny-llama", dtype="float32", **info) == 1


def test_unmatched_paths_share_one_label(http) -> None:
    for i in range(3):
        assert http.get(f"/no/such/path/{i}").status_code == 404
    samples = scrape(http)
    assert value(samples, "shardserve:http_requests_total", route="unmatched", status="404") >= 3
    assert not [ls for (n, ls) in samples if n == "shardserve:http_requests_total" and ("route", "/no/such/path/0") in ls]
