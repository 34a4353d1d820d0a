"""The engine's outputs on one device, against transformers' forward there and against itself.

Part 1 of `python -m bench.gpu`. For each model (the built-in ones, and checkpoints shaped like
Llama 3.2 with its llama3 rope scaling, Qwen3 with q/k norms, Mistral with a sliding window and
Gemma 3 with local and global layers: `parallel.checkpoints.shaped_models`), on the bench's device:

- float32, then bfloat16: the engine's logits after each prompt against transformers' eager
  forward in the same dtype, and its greedy tokens against transformers' (a whole forward per
  token, no cache: nothing of transformers' cache classes is relied on); transformers' own bf16
  against its fp32 is shown beside, as the yardstick of what bf16 alone changes;
- seeded sampling: each prompt alone against all prompts in one batch (bf16);
- prefix caching: greedy tokens computed over cached blocks against prefix caching off (bf16).

Two greedy sequences may part where the reference's best two tokens are tied within the dtype's
noise; a parting counts as a failure only where that margin is wider than the tolerance: in
fp32 twice the logits difference the check admits, in bf16 twice what bf16 changes in
transformers' own logits (never what the engine differs by, which a fault of ours would widen).
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from parallel.checkpoints.builtin_models import ensure_builtin_model, is_builtin
from parallel.checkpoints.shaped_models import write_shaped_checkpoint
from parallel.runner import KVCacheSpec, ModelSpec, SampledToken, SamplingSpec, SequenceStep, StepInput
from parallel.runners.local_runner import LocalModelRunner

MODELS = (
    "shardserve/doc-llama",
    "shardserve/tiny-llama",
    "llama-3.2-1b-instruct",
    "qwen3-0.6b",
    "mistral-7b-v0.1",
    "gemma-3-1b-it",
)
BLOCK_SIZE = 16
KV = KVCacheSpec.fixed(block_size=BLOCK_SIZE, num_blocks=1024)
SHARED_TOKENS = 2 * BLOCK_SIZE  # every prompt starts with two full blocks: the prefix cache's share
TIE_FLOOR = 1e-2  # bf16 carries 8 bits of mantissa: logits of order 1 are ties within this
FP32_LOGITS_TOL = 1e-3  # absolute, per unit of the logits' largest magnitude
BF16_LOGITS_TOL = 5e-2  # relative to the logits' largest magnitude
GREEDY = SamplingSpec(logprobs=2)  # the top two: the margin where two runs of the engine part
SEEDED = SamplingSpec(temperature=0.8, top_p=0.95)


@dataclass(frozen=True)
class Agreement:
    """How two sets of greedy sequences compare, prompt by prompt."""

    identical: int
    near_tie: int
    """Parted at a token whose reference margin was within the tolerance: noise, not a fault."""
    diverged: int
    """Parted where the reference's choice was clear: a real difference."""

    def __str__(self) -> str:
        total = self.identical + self.near_tie + self.diverged
        text = f"{self.identical}/{total}"
        if self.near_tie:
            text += f" (+{self.near_tie} at a tie)"
        if self.diverged:
            text += f", {self.diverged} DIVERGED"
        return text


def agreement(tokens: list[list[int]], reference: list[list[int]], margins: list[list[float]], tol: float) -> Agreement:
    identical = near_tie = diverged = 0
    for got, want, margin in zip(tokens, reference, margins, strict=True):
        parted = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if parted is None:
            identical += 1
        elif margin[parted] <= tol:
            near_tie += 1
        else:
            diverged += 1
    return Agreement(identical, near_tie, diverged)


def make_prompts(count: int, vocab_size: int) -> list[list[int]]:
    """`count` prompts that share two full blocks, longer than every shrunk sliding window (32)."""
    span = min(400, vocab_size - 30)
    shared = [11 + (5 * j) % span for j in range(SHARED_TOKENS)]
    return [shared + [20 + (7 * i + 3 * j) % span for j in range(9 + 7 * i)] for i in range(count)]


def model_dir(name: str, scratch: Path) -> Path:
    if is_builtin(name):
        return ensure_builtin_model(name)
    return write_shaped_checkpoint(name, scratch / name)


@dataclass(frozen=True)
class Reference:
    logits: torch.Tensor  # [prompts, vocab] after each prompt, float32
    tokens: list[list[int]]
    margins: list[list[float]]
    """At each greedy step, the best logit less the second best."""


@torch.inference_mode()
def transformers_greedy(path: Path, dtype: str, device: str, prompts: list[list[int]], new_tokens: int) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager")
    model = model.to(device).eval()
    firsts, tokens, margins = [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out, margin = [], []
        for step in range(new_tokens):
            last = model(input_ids=ids).logits[0, -1].float()
            if step == 0:
                firsts.append(last.cpu())
            top = torch.topk(last, 2)
            margin.append(float(top.values[0] - top.values[1]))
            out.append(int(top.indices[0]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        tokens.append(out)
        margins.append(margin)
    del model
    _release(device)
    return Reference(torch.stack(firsts), tokens, margins)


def engine_outputs(
    runner: LocalModelRunner,
    info: object,
    prompts: list[list[int]],
    sampling: SamplingSpec,
    new_tokens: int,
    prefix_caching: bool,
    together: bool = True,
    passes: int = 1,
) -> tuple[list[list[list[SampledToken]]], int]:
    """Each pass's outputs (one list of tokens per prompt) from one engine, all prompts at once
    or one after another; and the prompt tokens the last pass found in the prefix cache.
    Prompt i samples with seed 1000 + i."""
    config = EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=4096, enable_prefix_caching=prefix_caching)

    async def run() -> tuple[list[list[list[SampledToken]]], int]:
        engine = LLMEngine(runner, info, config.scheduler_spec())  # type: ignore[arg-type]

        async def one(i: int) -> list[SampledToken]:
            (seq,) = engine.add(prompts[i], [(sampling, 1000 + i)], new_tokens, ignore_eos=True)
            return [t async for batch in engine.stream(seq) for t in batch]

        results, hits = [], 0
        for _ in range(passes):
            before = engine.counters().prefix_cache_hits
            if together:
                results.append(list(await asyncio.gather(*(one(i) for i in range(len(prompts))))))
            else:
                results.append([await one(i) for i in range(len(prompts))])
            hits = engine.counters().prefix_cache_hits - before
        return results, hits

    return asyncio.run(run())


def ids_of(outputs: list[list[SampledToken]]) -> list[list[int]]:
    return [[t.token_id for t in out] for out in outputs]


def margins_of(outputs: list[list[SampledToken]]) -> list[list[float]]:
    return [[t.top_logprobs[0][1] - t.top_logprobs[1][1] for t in out] for out in outputs]


def prefill_logits(runner: LocalModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    blocks = -(-max(map(len, prompts)) // BLOCK_SIZE)
    step = StepInput(
        [SequenceStep(i, p, 0, list(range(blocks * i, blocks * (i + 1))), SamplingSpec()) for i, p in enumerate(prompts)]
    )
    return runner.logits(step).float().cpu()


def check_model(name: str, device: str, scratch: Path, num_prompts: int, new_tokens: int) -> dict[str, str]:
    """One row of the correctness table; its `ok` is "yes" only if every check held."""
    path = model_dir(name, scratch)
    row: dict[str, str] = {"model": name}
    failures: list[str] = []
    fp32_reference: Reference | None = None
    for dtype in ("float32", "bfloat16"):
        runner = LocalModelRunner(ModelSpec(str(path), None, dtype, False, None, device), KV)
        try:
            info = runner.load()
            prompts = make_prompts(num_prompts, info.vocab_size)
            reference = transformers_greedy(path, dtype, device, prompts, new_tokens)
            logits = prefill_logits(runner, prompts)
            diff = float((logits - reference.logits).abs().max())
            scale = max(1.0, float(reference.logits.abs().max()))
            # Ties within twice what the check admits in fp32, or what bf16 changes in transformers'
            # own logits: never what the engine differs by, which a fault of ours would widen.
            if fp32_reference is None:
                tol = 2 * FP32_LOGITS_TOL * scale
            else:
                tol = max(2 * float((reference.logits - fp32_reference.logits).abs().max()), TIE_FLOOR)
            (cached_pass, second), hits = engine_outputs(runner, info, prompts, GREEDY, new_tokens, True, passes=2)
            greedy = agreement(ids_of(cached_pass), reference.tokens, reference.margins, tol)
            if dtype == "float32":
                fp32_reference = reference
                row["fp32 logits max diff"] = f"{diff:.1e}"
                row["fp32 greedy = transformers"] = str(greedy)
                if diff > FP32_LOGITS_TOL * scale or greedy.diverged:
                    failures.append("fp32")
                continue
            row["bf16 logits rel diff"] = f"{diff / scale:.1e}"
            row["bf16 greedy = transformers"] = str(greedy)
            assert fp32_reference is not None
            yardstick = agreement(reference.tokens, fp32_reference.tokens, fp32_reference.margins, tol)
            row["transformers bf16 = fp32"] = str(yardstick)
            if diff > BF16_LOGITS_TOL * scale or greedy.diverged:
                failures.append("bf16")
            (uncached,), _ = engine_outputs(runner, info, prompts, GREEDY, new_tokens, False)
            prefix = agreement(ids_of(second), ids_of(uncached), margins_of(uncached), tol)
            row["prefix cache on = off"] = f"{prefix}, {hits} tokens hit"
            if prefix.diverged or hits < num_prompts * SHARED_TOKENS:
                failures.append("prefix cache")
            (batched,), _ = engine_outputs(runner, info, prompts, SEEDED, new_tokens, False)
            (alone,), _ = engine_outputs(runner, info, prompts, SEEDED, new_tokens, False, together=False)
            same = sum(a == b for a, b in zip(ids_of(batched), ids_of(alone), strict=True))
            row["seeded: batch = alone"] = f"{same}/{num_prompts}"
            if same != num_prompts:
                failures.append("seeded sampling")
        finally:
            runner.shutdown()
            _release(device)
    row["ok"] = "yes" if not failures else "NO: " + ", ".join(failures)
    return row


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
