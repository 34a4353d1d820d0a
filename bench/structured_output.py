"""What structured output costs: time per output token with a JSON schema against without it.

    python -m bench.structured_output            # about 6 minutes on 2 CPU cores
    python -m bench.structured_output --quick    # a smoke run

vLLM's CPU backend (which uses xgrammar too) and shardserve, each alone on the machine, in turn,
on the same model and prompts: greedy completions at concurrency 1 and 8, streamed, once free and
once under `response_format: json_schema` (an array of objects with bounded strings and
integers, so that outputs end inside max_tokens); at concurrency 1 the two alternate request by
request, so that drift of the machine between runs does not pass for a cost. The figure of merit is each system's TPOT
ratio constrained / free (the issue's aim: under 1.10), then shardserve against vLLM.
Writes bench/results/structured_output.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from bench.serving import RESULTS, log, publish, running_shardserve, running_vllm, save

SYSTEMS = ["vllm_cpu", "shardserve"]
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "score": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "score", "ok"],
                "additionalProperties": False,
            },
            "minItems": 2,
            "maxItems": 6,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=RESULTS / "structured_output.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from transformers import AutoTokenizer

    from bench import workload
    from parallel.checkpoints.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = {1: 2, 8: 8} if args.quick else {1: 8, 8: 32}
    loads = {
        c: workload.mixed_workload(tokenizer, n, seed=c, prompt_range=(64, 256), output_range=(160, 160))
        for c, n in counts.items()
    }
    warmup = workload.mixed_workload(tokenizer, 2, seed=999, output_range=(8, 8))
    report: dict[str, Any] = {"model": args.model, "quick": args.quick, "schema": SCHEMA, "levels": {}}

    def measure(system: str, url: str, model_name: str) -> None:
        for extra in (None, CONSTRAINED):  # warm both paths (the schema compiles once)
            asyncio.run(workload.run_load(url, model_name, warmup, 2, stream=True, extra=extra))
        for c, reqs in loads.items():
            if c == 1:  # one request at a time, free and constrained in turn: both see the same machine
                runs: dict[str, tuple[list, float]] = {"free": ([], 0.0), "json_schema": ([], 0.0)}
                for req in reqs:
                    for mode, extra in (("free", None), ("json_schema", CONSTRAINED)):
                        results, wall = asyncio.run(workload.run_load(url, model_name, [req], 1, True, extra=extra))
                        runs[mode] = (runs[mode][0] + results, runs[mode][1] + wall)
                log(f"  {system} c=1: {len(reqs)} requests each way, alternating")
            else:
                runs = {
                    mode: asyncio.run(
                        workload.run_load(url, model_name, reqs, c, True, extra=extra, progress=f"{system} c={c} {mode}")
                    )
                    for mode, extra in (("free", None), ("json_schema", CONSTRAINED))
                }
            for mode, (results, wall) in runs.items():
                report["levels"].setdefault(str(c), {}).setdefault(system, {})[mode] = workload.summarize(results, wall)
        save(args.out, report)

    if "vllm_cpu" in args.systems:  # before Ray: alone on the machine
        with running_vllm(model_dir) as url:
            measure("vllm_cpu", url, "bench")
    if "shardserve" in args.systems:
        with running_shardserve(args.model, model_dir) as (url, name):
            measure("shardserve", url, name)
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Structured output cost ({report['model']}, greedy, streamed, 160 max tokens)",
        "",
        "| c | system | TPOT p50 free | TPOT p50 json_schema | ratio | tok/s free | tok/s schema | tokens/req schema |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, systems in report["levels"].items():
        for system, modes in systems.items():
            free, constrained = modes.get("free"), modes.get("json_schema")
            if not free or not constrained:
                continue
            per_request = constrained["output_tokens"] / max(1, constrained["requests"] - constrained["failed"])
            lines.append(
                f"| {c} | {system} | {free['tpot_p50_s'] * 1e3:.1f} ms | {constrained['tpot_p50_s'] * 1e3:.1f} ms | "
                f"{constrained['tpot_p50_s'] / free['tpot_p50_s']:.2f}x | {free['output_tokens_per_s']:.1f} | "
                f"{constrained['output_tokens_per_s']:.1f} | {per_request:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
