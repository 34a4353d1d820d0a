"""Sharded runners against the unsharded one: decode tokens/s, per-token latency, rank memory.

    python -m bench.parallel            # (tp, pp) in (1,1) (2,1) (1,2) (2,2), and pp=2 overlap on/off
    python -m bench.parallel --quick

Runs the engine in this process over each runner (the ranks are real Ray actors talking gloo),
with the same batch of sequences, and reports each configuration as a ratio to (1, 1). On a
machine with fewer cores than ranks the ranks share cores: expect ratios below 1 there; the
point of the run is that every configuration works and what it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def measure(runner: Any, info: Any, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    from deployments.config import EngineConfig
    from deployments.engine.engine import LLMEngine
    from parallel.runner import SamplingSpec

    engine = LLMEngine(runner, info, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len).scheduler_spec())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, info.vocab_size - 1, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    start = time.perf_counter()
    seqs = [engine.add(p, [(SamplingSpec(), 0)], steps + 1, ignore_eos=True)[0] for p in prompts]
    await asyncio.gather(*(s.queue.get() for s in seqs))
    prefill = time.perf_counter() - start
    steps_before = engine.counters().num_steps
    start = time.perf_counter()

    async def drain(seq: Any) -> None:
        async for _ in engine.stream(seq):
            pass

    await asyncio.gather(*(drain(s) for s in seqs))
    decode = time.perf_counter() - start
    decode_steps = engine.counters().num_steps - steps_before
    return {
        "prefill_s": prefill,
        "decode_tokens_per_s": batch * steps / decode,
        "per_token_latency_ms": decode / decode_steps * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from deployments.config import ShardserveArgs
    from parallel.runners.distributed_runner import DistributedModelRunner
    from parallel.runners.local_runner import LocalModelRunner

    batch, prompt_len, steps = (4, 32, 8) if args.quick else (16, 128, 32)
    configs = [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 2, 1), (2, 2, 0)]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for tp, pp, micro in configs:
            label = f"tp={tp} pp={pp}" + (" no overlap" if micro == 1 else (" overlap" if pp > 1 else ""))
            log(f"loading {label}")
            cfg = ShardserveArgs(
                model=args.model, tensor_parallel_size=tp, pipeline_parallel_size=pp, parallel={"micro_batches": micro}
            )
            kv = cfg.kv_cache_spec()
            if tp * pp == 1:
                runner = LocalModelRunner(cfg.model_spec(), kv)
            else:
                runner = DistributedModelRunner(cfg.model_spec(), kv, cfg.parallel_spec())
            info = runner.load()
            log(f"measuring {label}")
            asyncio.run(measure(runner, info, 2, prompt_len, 2))  # warm-up
            result = {"label": label, "tp": tp, "pp": pp, **asyncio.run(measure(runner, info, batch, prompt_len, steps))}
            if tp * pp > 1:
                result["rank_parameter_mib"] = [round(r.parameter_bytes / 2**20, 1) for r in runner.reports]
                result["rank_peak_rss_mib"] = [round(r.peak_rss_bytes / 2**20) for r in runner.reports]
            rows.append(result)
            runner.shutdown()
    finally:
        ray.shutdown()
    base = rows[0]
    for r in rows:
        r["tokens_per_s_vs_1x1"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    report = {
        "model": args.model,
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_steps": steps,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Model `{report['model']}`, batch {report['batch']}, prompt {report['prompt_len']} tokens, "
        f"{report['decode_steps']} decode steps, {report['cpus']} CPU cores.",
        "",
        "| config | decode tok/s | vs (1,1) | per-token latency | prefill | rank parameters (MiB) | rank peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['label']} | {r['decode_tokens_per_s']:.0f} | {r['tokens_per_s_vs_1x1']:.2f}x | "
            f"{r['per_token_latency_ms']:.1f} ms | {r['prefill_s'] * 1000:.0f} ms | "
            f"{r.get('rank_parameter_mib', '')} | {r.get('rank_peak_rss_mib', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
