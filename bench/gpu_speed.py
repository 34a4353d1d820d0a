"""Speed against the device's limits, memory, and host synchronisations per decode step.

Parts 2 to 4 of `python -m bench.gpu`. Llama-shaped models with random weights made on the
device in seconds (`random_llama`: the real checkpoints' config fields, no file written but
config.json), each measured in one process:

- decode tokens/s at each batch, shardserve's engine (scheduler, block manager, paged forward,
  sampling) against transformers' `generate` (greedy, its default dynamic cache and SDPA
  attention; static cache and torch.compile would cost minutes of compile the run does not have),
  both as a share of the roofline: a step reads every weight once and each sequence's K/V, and
  does 2 flops per weight per row, at the bandwidth and matrix throughput measured in the run;
- one prefill of a long prompt, against the same forward in transformers, and the roofline;
- the KV pool as the runner sized it (from the memory a profiling forward leaves), peak memory;
- the host's synchronisations with the device, copies and kernel launches per decode step,
  counted by the torch profiler around runner steps on the model thread.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from bench.ceiling import engine_decode_tokens_per_s
from deployments.config import ShardserveArgs
from parallel.runner import ModelInfo, SamplingSpec, SequenceStep, StepInput
from parallel.runners.local_runner import LocalModelRunner

GIB = 2**30
_LLAMA3 = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
           "bos_token_id": 128000, "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False}  # fmt: skip


@dataclass(frozen=True)
class LlamaSize:
    name: str
    config: dict[str, Any]
    """config.json fields (model_type included)."""


# meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B as their config.json has them.
LLAMA_1B = LlamaSize(
    "Llama-3.2-1B shape",
    {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
     "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "eos_token_id": 128001,
     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
)  # fmt: skip
LLAMA_8B = LlamaSize(
    "Llama-3.1-8B shape",
    {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
     "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False, "eos_token_id": 128001,
     "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
)  # fmt: skip
# The same two on a CPU, shrunk so that the bench's test runs them in seconds.
SMALL_A = LlamaSize("small Llama A", {**LLAMA_1B.config, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024,
                                      "bos_token_id": 1, "eos_token_id": 2})  # fmt: skip
SMALL_B = LlamaSize("small Llama B", {**LLAMA_8B.config, "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4,
                                      "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048,
                                      "bos_token_id": 1, "eos_token_id": 2})  # fmt: skip


@dataclass(frozen=True)
class SpeedPlan:
    batches: tuple[int, ...]
    prompt_len: int
    decode_steps: int
    prefill_tokens: int
    sync_batches: tuple[int, ...]
    sync_steps: int = 8
    max_model_len: int = 4096


@dataclass(frozen=True)
class Roofs:
    bandwidth: float
    """Bytes per second a device-to-device copy moves (read plus written)."""
    matmul: float
    """Flop/s of a large square matrix product in the bench's dtype."""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    fn()  # warm: kernels chosen, caches filled
    return statistics.median(timed(fn, device) for _ in range(repeats))


@torch.inference_mode()
def measure_roofs(device: str, dtype: torch.dtype, copy_bytes: int, matmul_n: int) -> Roofs:
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = min(timed(lambda: dst.copy_(src), device) for _ in range(10))
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    a @ b
    matmul_s = min(timed(lambda: a @ b, device) for _ in range(10))
    return Roofs(bandwidth=2 * copy_bytes / copy_s, matmul=2 * matmul_n**3 / matmul_s)


def random_llama(size: LlamaSize, device: str, dtype: str, scratch: Path) -> tuple[torch.nn.Module, PretrainedConfig, Path]:
    """The model made on the device with transformers' own random init; its directory holds
    config.json alone (what the runner reads besides the weights)."""
    fields = {k: v for k, v in size.config.items() if k != "model_type"}
    config = AutoConfig.for_model(size.config["model_type"], **fields)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    path = scratch / size.name.replace(" ", "-")
    config.save_pretrained(path)
    return model.eval(), config, path


@dataclass(frozen=True)
class ModelCost:
    """What one forward moves and computes, from the modules themselves."""

    weight_bytes: int
    """Read by every step: the layers, the final norm and the LM head (the embedding only when tied)."""
    layer_params: int
    head_params: int
    kv_bytes_per_token: int
    attention_flops_per_key: int
    """Per query token and context position: q·k and p·v over every head."""


def model_cost(model: torch.nn.Module) -> ModelCost:
    config = model.config
    weight = model.lm_head.weight
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    read = layer_params + model.model.norm.weight.numel() + weight.numel()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelCost(
        weight_bytes=read * weight.element_size(),
        layer_params=layer_params,
        head_params=weight.numel(),
        kv_bytes_per_token=2 * layers * config.num_key_value_heads * head_dim * weight.element_size(),
        attention_flops_per_key=4 * layers * heads * head_dim,
    )


def decode_roof_tokens_per_s(cost: ModelCost, roofs: Roofs, batch: int, context: int) -> float:
    moved = cost.weight_bytes + batch * context * cost.kv_bytes_per_token
    flops = batch * (2 * (cost.layer_params + cost.head_params) + context * cost.attention_flops_per_key)
    return batch / max(moved / roofs.bandwidth, flops / roofs.matmul)


def prefill_roof_s(cost: ModelCost, roofs: Roofs, tokens: int) -> float:
    """Causal: each token attends to half the prompt on average; logits for the last token only."""
    flops = 2 * cost.layer_params * tokens + 2 * cost.head_params + cost.attention_flops_per_key * tokens * tokens // 2
    return max(flops / roofs.matmul, cost.weight_bytes / roofs.bandwidth)


def random_ids(batch: int, length: int, vocab_size: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab_size - 1, (batch, length), generator=generator).to(device)


@torch.inference_mode()
def transformers_decode_tokens_per_s(model: torch.nn.Module, batch: int, prompt_len: int, steps: int, device: str) -> float:
    """Decode rate of `generate`: the time of steps + 1 new tokens less that of 1 (the prefill)."""
    ids = random_ids(batch, prompt_len, model.config.vocab_size, device)
    mask = torch.ones_like(ids)

    def generate(new: int) -> Callable[[], object]:
        return lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )

    generate(2)()
    first, whole = median_time(generate(1), device, 1), median_time(generate(steps + 1), device, 1)
    return batch * steps / max(whole - first, 1e-9)


@torch.inference_mode()
def transformers_prefill_s(model: torch.nn.Module, tokens: int, device: str) -> float:
    ids = random_ids(1, tokens, model.config.vocab_size, device)
    return median_time(lambda: model(input_ids=ids, logits_to_keep=1), device)


def engine_prefill_s(runner: LocalModelRunner, info: ModelInfo, tokens: int, device: str) -> float:
    """One runner step over a fresh prompt: the forward, the K/V written, the first token sampled."""
    ids = random_ids(1, tokens, info.vocab_size, "cpu")[0].tolist()
    step = StepInput([SequenceStep(0, ids, 0, list(range(-(-tokens // info.block_size))), SamplingSpec())])
    return median_time(lambda: runner.step(step), device)


@dataclass(frozen=True)
class CallCounts:
    """Per decode step, from the profiler's CUDA runtime and device events."""

    syncs: float
    """Host waits on the device (stream, device or event synchronize): each stalls the next launch."""
    to_device: float
    to_host: float
    launches: float


LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"})


def call_counts(counts: Mapping[str, int], steps: int) -> CallCounts:
    """`counts`: how often each profiler event name occurred over `steps` steps."""

    def total(match: Callable[[str], bool]) -> float:
        return sum(n for name, n in counts.items() if match(name)) / steps

    return CallCounts(
        syncs=total(lambda name: name.startswith(("cuda", "cu")) and name.endswith("Synchronize")),
        to_device=total(lambda name: name.startswith("Memcpy HtoD")),
        to_host=total(lambda name: name.startswith("Memcpy DtoH")),
        launches=total(lambda name: name in LAUNCHES),
    )


def decode_calls(runner: LocalModelRunner, info: ModelInfo, batch: int, context: int, steps: int, device: str) -> CallCounts:
    """The profiler opened on the model thread around `steps` greedy decode steps of `batch`
    sequences at `context` tokens (the step the engine sends then; the engine itself touches
    no tensor)."""
    per_seq = -(-context // info.block_size)
    step = StepInput(
        [SequenceStep(i, [7], context - 1, list(range(i * per_seq, (i + 1) * per_seq)), SamplingSpec()) for i in range(batch)]
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def profiled() -> dict[str, int]:
        runner.step(step)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                runner.step(step)
        return {event.key: event.count for event in prof.key_averages()}

    counts = call_counts(runner.on_model_thread(profiled), steps)
    if device == "cuda" and not counts.launches:  # names the profiler no longer uses: say so, never a silent 0
        raise RuntimeError(f"the profiler recorded no kernel launch under the names {sorted(LAUNCHES)}")
    return counts


@dataclass
class SizeResult:
    decode: list[dict[str, str]]
    prefill: dict[str, str]
    memory: dict[str, str]
    calls: list[dict[str, str]]


def measure_size(size: LlamaSize, device: str, dtype: str, roofs: Roofs, plan: SpeedPlan, scratch: Path) -> SizeResult:
    """transformers first, on the untouched model; then shardserve's runner over the same
    weights (on CPU it packs and fuses layers in place, after which transformers' forward
    would compute something else)."""
    model, config, path = random_llama(size, device, dtype, scratch)
    cost = model_cost(model)
    theirs = {b: transformers_decode_tokens_per_s(model, b, plan.prompt_len, plan.decode_steps, device) for b in plan.batches}
    their_prefill = transformers_prefill_s(model, plan.prefill_tokens, device)
    release(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    args = ShardserveArgs(
        model=str(path),
        dtype=dtype,
        device=device,
        max_model_len=plan.max_model_len,
        engine={"max_num_seqs": max(plan.batches), "max_num_batched_tokens": plan.prefill_tokens},
    )
    handed = [(model, config, path)]  # popped by the load: afterwards the runner alone holds the weights
    del model
    runner = LocalModelRunner(args.model_spec(), args.kv_cache_spec(), load_model=lambda _spec: handed.pop())
    try:
        info = runner.load()
        ours = {
            b: engine_decode_tokens_per_s(runner, info, b, plan.prompt_len, plan.decode_steps, plan.prefill_tokens)
            for b in plan.batches
        }
        our_prefill = engine_prefill_s(runner, info, plan.prefill_tokens, device)
        calls = {b: decode_calls(runner, info, b, plan.prompt_len, plan.sync_steps, device) for b in plan.sync_batches}
        memory = memory_row(size.name, info, device)
    finally:
        runner.shutdown()
        release(device)
    context = plan.prompt_len + plan.decode_steps // 2
    decode = []
    for b in plan.batches:
        roof = decode_roof_tokens_per_s(cost, roofs, b, context)
        decode.append({
            "model": size.name, "batch": str(b), "shardserve tok/s": f"{ours[b]:.0f}",
            "transformers tok/s": f"{theirs[b]:.0f}", "shardserve / transformers": f"{ours[b] / theirs[b]:.2f}x",
            "roofline tok/s": f"{roof:.0f}", "shardserve of roofline": f"{ours[b] / roof:.1%}",
            "transformers of roofline": f"{theirs[b] / roof:.1%}",
        })  # fmt: skip
    roof_s = prefill_roof_s(cost, roofs, plan.prefill_tokens)
    prefill = {
        "model": size.name, "tokens": str(plan.prefill_tokens), "shardserve ms": f"{our_prefill * 1e3:.1f}",
        "transformers ms": f"{their_prefill * 1e3:.1f}", "roofline ms": f"{roof_s * 1e3:.1f}",
        "shardserve of roofline": f"{roof_s / our_prefill:.1%}", "transformers of roofline": f"{roof_s / their_prefill:.1%}",
    }  # fmt: skip
    call_rows = [
        {"model": size.name, "batch": str(b), "syncs": f"{c.syncs:g}", "copies to device": f"{c.to_device:g}",
         "copies to host": f"{c.to_host:g}", "kernel launches": f"{c.launches:g}"}
        for b, c in calls.items()
    ]  # fmt: skip
    return SizeResult(decode, prefill, memory, call_rows)


def memory_row(name: str, info: ModelInfo, device: str) -> dict[str, str]:
    row = {
        "model": name,
        "weights GiB": f"{(info.weight_bytes or 0) / GIB:.3g}",
        "KV pool": f"{info.num_kv_blocks} blocks of {info.block_size}, {info.kv_cache_bytes / GIB:.2f} GiB",
        "sized by": info.kv_sizing,
        "context served": str(info.max_model_len),
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        row["peak allocated GiB"] = f"{torch.cuda.max_memory_allocated() / GIB:.2f} of {total / GIB:.1f}"
        row["free after GiB"] = f"{free / GIB:.2f}"
    else:
        row["peak allocated GiB"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} (process RSS)"
        row["free after GiB"] = "-"
    return row


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
