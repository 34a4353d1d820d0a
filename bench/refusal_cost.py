"""What a refusal costs: latency and CPU per 503 while the model replica is full.

    python -m bench.refusal_cost           # about 1 minute
    python -m bench.refusal_cost --quick   # a smoke run

Under overload most requests are refused, so the refusal path's CPU decides how much load a
replica set can turn away before the refusals themselves queue. For each system the model side
is filled first (its running, waiting and Serve-queued places all held by long requests); then
probes arrive at fixed rates, each timed on its own, while the CPU time of every process on the
path is read (Serve's proxy, the ingress replica, this client process), less what each spends
in a quiet interval before (health checks, metrics pushes).
Baseline: the same two hops with nothing of ours, a minimal FastAPI ingress over a deployment
that holds its requests, with the same `max_ongoing_requests` and `max_queued_requests`, so
Serve's router refuses in the same place. Writes bench/results/refusal_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from bench.serving import RESULTS, each_system, log, publish
from bench.workload import percentile

SYSTEMS = {"shardserve": "shardserve", "minimal": "minimal FastAPI ingress over Serve"}
ENGINE = {"max_num_seqs": 4, "max_waiting_requests": 4}
HOLD_TOKENS = 1800  # ~30 s of generation with 4 running on 2 cores: outlasts every phase

minimal_api = FastAPI()
JSON_BODY = Body()  # a body parameter whatever its annotation (postponed annotations are not resolved here)


@serve.deployment
class Held:
    """Takes a request and never answers it (until the client leaves), and keeps a core busy
    meanwhile: a full model replica generating, without the model."""

    def __init__(self) -> None:
        threading.Thread(target=_spin, daemon=True).start()

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.Event().wait()
        return body  # never reached: the wait ends only in cancellation


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(minimal_api)
class MinimalIngress:
    def __init__(self, held: DeploymentHandle) -> None:
        self._held = held

    @minimal_api.post("/v1/completions", response_model=None)
    async def completions(self, body: dict[str, Any] = JSON_BODY) -> dict[str, Any] | JSONResponse:
        try:
            return await self._held.remote(body)
        except BackPressureError:
            error = {"message": "server is overloaded", "type": "overloaded_error"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})


def _spin() -> None:
    while True:
        sum(range(10_000))


def start_system(system: str, model: str, base: str) -> tuple[str, str]:
    """(url, the name of the ingress deployment) on the running Serve."""
    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    if system == "shardserve":
        config = ShardserveArgs(model=model, served_model_name="bench", engine=ENGINE, cache={"enabled": False})
        serve.run(bind_app(config), name=system, route_prefix=f"/{system}")
        return f"{base}/{system}", "Ingress"
    engine = ShardserveArgs(model=model, engine=ENGINE).engine  # the same queue bounds as shardserve's
    held = Held.options(max_ongoing_requests=engine.replica_capacity, max_queued_requests=engine.router_queue_size)
    serve.run(MinimalIngress.bind(held.bind()), name=system, route_prefix=f"/{system}")
    return f"{base}/{system}", "MinimalIngress"


def path_processes(app: str, ingress_deployment: str) -> dict[str, list[int]]:
    """The pids of the processes a refusal passes through, by role."""
    from ray._private import state as gcs_state

    names = {"proxy": "ProxyActor", "ingress": f"ServeReplica:{app}:{ingress_deployment}"}
    roles: dict[str, list[int]] = {"proxy": [], "ingress": [], "client": [os.getpid()]}
    for actor in gcs_state.actors().values():
        for role, name in names.items():
            if actor["State"] == "ALIVE" and actor["ActorClassName"] == name:
                roles[role].append(actor["Pid"])
    assert all(roles.values()), f"a process on the path was not found: {roles}"
    return roles


def cpu_s(roles: dict[str, list[int]]) -> dict[str, float]:
    import psutil

    def one(pid: int) -> float:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system

    return {role: sum(one(pid) for pid in pids) for role, pids in roles.items()}


async def measure(url: str, roles: dict[str, list[int]], rates: list[float], probes: int) -> list[dict[str, Any]]:
    hold = {"prompt": "Hello", "max_tokens": HOLD_TOKENS, "temperature": 0, "ignore_eos": True, "cache": False}
    probe = {**hold, "max_tokens": 8}
    limits = httpx.Limits(max_connections=500)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        holders: list[asyncio.Task[httpx.Response]] = []
        try:
            while not any(task.done() for task in holders):  # fill until a request comes back (refused)
                assert len(holders) < 100, "nothing was refused"
                holders.append(asyncio.ensure_future(client.post("/v1/completions", json=hold)))
                await asyncio.sleep(0.2)
            held = [task for task in holders if not task.done()]
            codes = [task.result().status_code for task in holders if task.done()]
            assert set(codes) == {503}, f"a held request ended early: {codes}"
            log(f"  full with {len(held)} requests held")
            before, start = cpu_s(roles), time.perf_counter()
            await asyncio.sleep(3.0)  # no probes: what the path's processes spend anyway
            after, quiet_s = cpu_s(roles), time.perf_counter() - start
            idle = {role: (after[role] - before[role]) / quiet_s for role in roles}
            phases = [await _phase(client, probe, roles, idle, rate, probes) for rate in rates]
            # A held request that ended freed a place: the probes after it were not all refusals.
            assert not any(task.done() for task in held), "a held request ended during the phases"
            return phases
        finally:
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)


async def _phase(
    client: httpx.AsyncClient, body: dict[str, Any], roles: dict[str, list[int]], idle: dict[str, float], rate: float, n: int
) -> dict[str, Any]:
    """n probes at `rate`; CPU per probe is what each role spent beyond its `idle` rate."""

    async def one() -> tuple[int, float]:
        start = time.perf_counter()
        res = await client.post("/v1/completions", json=body)
        return res.status_code, time.perf_counter() - start

    before, start = cpu_s(roles), time.perf_counter()
    tasks: list[asyncio.Task[tuple[int, float]]] = []
    for i in range(n):  # on a fixed schedule: a late send does not delay the next ones
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one()))
    results = await asyncio.gather(*tasks)
    after, wall_s = cpu_s(roles), time.perf_counter() - start
    refused = sorted(t for code, t in results if code == 503)
    per = {role: (after[role] - before[role] - idle[role] * wall_s) * 1000 / n for role in roles}
    log(f"  {rate:g}/s: {len(refused)}/{n} refused" + (f", p99 {percentile(refused, 99) * 1000:.0f} ms" if refused else ""))
    return {
        "rate": rate,
        "probes": n,
        "refused": len(refused),
        "other": n - len(refused),
        "p50_ms": percentile(refused, 50) * 1000 if refused else None,
        "p99_ms": percentile(refused, 99) * 1000 if refused else None,
        "cpu_ms": per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer probes")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--rates", nargs="+", type=float, default=[10.0, 33.0, 100.0])
    parser.add_argument("--out", type=Path, default=RESULTS / "refusal_cost.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    probes = 30 if args.quick else 100
    report: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "engine": ENGINE,
    }
    for system, base in each_system(SYSTEMS):
        url, ingress = start_system(system, args.model, base)
        report[system] = asyncio.run(measure(url, path_processes(system, ingress), args.rates, probes))
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    engine = report["engine"]
    lines = [
        f"Model `{report['model']}` held full ({engine['max_num_seqs']} running, {engine['max_waiting_requests']} waiting, "
        f"Serve's queue full), then probes at fixed rates, each timed to its whole 503; CPU per probe of each process on "
        f"the path beyond its idle rate{' (quick run)' if report['quick'] else ''}, started {report['started']}.",
        "",
        "| system | probes/s | refused | p50 / p99 | CPU ms per refusal: proxy / ingress / client | refusals per server core-s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system, label in SYSTEMS.items():
        for phase in report.get(system, []):
            cpu = phase["cpu_ms"]
            server = max(cpu["proxy"] + cpu["ingress"], 1e-3)  # idle-corrected: noise could make it <= 0
            latency = f"{phase['p50_ms']:.0f} / {phase['p99_ms']:.0f} ms" if phase["refused"] else "-"
            lines.append(
                f"| {label} | {phase['rate']:g} | {phase['refused']} / {phase['probes']} | {latency} | "
                f"{cpu['proxy']:.1f} / {cpu['ingress']:.1f} / {cpu['client']:.1f} | {1000 / server:.0f} |"
            )
    lines.append("")
    if report.get("shardserve") and report.get("minimal"):
        ours = sum(p["cpu_ms"]["ingress"] for p in report["shardserve"]) / len(report["shardserve"])
        base = sum(p["cpu_ms"]["ingress"] for p in report["minimal"]) / len(report["minimal"])
        lines += [f"Ingress CPU per refusal, shardserve / minimal FastAPI ingress: {ours / base:.2f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
