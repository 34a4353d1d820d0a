"""The GPU check, in one run: `python -m bench.gpu --out FILE`.

A GPU machine comes to this project now and then, for minutes; this module is what such a run
executes, prepared and tested on CPU beforehand. On one device, without Ray (the engine, the
local runner and the model code only), it checks and measures:

1. correctness: the engine in fp32 and bf16 against transformers on the same device, seeded
   sampling whatever the batch, prefix caching on and off (`bench.gpu_correctness`);
2. speed: decode at several batches and one long prefill of Llama-shaped models of about 1B and
   8B parameters, against transformers' `generate` and the roofline (`bench.gpu_speed`);
3. memory: the KV pool as sized from free memory, peak allocated;
4. host synchronisations, copies and kernel launches per decode step (torch profiler).

It prints one Markdown report and rewrites `--out` after every part, so a run cut short still
leaves what it measured. A part that raises is reported with its error and the rest goes on;
the exit status is 1 when any check failed or any part raised. On cuda it runs the full sizes
within `--budget-s` (parts that would start past it are skipped and say so); on CPU (or with
`--sizes small`) it runs small sizes in seconds (tests/test_gpu_bench.py runs it so that it cannot rot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from bench import gpu_correctness, gpu_speed
from bench.gpu_speed import LLAMA_1B, LLAMA_8B, SMALL_A, SMALL_B, LlamaSize, Roofs, SpeedPlan


@dataclass(frozen=True)
class Sizes:
    """How much each part runs: the whole check on a GPU, or a small one that proves the code."""

    name: str
    models: tuple[str, ...]
    prompts: int
    new_tokens: int
    llamas: tuple[LlamaSize, ...]
    speed: SpeedPlan
    copy_bytes: int
    matmul_n: int


FULL = Sizes(
    "full",
    gpu_correctness.MODELS,
    prompts=16,
    new_tokens=16,
    llamas=(LLAMA_1B, LLAMA_8B),
    speed=SpeedPlan(batches=(1, 32, 128), prompt_len=128, decode_steps=64, prefill_tokens=2048, sync_batches=(1, 32)),
    copy_bytes=2 * 2**30,
    matmul_n=8192,
)
SMALL = Sizes(
    "small",
    ("shardserve/doc-llama", "mistral-7b-v0.1", "gemma-3-1b-it"),
    prompts=4,
    new_tokens=8,
    llamas=(SMALL_A, SMALL_B),
    speed=SpeedPlan(batches=(1, 4), prompt_len=16, decode_steps=8, prefill_tokens=64, sync_batches=(1, 4), sync_steps=2),
    copy_bytes=64 * 2**20,
    matmul_n=512,
)


@dataclass
class Report:
    header: list[str]
    correctness: list[dict[str, str]] = field(default_factory=list)
    decode: list[dict[str, str]] = field(default_factory=list)
    prefill: list[dict[str, str]] = field(default_factory=list)
    memory: list[dict[str, str]] = field(default_factory=list)
    calls: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    def markdown(self) -> str:
        parts = ["# shardserve GPU check", "", *self.header, ""]
        sections = [
            ("Correctness: the engine against transformers on the same device, and against itself", self.correctness),
            ("Decode (greedy, ignore EOS)", self.decode),
            ("Prefill of one prompt", self.prefill),
            ("Memory", self.memory),
            ("Host calls per decode step (torch profiler)", self.calls),
        ]
        for title, rows in sections:
            parts += [f"## {title}", "", table(rows) if rows else "(not run)", ""]
        if self.notes:
            parts += ["## Notes", "", *(f"- {note}" for note in self.notes), ""]
        parts.append(f"Result: {'FAILED' if self.failed else 'all checks held'}")
        return "\n".join(parts) + "\n"


def table(rows: list[dict[str, str]]) -> str:
    headers = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row.get(h, "") for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return requested


def environment(device: str, sizes: Sizes, dtype: str) -> list[str]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        card = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; device: {card}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- sizes: {sizes.name}; speed dtype {dtype}; command: python -m bench.gpu {' '.join(sys.argv[1:])}",
    ]


def run(device: str, sizes: Sizes, parts: set[str], budget_s: float, out: Path | None) -> Report:
    dtype = "bfloat16" if device == "cuda" else "float32"
    report = Report(environment(device, sizes, dtype))
    started = time.monotonic()

    def save() -> None:
        if out is not None:
            out.write_text(report.markdown())

    def attempt(what: str, fn: Callable[[], None]) -> None:
        if time.monotonic() - started > budget_s:
            report.notes.append(f"{what}: skipped, past the {budget_s:.0f} s budget")
            report.failed = True
        else:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one part's fault must not cost the others their run
                report.notes.append(f"{what}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                report.failed = True
        save()

    torch.set_float32_matmul_precision("highest")  # fp32 checks in fp32, not TF32
    scratch = Path(tempfile.mkdtemp(prefix="shardserve-gpu-check-"))
    if "correctness" in parts:
        for name in sizes.models:

            def check(name: str = name) -> None:
                row = gpu_correctness.check_model(name, device, scratch, sizes.prompts, sizes.new_tokens)
                report.correctness.append(row)
                report.failed |= row["ok"] != "yes"

            attempt(f"correctness of {name}", check)
    if "speed" in parts:
        roofs: list[Roofs] = []

        def measure() -> None:
            roof = gpu_speed.measure_roofs(device, getattr(torch, dtype), sizes.copy_bytes, sizes.matmul_n)
            roofs.append(roof)
            report.header.append(
                f"- roofline measured here: copy {roof.bandwidth / 1e9:.0f} GB/s (read + written), "
                f"{sizes.matmul_n}³ {dtype} matrix product {roof.matmul / 1e12:.1f} TFLOP/s"
            )

        attempt("roofline", measure)
        for size in sizes.llamas if roofs else ():

            def speed(size: LlamaSize = size) -> None:
                result = gpu_speed.measure_size(size, device, dtype, roofs[0], sizes.speed, scratch)
                report.decode += result.decode
                report.prefill.append(result.prefill)
                report.memory.append(result.memory)
                report.calls += result.calls

            attempt(f"speed of {size.name}", speed)
    report.notes.append(f"ran in {time.monotonic() - started:.0f} s")
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the Markdown report goes (rewritten after every part)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--sizes", choices=["auto", "small", "full"], default="auto", help="auto: full on cuda, else small")
    parser.add_argument("--parts", default="correctness,speed", help="comma-separated: correctness, speed")
    parser.add_argument("--budget-s", type=float, default=330.0, help="no part starts after this many seconds")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"correctness", "speed"}:
        parser.error(f"--parts: unknown {sorted(parts - {'correctness', 'speed'})}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = pick_device(args.device)
    sizes = {"small": SMALL, "full": FULL}.get(args.sizes, FULL if device == "cuda" else SMALL)
    report = run(device, sizes, parts, args.budget_s, args.out)
    print(report.markdown())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
