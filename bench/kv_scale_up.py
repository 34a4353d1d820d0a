"""The scale-up scenario of `python -m bench.kv_tier --scenarios scale_up`: Serve's autoscaler adds
a second replica during a shared-prefix load, and the new replica's TTFT is set against the old
one's over the same stretch of time.

The load: `clients` closed-loop streams over `prefixes` prefixes of ~1,500 tokens, each request
with a suffix of its own; the prefixes are seen twice before the load starts (so the node's store
holds them). Which replica served a request is not in the response, so each replica's TTFT comes
from its own histogram on `/metrics` (the delta since the new replica first reported): p50 as
Prometheus' `histogram_quantile` computes it (linear within a bucket), and the exact mean.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import workload
from bench.kv_tier import PREFIX_TOKENS, deploy, fresh_store, ids, store_stats, ttfts
from bench.serving import log

TTFT = "shardserve:time_to_first_token_seconds"
SCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 3, "upscale_delay_s": 2}


def per_replica(url: str) -> dict[str, dict[str, Any]]:
    """Each LLM server replica's TTFT histogram (cumulative buckets, count, sum) and tier hits."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            replica = s.labels.get("replica")
            if replica is None:
                continue
            r = out.setdefault(replica, {"buckets": {}, "count": 0.0, "sum": 0.0, "tier_tokens": 0.0})
            if s.name == f"{TTFT}_bucket":
                r["buckets"][float(s.labels["le"])] = s.value
            elif s.name == f"{TTFT}_count":
                r["count"] = s.value
            elif s.name == f"{TTFT}_sum":
                r["sum"] = s.value
            elif s.name == "shardserve:kv_tier_hit_tokens_total":
                r["tier_tokens"] = s.value
    return {k: v for k, v in out.items() if v["buckets"]}


def since(now: dict[str, Any], then: dict[str, Any] | None) -> dict[str, Any]:
    if then is None:
        return now
    return {
        "buckets": {le: n - then["buckets"].get(le, 0.0) for le, n in now["buckets"].items()},
        "count": now["count"] - then["count"],
        "sum": now["sum"] - then["sum"],
        "tier_tokens": now["tier_tokens"] - then["tier_tokens"],
    }


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


async def _load(url: str, prefixes: int, clients: int, stop: asyncio.Event, ttft: list[tuple[float, float]]) -> None:
    serial = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(k: int) -> None:
            while not stop.is_set():
                n = next(serial)
                body = {"model": "bench", "prompt": ids(n % prefixes, PREFIX_TOKENS) + ids(1_000_000 + n, 16), "max_tokens": 8}
                result = await workload.streamed(client, {**body, "temperature": 0})
                if not result.ok:
                    raise RuntimeError("a request failed during the scale-up")
                ttft.append((time.monotonic(), result.ttft_s))

        await asyncio.gather(*(one(k) for k in range(clients)))


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("kvsu")
    if app is None or "LLMServer" not in app.deployments:
        return 0
    return app.deployments["LLMServer"].replica_states.get("RUNNING", 0)


async def _run(
    url: str, prefixes: int, clients: int, new_requests: int, timeout_s: float, after_join_s: float = 120.0
) -> dict[str, Any]:
    stop, ttft = asyncio.Event(), []
    load = asyncio.create_task(_load(url, prefixes, clients, stop, ttft))
    started = time.monotonic()
    (old,) = (await asyncio.to_thread(per_replica, url)).keys()
    baseline: dict[str, Any] = {}
    joined_at = None
    try:
        while time.monotonic() - started < timeout_s:
            await asyncio.sleep(1.0)
            if load.done():
                load.result()
            if joined_at is None and await asyncio.to_thread(_running_replicas) == 2:
                joined_at = time.monotonic()
                baseline = {old: (await asyncio.to_thread(per_replica, url))[old]}
                log(f"  scale-up: a second replica running after {joined_at - started:.0f} s of load")
            if joined_at is not None:
                seen = await asyncio.to_thread(per_replica, url)
                new = [r for r in seen if r != old]
                if (new and seen[new[0]]["count"] >= new_requests) or time.monotonic() - joined_at > after_join_s:
                    break
    finally:
        stop.set()
        await load
    if joined_at is None:
        raise RuntimeError("the autoscaler added no replica")
    await asyncio.sleep(3.0)  # the replicas' last pushes
    seen = await asyncio.to_thread(per_replica, url)
    new = next((r for r in seen if r != old), None)  # a replica never sent a request never reports
    empty = {"buckets": {float("inf"): 0.0}, "count": 0.0, "sum": 0.0, "tier_tokens": 0.0}
    rows = {}
    for name, replica in (("old", old), ("new", new)):
        d = since(seen[replica], baseline.get(replica)) if replica is not None else empty
        rows[name] = {
            "requests": d["count"],
            "ttft_p50_s": quantile(0.5, d["buckets"]),
            "ttft_mean_s": d["sum"] / max(d["count"], 1),
            "tier_hit_tokens": d["tier_tokens"],
        }
    before = [t for at, t in ttft if at < joined_at]
    return {
        **rows,
        "new_over_old_p50": rows["new"]["ttft_p50_s"] / rows["old"]["ttft_p50_s"],
        "new_share": rows["new"]["requests"] / max(rows["new"]["requests"] + rows["old"]["requests"], 1),
        "seconds_to_second_replica": joined_at - started,
        "one_replica_client_ttft_p50_s": sorted(before)[len(before) // 2] if before else float("nan"),
    }


def scale_up(
    base: str, tier: bool, routing: str, prefixes: int = 8, clients: int = 8, new_requests: int = 24
) -> dict[str, Any]:
    """1 -> 2 replicas under load, with the tier on or off, and a router (`routing:`)."""
    from ray import serve

    fresh_store()
    url = deploy("kvsu", base, tier=tier, replicas={"autoscaling_config": SCALING}, routing=routing)
    warm = [ids(i, PREFIX_TOKENS) + ids(900_000 + 100 * i + v, 16) for v in range(2) for i in range(prefixes)]
    asyncio.run(ttfts(url, warm))
    if tier:
        chunks = (PREFIX_TOKENS + 16 - 1) // 16 // 8
        deadline = time.monotonic() + 120
        while store_stats().held_chunks < prefixes * chunks:
            if time.monotonic() > deadline:
                raise RuntimeError("the prefixes were not stored")
            time.sleep(0.2)
    try:
        result = asyncio.run(_run(url, prefixes, clients, new_requests, timeout_s=300))
    finally:
        serve.delete("kvsu")
    new, old = result["new"]["ttft_p50_s"] * 1000, result["old"]["ttft_p50_s"] * 1000
    log(f"  scale-up, tier {'on' if tier else 'off'}, {routing}: new replica TTFT p50 {new:.0f} ms vs old {old:.0f} ms")
    return {"prefixes": prefixes, "clients": clients, "routing": routing, **result}
