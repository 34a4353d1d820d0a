"""In-process measurements with no server: the engine's decode rate against its own forward.

`forward_decode_tokens_per_s` is the ceiling: the runner's paged forward alone (the same model
code the engine steps: packed and fused layers, the paged attention kernel), batch B, one token
per sequence per forward, nothing else (no scheduler, sampling, streaming or thread hop).
`engine_decode_tokens_per_s` drives shardserve's engine (scheduler, block manager, paged
forward, sampling) with B sequences of the same shape and times the same decode steps.
`forward_prefill_seconds` is one bare forward over a prompt through the same code (for TTFT).
"""

from __future__ import annotations

import asyncio
import time

import torch

from deployments.config import EngineConfig, ShardserveArgs
from deployments.engine.engine import LLMEngine
from parallel.runner import SamplingSpec, SequenceStep, StepInput
from parallel.runners.local_runner import LocalModelRunner

BLOCK_SIZE = ShardserveArgs().kv_cache_spec().block_size


def load_runner(
    model: str,
    max_model_len: int | None = None,
    threads: int | None = None,
    attention_backend: str = "auto",
    fused_ops: bool = True,
) -> tuple[LocalModelRunner, object]:
    """The runner a replica with default settings would have (with `threads` torch threads)."""
    args = ShardserveArgs(
        model=model, max_model_len=max_model_len, attention_backend=attention_backend, cpu_fused_ops=fused_ops
    )
    runner = LocalModelRunner(args.model_spec(), args.kv_cache_spec(), threads)
    return runner, runner.load()


def decode_step(batch: int, context: int, block_size: int = BLOCK_SIZE) -> StepInput:
    """B sequences one token past `context` cached tokens each (their K/V is whatever the pool
    holds: timing does not depend on the values)."""
    per_seq = -(-(context + 1) // block_size)
    seqs = []
    for i in range(batch):
        table = list(range(i * per_seq, (i + 1) * per_seq))
        seqs.append(SequenceStep(i, [11 + i], context, table, SamplingSpec()))
    return StepInput(seqs)


def prefill_step(token_ids: list[int], block_size: int = BLOCK_SIZE) -> StepInput:
    table = list(range(-(-len(token_ids) // block_size)))
    return StepInput([SequenceStep(0, list(token_ids), 0, table, SamplingSpec())])


def forward_decode_tokens_per_s(runner: LocalModelRunner, batch: int, context: int, steps: int) -> float:
    """The paged forward alone, `steps` decode forwards of `batch` sequences at `context` (run it
    on the model thread: `runner.on_model_thread`)."""
    paged, step = runner.paged, decode_step(batch, context, runner.paged.cache.block_size)
    paged.forward(paged.prepare(step))  # warm
    start = time.perf_counter()
    for _ in range(steps):
        paged.forward(paged.prepare(step))
    return batch * steps / (time.perf_counter() - start)


def forward_prefill_seconds(runner: LocalModelRunner, token_ids: list[int]) -> float:
    """One paged forward over a fresh prompt (on the model thread), logits of its last token."""
    paged = runner.paged
    prepared = paged.prepare(prefill_step(token_ids, paged.cache.block_size))
    start = time.perf_counter()
    paged.forward(prepared)
    return time.perf_counter() - start


def engine_decode_tokens_per_s(
    runner: LocalModelRunner, info: object, batch: int, prompt_len: int, steps: int, max_num_batched_tokens: int | None = None
) -> float:
    """`max_num_batched_tokens`: the prefills' step budget (None: every prompt in one step); on
    cuda, no more than the profiling forward that sized the pool ran."""
    budget = max_num_batched_tokens or batch * prompt_len

    async def run() -> float:
        engine = LLMEngine(runner, info, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=budget).scheduler_spec())
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, info.vocab_size - 1, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        seqs = [engine.add(p, [(SamplingSpec(), 0)], steps + 1, ignore_eos=True)[0] for p in prompts]
        first = [seq.queue.get() for seq in seqs]  # every prefill done: decode starts
        await asyncio.gather(*first)
        start = time.perf_counter()
        await asyncio.gather(*(_drain(engine, s) for s in seqs))
        return batch * steps / (time.perf_counter() - start)

    return asyncio.run(run())


async def _drain(engine: LLMEngine, seq: object) -> None:
    async for _ in engine.stream(seq):  # type: ignore[arg-type]
        pass
