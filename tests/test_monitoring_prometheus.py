"""A real Prometheus (Debian's package, which .ci/run installs) scraping a real app on loopback
with the shipped alerting rules: an overload that refuses requests sends the refusal alert
pending, and it clears once requests succeed again; every query of the Grafana dashboard runs
against that Prometheus, and the core panels' return data.

The rules are the shipped file with its rate windows shortened from minutes to 20 s (and
nothing else changed), so that a test can see an alert come and go."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import TEST_ARGS, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = "alerting"
CORE_PANELS = (
    "shardserve:generation_tokens_total",  # throughput
    "shardserve:time_to_first_token_seconds_bucket",  # TTFT
    "shardserve:kv_cache_usage_perc",  # KV usage
    "shardserve:prefix_cache_hits_total",  # cache hits
)


def start_prometheus(tmp: Path, target: str, metrics_path: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    rules = (ROOT / "cluster" / "alerts" / "shardserve-rules.yml").read_text()
    (tmp / "rules.yml").write_text(re.sub(r"\[(5|15)m\]", "[20s]", rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "shardserve", "metrics_path": metrics_path, "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, "prometheus exited at start"
        try:
            return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=30, interval_s=0.2)
    return proc, base


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(the app's URL, Prometheus's URL): an app of its own whose replica takes 2 sequences and
    queues 1, so that a burst is refused."""
    from ray import serve

    from deployments.app import build_app

    engine = {**TEST_ARGS["engine"], "max_num_seqs": 2, "max_waiting_requests": 1}
    serve.run(build_app({**TEST_ARGS, "served_model_name": APP, "engine": engine}), name=APP, route_prefix=f"/{APP}")
    proc, base = start_prometheus(tmp_path_factory.mktemp("prometheus"), server.removeprefix("http://"), f"/{APP}/metrics")
    try:
        yield f"{server}/{APP}", base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        serve.delete(APP)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    res = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = res.json()
    assert res.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def alert_state(base: str, name: str) -> str | None:
    alerts = httpx.get(f"{base}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    states = [a["state"] for a in alerts if a["labels"]["alertname"] == name and a["labels"].get("model_name") == APP]
    return states[0] if states else None


def ask(app: str, max_tokens: int = 4) -> int:
    body = {"prompt": f"Tell me about {uuid.uuid4().hex}", "max_tokens": max_tokens, "ignore_eos": True, "cache": False}
    return httpx.post(f"{app}/v1/completions", json=body, timeout=60).status_code


def test_an_overload_sends_the_refusal_alert_pending_and_it_clears(prometheus: tuple[str, str]) -> None:
    app, base = prometheus
    assert ask(app) == 200
    wait_until(lambda: query(base, 'up{job="shardserve"} == 1'), timeout_s=30, interval_s=0.5)
    assert alert_state(base, "ShardserveRequestsRefused") is None

    stop, statuses = threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            statuses.append(ask(app, max_tokens=64))

    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    try:
        state = wait_until(lambda: alert_state(base, "ShardserveRequestsRefused"), timeout_s=60, interval_s=0.5)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert state in ("pending", "firing")
    assert statuses.count(503) > 0.05 * len(statuses) and set(statuses) <= {200, 503}, set(statuses)

    def cleared() -> bool:
        assert ask(app) == 200  # healthy traffic while the 20 s window drains
        return alert_state(base, "ShardserveRequestsRefused") is None

    wait_until(cleared, timeout_s=90, interval_s=0.5)
    assert alert_state(base, "ShardserveRequestErrors") is None  # refusals are not errors


def test_every_dashboard_query_runs_and_the_core_panels_have_data(prometheus: tuple[str, str]) -> None:
    app, base = prometheus
    for _ in range(3):
        assert ask(app) == 200
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 20
    core = [e for e in exprs if any(m in e for m in CORE_PANELS)]
    assert len(core) >= len(CORE_PANELS)

    def core_have_data() -> bool:
        return all(query(base, e) for e in core)

    wait_until(core_have_data, timeout_s=60, interval_s=1)
    for expr in exprs:
        query(base, expr)  # each one is valid PromQL over the series the app exports
