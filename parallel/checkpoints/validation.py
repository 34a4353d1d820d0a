"""Validating a compressed model against its original on a prompt set.

Measures what a user needs to decide whether to publish: top-1 next-token agreement with the
original at every position of every prompt, mean log-likelihood of the prompts (and its
perplexity), size on disk, weight memory once loaded, and greedy decode tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics state that",
    "To make a cup of tea, first boil the water, then",
    "Ray Serve scales model replicas by watching",
    "In 1969, the first humans to walk on the Moon were",
    "A transformer layer consists of self-attention followed by",
]


@dataclass
class ModelMeasures:
    disk_bytes: int
    weight_bytes: int
    mean_log_likelihood: float
    perplexity: float
    decode_tokens_per_s: float


def disk_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (int8 weights count one byte each)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def next_token_logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token at every position of one prompt, float32."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def compare(original: nn.Module, candidate: nn.Module, prompts: list[list[int]]) -> tuple[float, float, float]:
    """(top-1 agreement, original mean log-likelihood, candidate mean log-likelihood)."""
    agree = total = 0
    ll_orig = ll_cand = 0.0
    for ids in prompts:
        a, b = next_token_logprobs(original, ids), next_token_logprobs(candidate, ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        targets = torch.tensor(ids[1:])
        ll_orig += float(a[:-1].gather(1, targets[:, None]).sum())
        ll_cand += float(b[:-1].gather(1, targets[:, None]).sum())
    scored = sum(len(ids) - 1 for ids in prompts)
    return agree / total, ll_orig / scored, ll_cand / scored


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: list[int], tokens: int = 32) -> float:
    """Greedy decode with the model's own KV cache, batch 1 (best of two runs)."""
    best = 0.0
    for _ in range(2):
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def measure(model: nn.Module, model_dir: Path, prompts: list[list[int]], mean_ll: float) -> ModelMeasures:
    return ModelMeasures(
        disk_bytes=disk_bytes(model_dir),
        weight_bytes=weight_bytes(model),
        mean_log_likelihood=mean_ll,
        perplexity=math.exp(-mean_ll),
        decode_tokens_per_s=decode_tokens_per_s(model, prompts[0]),
    )
