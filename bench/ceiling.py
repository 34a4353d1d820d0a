"""In-process measurements with no server: the engine's decode rate against the raw model.

`raw_decode_tokens_per_s` is the ceiling: the HF model's own forward with its KV cache, batch B,
one token per sequence per call, nothing else (on a runner loaded with `fused_ops=False`, whose
model keeps its own q/k/v and gate/up layers: a fused model's parts each compute the whole
fused layer when transformers calls them one by one). `engine_decode_tokens_per_s` drives shardserve's
engine (scheduler, block manager, paged forward, sampling) with B sequences of the same shape and
times the same decode steps. `prefill_seconds` is one bare forward over a prompt (for TTFT).
"""

from __future__ import annotations

import asyncio
import time

import torch
from transformers import DynamicCache

from deployments.config import EngineConfig, ShardserveArgs
from deployments.engine.engine import LLMEngine
from parallel.runner import SamplingSpec
from parallel.runners.local_runner import LocalModelRunner


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


@torch.inference_mode()
def raw_decode_tokens_per_s(model: torch.nn.Module, batch: int, prompt_len: int, steps: int) -> float:
    ids = torch.randint(10, model.config.vocab_size - 1, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - start)


@torch.inference_mode()
def prefill_seconds(model: torch.nn.Module, prompt_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def engine_decode_tokens_per_s(
    runner: LocalModelRunner, info: object, batch: int, prompt_len: int, steps: int, max_num_batched_tokens: int | None = None
) -> float:
    """`max_num_batched_tokens`: the prefills' step budget (None: every prompt in one step); on
    cuda, no more than the profiling forward that sized the pool ran."""
    budget = max_num_batched_tokens or batch * prompt_len

    async def run() -> float:
        engine = LLMEngine(runner, info, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=budget))
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
