"""Result-cache benchmark: what a repeated request costs when it is answered from the cache.

    python -m bench.result_cache           # about 2 minutes
    python -m bench.result_cache --quick   # a smoke run

Side by side in one Ray Serve instance: shardserve (bench model) with the in-process cache and
with a Redis cache (a real redis-server on loopback, when installed), and a trivial Serve
deployment that reads the JSON body and answers a constant (the floor: Ray Serve's own proxy,
routing and body transfer).
Sequential requests over HTTP: each unique prompt once (a miss: a real generation), then again
(a hit), non-streamed and streamed. Prints p50/p99 latencies, the generation/hit ratio and the
hit/floor ratio; writes bench/results/result_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Body, FastAPI
from ray import serve

from bench.serving import RESULTS, free_port, log, publish
from bench.workload import percentile

floor_app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(floor_app)
class Floor:
    """Ray Serve's own cost for a request with a JSON body: in Serve the replica fetches the
    body from the proxy with one more call, as any route with a body must."""

    @floor_app.post("/")
    async def answer(self, body=Body()):  # noqa: B008 - no annotation: parsed as a JSON body
        return {"text": "constant", "fields": len(body)}


def timed(http: httpx.Client, path: str, body: dict[str, Any], stream: bool = False) -> tuple[float, str]:
    """Seconds to the whole answer, and the cache status header."""
    start = time.perf_counter()
    if stream:
        with http.stream("POST", path, json={**body, "stream": True}) as res:
            assert res.status_code == 200, res.status_code
            for _ in res.iter_lines():
                pass
            return time.perf_counter() - start, res.headers.get("x-shardserve-cache", "")
    res = http.post(path, json=body)
    assert res.status_code == 200, res.text
    return time.perf_counter() - start, res.headers.get("x-shardserve-cache", "")


def stats(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(seconds, 50) * 1000, "p99_ms": percentile(seconds, 99) * 1000, "n": len(seconds)}


def measure(base: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=300) as http:
        bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} for p in prompts]
        miss, hit, hit_stream = [], [], []
        for i, body in enumerate(bodies):
            t, status = timed(http, "/v1/completions", body)
            assert status == "miss", status
            miss.append(t)
            for _ in range(5):
                t, status = timed(http, "/v1/completions", body)
                assert status == "hit", status
                hit.append(t)
                hit_stream.append(timed(http, "/v1/completions", body, stream=True)[0])
            if (i + 1) % max(1, len(bodies) // 4) == 0:
                log(f"  {base.rsplit('/', 1)[-1]}: {i + 1}/{len(bodies)} prompts")
    return {"generation": stats(miss), "hit": stats(hit), "hit_stream": stats(hit_stream)}


def floor(base: str, n: int) -> dict[str, float]:
    with httpx.Client(base_url=base, timeout=60) as http:
        body = {"prompt": "Benchmark prompt 0: tell me about caching in servers.", "max_tokens": 64, "temperature": 0}
        times = [timed(http, "/", body)[0] for _ in range(n)]
    return stats(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--out", type=Path, default=RESULTS / "result_cache.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from deployments.app import build_app

    prompts = [f"Benchmark prompt {i}: tell me about caching in servers." for i in range(4 if args.quick else 20)]
    max_tokens = 16 if args.quick else 64
    redis_proc, redis_url = None, None
    if shutil.which("redis-server"):
        port = free_port()
        redis_proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        redis_url = f"redis://127.0.0.1:{port}/0"

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    base = f"http://127.0.0.1:{http_port}"
    started = time.strftime("%Y-%m-%d %H:%M")
    report: dict[str, Any] = {"model": args.model, "quick": args.quick, "max_tokens": max_tokens, "started": started}
    try:
        serve.run(Floor.bind(), name="floor", route_prefix="/floor")
        log("Serve floor: a deployment that reads the body and answers a constant")
        report["floor"] = floor(f"{base}/floor", 200 if not args.quick else 20)  # the same JSON body as the hits
        backends = {"memory": None, **({"redis": redis_url} if redis_url else {})}
        for name, url in backends.items():
            log(f"shardserve, {name} result cache")
            cfg = {"model": args.model, "served_model_name": "bench", "cache": {"url": url}}
            serve.run(build_app(cfg), name=f"cache_{name}", route_prefix=f"/cache_{name}")
            report[name] = measure(f"{base}/cache_{name}", prompts, max_tokens)
            serve.delete(f"cache_{name}")
    finally:
        serve.shutdown()
        ray.shutdown()
        if redis_proc is not None:
            redis_proc.terminate()
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    fl = report["floor"]["p50_ms"]
    lines = [
        f"Model `{report['model']}`, {report['max_tokens']} generated tokens per request, sequential requests over HTTP"
        f"{' (quick run)' if report['quick'] else ''}, started {report['started']}.",
        "",
        "| backend | generation p50 | hit p50 | hit p99 | streamed hit p50 | generation / hit | hit / Serve floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("memory", "redis"):
        if name not in report:
            continue
        r = report[name]
        gen, hit = r["generation"]["p50_ms"], r["hit"]["p50_ms"]
        lines.append(
            f"| {name} | {gen:.1f} ms | {hit:.2f} ms | {r['hit']['p99_ms']:.2f} ms | {r['hit_stream']['p50_ms']:.2f} ms "
            f"| {gen / hit:.0f}x | {hit / fl:.2f}x |"
        )
    p99 = report["floor"]["p99_ms"]
    lines += ["", f"Serve floor (a FastAPI deployment reading the body, constant answer): p50 {fl:.2f} ms, p99 {p99:.2f} ms.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
