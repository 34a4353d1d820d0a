"""Where one engine step's time goes, in process, for a decode-heavy and a prefill-heavy step.

    python -m bench.step_profile                    # bench model, decode batch 1 and 16, prefill 512
    python -m bench.step_profile --model PATH --top 25
    python -m bench.step_profile --attention gather_sdpa    # the backend without the CPU kernel

For each shape: the step split into its parts (building the step's index tensors, the paged
forward, sampling), timed over repeated runs of the same step on the model thread, then the
torch profiler's table of the forward's operators (self CPU time). BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.ceiling import BLOCK_SIZE, decode_step, load_runner, prefill_step
from parallel.model.cpu_attention import BACKENDS
from parallel.model.sampling import sample_step
from parallel.runner import StepInput
from parallel.runners.local_runner import LocalModelRunner


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile(runner: LocalModelRunner, name: str, step: StepInput, repeats: int, top: int) -> dict[str, float]:
    """The step's parts timed on the model thread, the whole step as the engine calls it (with
    the hop to the model thread), then the operators of `repeats` forwards."""
    paged = runner.paged

    def parts() -> tuple[dict[str, float], str]:
        batch = paged.prepare(step)
        logits = paged.forward(batch)
        timings = {
            "prepare_ms": median_ms(lambda: paged.prepare(step), repeats),
            "forward_ms": median_ms(lambda: paged.forward(batch), repeats),
            "sample_ms": median_ms(lambda: sample_step(logits, step), repeats),
        }
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                paged.forward(batch)
        return timings, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)

    timings, table = runner.on_model_thread(parts)
    timings["step_ms"] = median_ms(lambda: runner.step(step), repeats)
    print(f"\n== {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()), flush=True)
    print(table, flush=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shardserve/bench-llama")
    parser.add_argument("--context", type=int, default=300, help="cached tokens of each decoding sequence")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--top", type=int, default=15, help="operators shown per table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the model (default: torch's)")
    parser.add_argument("--attention", choices=BACKENDS, default="auto", help="attention_backend of the runner")
    args = parser.parse_args()
    runner, info = load_runner(args.model, threads=args.threads, attention_backend=args.attention)
    assert info.block_size == BLOCK_SIZE
    threads = runner.on_model_thread(torch.get_num_threads)
    attention = info.attention_backend
    print(f"{args.model}: torch {torch.__version__}, {threads} threads, block size {BLOCK_SIZE}, attention {attention}")
    try:
        for batch in (1, 16):
            step = decode_step(batch, args.context)
            profile(runner, f"decode batch {batch} at context {args.context}", step, args.repeats, args.top)
        prompt = [(7 * j) % 1000 + 10 for j in range(512)]
        profile(runner, "prefill of 512 tokens", prefill_step(prompt), max(3, args.repeats // 10), args.top)
    finally:
        runner.shutdown()


if __name__ == "__main__":
    main()
