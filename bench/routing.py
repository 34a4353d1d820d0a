"""Prefix-aware routing benchmark: multi-turn chats on two LLM server replicas.

    python -m bench.routing           # about 5 minutes
    python -m bench.routing --quick   # a smoke run

Each conversation has its own system prompt and several turns, each turn adding about as much
text again, and the user thinks 0.5-2 s between turns; every turn resends the whole history,
as chat clients do. (Without think time Serve's power-of-two router already keeps most turns
together: the replica that just finished a chat's turn has the shorter queue when the next turn
arrives.) Conversations run concurrently, turns in order. The same
workload runs against two replicas routed by shardserve's prefix-affinity router and by Ray
Serve's default power-of-two-choices router. Reported: the engines' prefix-cache hit rate
(cached prompt tokens / prompt tokens, from /metrics) and TTFT of the follow-up turns.
Writes bench/results/routing.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.serving import RESULTS, free_port, log, publish
from bench.workload import percentile

THINK_S = (0.5, 2.0)
VOCABULARY = ["ray", "serve", "cache", "replica", "token", "prompt", "model", "node", "batch", "queue", "shard", "rank"]
ROUTERS = {"prefix_affinity": "prefix-affinity (shardserve)", "power_of_two": "power of two choices (Serve default)"}


async def conversation(client: httpx.AsyncClient, seed: int, turns: int, max_tokens: int) -> list[tuple[int, float]]:
    """(turn, TTFT) of each turn of one chat."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(VOCABULARY) for _ in range(n))

    messages = [{"role": "system", "content": f"Conversation {seed}. Background: {words(100)}"}]
    out = []
    for turn in range(turns):
        # Each turn adds as much text as the system prompt: what a replica that did not serve
        # the previous turn must read again.
        messages.append({"role": "user", "content": f"Question {turn}: {words(100)}?"})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "cache": False}
        start, first, text = time.perf_counter(), None, []
        async with client.stream("POST", "/v1/chat/completions", json=body) as res:
            assert res.status_code == 200, res.status_code
            async for line in res.aiter_lines():
                if line.startswith("data: {"):
                    first = first or time.perf_counter()
                    for choice in json.loads(line[6:])["choices"]:
                        text.append(choice["delta"].get("content") or "")
        out.append((turn, (first or time.perf_counter()) - start))
        messages.append({"role": "assistant", "content": "".join(text)})
        await asyncio.sleep(rng.uniform(*THINK_S))  # the user reads and types; other chats go on
    return out


def counter(base: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def drive(base: str, conversations: int, turns: int, concurrency: int, max_tokens: int) -> list[tuple[int, float]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def one(seed: int) -> list[tuple[int, float]]:
            async with sem:
                return await conversation(client, seed, turns, max_tokens)

        results = await asyncio.gather(*(one(s) for s in range(conversations)))
    return [r for conv in results for r in conv]


def run_router(base: str, router: str, model: str, conversations: int, turns: int, concurrency: int, max_tokens: int) -> dict:
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    config = ShardserveArgs(model=model, served_model_name="bench", routing=router)
    serve.run(bind_app(config, {"num_replicas": 2}), name=router, route_prefix=f"/{router}")
    url = f"{base}/{router}"
    try:
        deadline = time.monotonic() + 60
        while counter(url, "shardserve:num_replicas") < 3 and time.monotonic() < deadline:  # 2 LLM servers + ingress
            time.sleep(0.5)
        before = {n: counter(url, n) for n in ("shardserve:prompt_tokens_total", "shardserve:prefix_cache_hits_total")}
        start = time.perf_counter()
        results = asyncio.run(drive(url, conversations, turns, concurrency, max_tokens))
        wall = time.perf_counter() - start
        prompt = hits = 0.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # replicas push their counters every 2 s
            prompt = counter(url, "shardserve:prompt_tokens_total") - before["shardserve:prompt_tokens_total"]
            hits = counter(url, "shardserve:prefix_cache_hits_total") - before["shardserve:prefix_cache_hits_total"]
            time.sleep(2.5)
            if counter(url, "shardserve:prompt_tokens_total") - before["shardserve:prompt_tokens_total"] == prompt:
                break
    finally:
        serve.delete(router)
    follow = [t for turn, t in results if turn > 0]
    first = [t for turn, t in results if turn == 0]
    return {
        "prefix_hit_rate": hits / prompt if prompt else float("nan"),
        "followup_ttft_p50_s": percentile(follow, 50),
        "followup_ttft_p95_s": percentile(follow, 95),
        "first_turn_ttft_p50_s": percentile(first, 50),
        "wall_s": wall,
        "turns": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--out", type=Path, default=RESULTS / "routing.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    conversations, turns = (4, 3) if args.quick else (24, 5)
    shape = {"conversations": conversations, "turns": turns, "concurrency": 8, "max_tokens": 16}
    report: dict[str, Any] = {"model": args.model, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M"), **shape}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for router in ROUTERS:
            log(f"two replicas, {ROUTERS[router]}")
            report[router] = run_router(
                f"http://127.0.0.1:{port}", router, args.model, conversations, turns, shape["concurrency"], shape["max_tokens"]
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Model `{report['model']}`, 2 replicas, {report['conversations']} conversations x {report['turns']} turns "
        f"({report['concurrency']} at a time; system prompt and each question ~100 words; 0.5-2 s think time)"
        f"{' (quick run)' if report['quick'] else ''}, "
        f"started {report['started']}.",
        "",
        "| router | prefix-cache hit rate | follow-up TTFT p50 | follow-up TTFT p95 | first-turn TTFT p50 | wall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in ROUTERS.items():
        r = report[key]
        lines.append(
            f"| {label} | {r['prefix_hit_rate']:.0%} | {r['followup_ttft_p50_s'] * 1000:.0f} ms | "
            f"{r['followup_ttft_p95_s'] * 1000:.0f} ms | {r['first_turn_ttft_p50_s'] * 1000:.0f} ms | {r['wall_s']:.1f} s |"
        )
    ours, base = report["prefix_affinity"], report["power_of_two"]
    ratio = base["followup_ttft_p50_s"] / ours["followup_ttft_p50_s"]
    lines += ["", f"Follow-up TTFT p50, power-of-two / prefix-affinity: {ratio:.2f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
