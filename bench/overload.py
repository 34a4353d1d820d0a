"""Overload benchmark: open-loop arrivals at the sustainable rate and at twice it.

    python -m bench.overload           # about 12-16 minutes on 2 CPU cores
    python -m bench.overload --quick   # a smoke run

For each system: a closed loop at saturation measures the sustainable rate R (completed
requests/s). Then Poisson arrivals at 1x R and 2x R for a fixed window, each request timed on
its own: the status and when it came back, TTFT (streamed), TPOT, e2e and the tokens produced.
Goodput counts requests that completed correctly (exactly max_tokens tokens) within the SLO, per
second of the window plus its drain; its peak is the best of the closed loop, 1x and 2x. The SLO
is one for every system, by default 4x shardserve's e2e p50 in its closed loop on this machine
(so it scales with the machine): a full shardserve holds as many requests waiting as running,
plus a quarter batch in Serve's queue, so an admitted request may wait about one and a quarter
batch times and run one; the rest is margin for bursts of arrivals and for the CPU the refused
traffic takes from the model on a small machine. shardserve bounds its queues (16 running, 16
waiting, 4 queued in Serve) and refuses the rest with 503 and Retry-After; `@serve.batch` over HF
`generate` (the baseline, same Ray Serve, same model) queues everything, so under sustained
overload its queue and latency grow until requests miss the SLO.
Writes bench/results/overload.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.serving import RESULTS, each_system, log, publish
from bench.workload import percentile

SYSTEMS = {"shardserve": "shardserve (bounded queues)", "serve_batch": "@serve.batch + generate (unbounded)"}
SHARDSERVE_ENGINE = {"max_num_seqs": 16, "max_waiting_requests": 16}
SLO_FACTOR = 4.0  # x shardserve's closed-loop e2e p50: see the module docstring


@dataclass
class Outcome:
    """One request as the client saw it; times are seconds from when it was sent."""

    status: int
    status_s: float  # response headers (for a refusal: the whole answer)
    ttft_s: float
    e2e_s: float
    tokens: int
    error_type: str = ""


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> Outcome:
    start = time.perf_counter()
    try:
        if not stream:
            res = await client.post("/v1/completions", json=body)
            end = time.perf_counter() - start
            if res.status_code != 200:
                return Outcome(res.status_code, end, end, end, 0, _error_type(res.content))
            return Outcome(200, end, end, end, res.json()["usage"]["completion_tokens"])
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as res:
            status_s = time.perf_counter() - start
            if res.status_code != 200:
                content = await res.aread()
                end = time.perf_counter() - start
                return Outcome(res.status_code, status_s, end, end, 0, _error_type(content))
            first, tokens, error = None, 0, ""
            async for line in res.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("type", "error")
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter() - start
            end = time.perf_counter() - start
            return Outcome(200 if not error else 599, status_s, first or end, end, tokens, error)
    except httpx.HTTPError as exc:  # a connection the server dropped: counted, never retried
        end = time.perf_counter() - start
        return Outcome(0, end, end, end, 0, type(exc).__name__)


def _error_type(content: bytes) -> str:
    try:
        return json.loads(content)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return "no JSON error body"


def make_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "cache": False}


async def closed_loop(url: str, bodies: list[dict], concurrency: int, stream: bool) -> tuple[list[Outcome], float]:
    """Every body with `concurrency` in flight: the system's saturated rate."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def bounded(body: dict) -> Outcome:
            async with sem:
                return await one_request(client, body, stream)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(bounded(b) for b in bodies))
    return list(outcomes), time.perf_counter() - start


async def open_loop(url: str, bodies: list[dict], rate: float, window_s: float, stream: bool, seed: int) -> tuple[list, float]:
    """Poisson arrivals at `rate` for `window_s` (bounded: at most len(bodies) requests)."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task] = []
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        next_at = 0.0
        for i, body in enumerate(bodies):
            next_at += rng.expovariate(rate)
            if next_at > window_s:
                break
            await asyncio.sleep(max(0.0, next_at - (time.perf_counter() - start)))
            tasks.append(asyncio.ensure_future(one_request(client, body, stream)))
            if i and i % max(1, int(rate * window_s / 5)) == 0:
                log(f"    {i} requests sent, {sum(t.done() for t in tasks)} answered")
        outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall_s: float, max_tokens: int, slo_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    correct = [o for o in ok if o.tokens == max_tokens]
    good = [o for o in correct if o.e2e_s <= slo_s]
    refused = [o for o in outcomes if o.status in (429, 503)]
    other = [o for o in outcomes if o.status not in (200, 429, 503)]
    tpot = [(o.e2e_s - o.ttft_s) / (o.tokens - 1) for o in ok if o.tokens > 1]
    refusal_ms = [o.e2e_s * 1000 for o in refused]
    return {
        "offered": len(outcomes),
        "accepted": len(ok),
        "refused": len(refused),
        "refused_without_json": sum(1 for o in refused if o.error_type == "no JSON error body"),
        "failed_other": len(other),
        "failures": sorted({f"{o.status} {o.error_type}" for o in other}),
        "wrong_token_count": len(ok) - len(correct),
        "within_slo": len(good),
        "wall_s": wall_s,
        "goodput_rps": len(good) / wall_s,
        "goodput_tokens_per_s": len(good) * max_tokens / wall_s,
        "refusal_p50_ms": percentile(refusal_ms, 50),
        "refusal_p99_ms": percentile(refusal_ms, 99),
        "ttft_p50_s": percentile([o.ttft_s for o in ok], 50),
        "ttft_p99_s": percentile([o.ttft_s for o in ok], 99),
        "tpot_p50_ms": percentile(tpot, 50) * 1000,
        "tpot_p99_ms": percentile(tpot, 99) * 1000,
        "e2e_p50_s": percentile([o.e2e_s for o in ok], 50),
        "e2e_p99_s": percentile([o.e2e_s for o in ok], 99),
    }


def start_system(system: str, model: str, model_dir: str, base: str) -> tuple[str, str, bool]:
    """(url, served model name, streams) for a system deployed on the running Serve."""
    import httpx as sync_http
    from ray import serve

    from bench.peers import ServeBatchHF
    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    if system == "shardserve":
        config = ShardserveArgs(model=model, served_model_name="bench", engine=SHARDSERVE_ENGINE, cache={"enabled": False})
        serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 2}}), name=system, route_prefix=f"/{system}")
        url = f"{base}/{system}"
        deadline = time.monotonic() + 300
        while sync_http.get(f"{url}/ready", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("shardserve did not become ready")
            time.sleep(0.5)
        return url, "bench", True
    serve.run(ServeBatchHF.bind(model_dir), name=system, route_prefix=f"/{system}")
    return f"{base}/{system}", model, False


def measure(system: str, url: str, model: str, stream: bool, prompts: list[str], shape: dict[str, Any]) -> dict[str, Any]:
    max_tokens, window_s = shape["max_tokens"], shape["window_s"]
    bodies = [make_body(model, p, max_tokens) for p in prompts]
    asyncio.run(closed_loop(url, bodies[:4], 4, stream))  # warm-up, not measured
    log(f"  {system}: closed loop at concurrency {shape['concurrency']} (the sustainable rate)")
    outcomes, wall = asyncio.run(closed_loop(url, bodies[: shape["calibration_requests"]], shape["concurrency"], stream))
    if shape["slo_s"] is None:  # the first system measured sets it, for every system
        shape["slo_s"] = SLO_FACTOR * summarize(outcomes, wall, max_tokens, float("inf"))["e2e_p50_s"]
        log(f"  SLO: e2e within {shape['slo_s']:.2f} s")
    slo_s = shape["slo_s"]
    saturated = summarize(outcomes, wall, max_tokens, slo_s)
    rate = saturated["accepted"] / wall
    result: dict[str, Any] = {"sustainable_rps": rate, "saturated": saturated, "rates": {}, "streams": stream}
    for factor in (1, 2):
        log(f"  {system}: Poisson arrivals at {factor}x = {factor * rate:.2f} req/s for {window_s:.0f} s")
        count = int(factor * rate * window_s * 2) + 10
        load = [bodies[i % len(bodies)] for i in range(count)]
        outcomes, wall = asyncio.run(open_loop(url, load, factor * rate, window_s, stream, seed=factor))
        result["rates"][f"{factor}x"] = summarize(outcomes, wall, max_tokens, slo_s)
    peak = max(saturated["goodput_rps"], result["rates"]["1x"]["goodput_rps"], result["rates"]["2x"]["goodput_rps"])
    result["peak_goodput_rps"] = peak
    result["goodput_2x_of_peak"] = result["rates"]["2x"]["goodput_rps"] / peak if peak else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    slo_help = f"e2e latency a good request meets (default: {SLO_FACTOR:g}x the first system's closed-loop e2e p50)"
    parser.add_argument("--slo-s", type=float, default=None, help=slo_help)
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from transformers import AutoTokenizer

    from bench import workload
    from parallel.checkpoints.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = {
        "max_tokens": 16 if args.quick else 32,
        "prompt_tokens": [32, 64],
        "concurrency": SHARDSERVE_ENGINE["max_num_seqs"],
        "calibration_requests": 32 if args.quick else 96,
        "window_s": 6.0 if args.quick else 40.0,
        "slo_s": args.slo_s,
    }
    prompts = [r.prompt for r in workload.mixed_workload(tokenizer, 64, seed=11, prompt_range=(32, 64))]
    report: dict[str, Any] = {"model": args.model, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M"), **shape}
    for system, base in each_system({system: SYSTEMS[system] for system in args.systems}):
        url, name, stream = start_system(system, args.model, model_dir, base)
        report[system] = measure(system, url, name, stream, prompts, shape)
        report["slo_s"] = shape["slo_s"]
    publish(args.out, report, render(report))


def tpot(s: dict[str, Any]) -> str:
    return f"{s['tpot_p50_ms']:.0f} / {s['tpot_p99_ms']:.0f} ms"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Model `{report['model']}`, prompts of {report['prompt_tokens'][0]}-{report['prompt_tokens'][1]} tokens, "
        f"{report['max_tokens']} output tokens each, Poisson arrivals for {report['window_s']:.0f} s at 1x and 2x the "
        f"rate each system sustains (closed loop at concurrency {report['concurrency']}); goodput = correct answers "
        f"within {report['slo_s']:.1f} s e2e per second{' (quick run)' if report['quick'] else ''}, started {report['started']}.",
        "",
        "| system | rate | offered | accepted | refused (p50 / p99 ms) | other failures | TTFT p50 / p99 | TPOT p50 / p99 "
        "| e2e p50 / p99 | goodput | of peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system, label in SYSTEMS.items():
        if system not in report:
            continue
        r = report[system]
        peak = r["peak_goodput_rps"] or float("nan")
        rows = {f"closed loop, {report['concurrency']} clients": r["saturated"]}
        rows |= {f"{factor} = {float(factor[:-1]) * r['sustainable_rps']:.1f} req/s": s for factor, s in r["rates"].items()}
        for rate, s in rows.items():
            refused = f"{s['refused']} ({s['refusal_p50_ms']:.0f} / {s['refusal_p99_ms']:.0f})" if s["refused"] else "0"
            per_token = tpot(s) if r.get("streams", True) else "n/a (whole answers)"
            lines.append(
                f"| {label} | {rate} | {s['offered']} | "
                f"{s['accepted']} | {refused} | {s['failed_other']} | {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} s | "
                f"{per_token} | {s['e2e_p50_s']:.2f} / {s['e2e_p99_s']:.2f} s | "
                f"{s['goodput_rps']:.2f} req/s | {s['goodput_rps'] / peak:.0%} |"
            )
    lines.append("")
    if "shardserve" in report and "serve_batch" in report:
        ours, base = report["shardserve"]["rates"]["2x"], report["serve_batch"]["rates"]["2x"]
        ratio = ours["goodput_rps"] / base["goodput_rps"] if base["goodput_rps"] else float("inf")
        lines += [f"Goodput at 2x the sustainable rate, shardserve / @serve.batch: {ratio:.2f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
