"""Autoscaling benchmark: the default app under a step of load, with Serve's default policy and
with shardserve's EngineLoadPolicy, side by side.

    python -m bench.autoscaling           # about 6 minutes
    python -m bench.autoscaling --quick   # a smoke run

The app is serve_config.yaml's (args and autoscaling_config) with the delays shortened so that
a run takes minutes (metrics every 1 s over 5 s, upscale after 2 s, downscale after 10 s). The
load: clients in a loop, each request asking for n=4 completions of 64 tokens, for a fixed
time; then nothing until the deployment is back at min_replicas. Serve's default policy counts
requests (each is 1); the engine sees 4 sequences per request. Reported per policy: the replica
timeline, time to the second replica, failed requests, TTFT while loaded, time back to one
replica, and the cold start of the added replica: Serve's decision to RUNNING, and the
constructor's phases (from /metrics). Writes bench/results/autoscaling.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.serving import RESULTS, free_port, log, publish
from bench.workload import percentile

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"default": "Serve default (ongoing requests)", "engine": "EngineLoadPolicy (engine load)"}


def app_config(policy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    autoscaling = copy.deepcopy(next(d for d in app["deployments"] if d["name"] == "LLMServer")["autoscaling_config"])
    autoscaling.update(metrics_interval_s=1, look_back_period_s=5, upscale_delay_s=2, downscale_delay_s=10)
    if policy == "default":
        autoscaling.pop("policy")
    return app["args"], autoscaling


class Timeline:
    """Samples the deployment's state every 0.25 s in a background task."""

    def __init__(self, app: str) -> None:
        self.app, self.samples = app, []  # (t, running replicas, deployment status)
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        from ray import serve

        while True:
            status = serve.status().applications[self.app].deployments["LLMServer"]
            self.samples.append((time.monotonic(), status.replica_states.get("RUNNING", 0), str(status.status)))
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def first(self, predicate, after: float = 0.0) -> float | None:
        return next((t for t, n, s in self.samples if t >= after and predicate(n, s)), None)


async def client_loop(base: str, i: int, until: float, outcomes: list[tuple[bool, float]]) -> None:
    body = {"prompt": f"Client {i} asks about autoscaling. " * 4, "max_tokens": 64, "n": 4, "temperature": 0.7,
            "ignore_eos": True, "stream": True, "cache": False}  # fmt: skip
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        while time.monotonic() < until:
            start, first, ok = time.monotonic(), None, False
            try:
                async with client.stream("POST", "/v1/completions", json=body) as res:
                    ok = res.status_code == 200
                    async for line in res.aiter_lines():
                        if line.startswith("data: {"):
                            first = first or time.monotonic()
                            ok = ok and '"error"' not in line
            except httpx.HTTPError:
                ok = False
            outcomes.append((ok, (first or time.monotonic()) - start))


def startup_phases(base: str) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    phases: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "shardserve:replica_startup_seconds":
                phases.setdefault(s.labels["replica"], {})[s.labels["phase"]] = s.value
    return phases


async def run_policy(base_url: str, policy: str, clients: int, load_s: float) -> dict[str, Any]:
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    args, autoscaling = app_config(policy)
    name = f"autoscale_{policy}"
    app = bind_app(ShardserveArgs.model_validate(args), {"autoscaling_config": autoscaling})
    serve.run(app, name=name, route_prefix=f"/{name}")
    base = f"{base_url}/{name}"
    timeline = Timeline(name)
    timeline.start()
    try:
        before = set(startup_phases(base))
        outcomes: list[tuple[bool, float]] = []
        start = time.monotonic()
        await asyncio.gather(*(client_loop(base, i, start + load_s, outcomes) for i in range(clients)))
        load_end = time.monotonic()
        log(f"  {policy}: load done ({len(outcomes)} requests); waiting for min replicas")
        deadline = load_end + 120
        while time.monotonic() < deadline and timeline.samples[-1][1] != 1:
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)
        phases = {r: p for r, p in startup_phases(base).items() if r not in before}
    finally:
        timeline.stop()
        serve.delete(name)
    decided = timeline.first(lambda n, s: "UPSCALING" in s, start)
    two = timeline.first(lambda n, s: n >= 2, start)
    back = timeline.first(lambda n, s: n == 1, load_end)
    ttft = [t for ok, t in outcomes if ok]
    return {
        "requests": len(outcomes),
        "failed": sum(1 for ok, _ in outcomes if not ok),
        "max_replicas_seen": max(n for _, n, _ in timeline.samples),
        "to_second_replica_s": None if two is None else two - start,
        "upscale_decision_to_running_s": None if two is None or decided is None else two - decided,
        "back_to_min_after_load_s": None if back is None or two is None else back - load_end,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "new_replica_constructor_s": phases,
        "timeline": [(round(t - start, 2), n) for t, n, _ in timeline.samples[:: 4]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "autoscaling.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    clients, load_s = 6, (20 if args.quick else 60)
    started = time.strftime("%Y-%m-%d %H:%M")
    report: dict[str, Any] = {"quick": args.quick, "clients": clients, "load_s": load_s, "started": started}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for policy, label in POLICIES.items():
            log(f"{label}: {clients} clients for {load_s} s")
            report[policy] = asyncio.run(run_policy(f"http://127.0.0.1:{port}", policy, clients, load_s))
    finally:
        serve.shutdown()
        ray.shutdown()
    publish(args.out, report, render(report))


def _s(v: float | None, none: str = "never") -> str:
    return none if v is None else f"{v:.1f} s"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"serve_config.yaml's app (tiny model, min 1 / max 2 replicas, delays shortened), {report['clients']} clients "
        f"x n=4 x 64 tokens for {report['load_s']} s{' (quick run)' if report['quick'] else ''}, started {report['started']}.",
        "",
        "| policy | replicas reached | to 2nd replica | failed / requests | TTFT p50 | TTFT p95 | back to 1 after load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in POLICIES.items():
        r = report[key]
        back = _s(r["back_to_min_after_load_s"], "stayed at 1")
        lines.append(
            f"| {label} | {r['max_replicas_seen']} | {_s(r['to_second_replica_s'])} | {r['failed']} / {r['requests']} | "
            f"{r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p95_s'] * 1000:.0f} ms | {back} |"
        )
    for key in POLICIES:
        r = report[key]
        for replica, phases in r["new_replica_constructor_s"].items():
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
            lines += ["", f"Cold start of the added replica ({key} run): Serve's upscale decision to RUNNING "
                      f"{_s(r['upscale_decision_to_running_s'])}; inside it, the constructor: {parts} "
                      f"(replica {replica[:8]}); the rest is Ray placing the actor and starting its process."]  # fmt: skip
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
