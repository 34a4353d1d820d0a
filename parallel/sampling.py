"""Token sampling, one sequence at a time, reproducible from the sequence's own seed.

Each sequence owns a torch.Generator seeded from its request, so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from parallel.runner import SampledToken, SamplingSpec


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def sample_token(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator, seq_id: int) -> SampledToken:
    """Pick one token from a 1-D logits row.

    Log-probabilities are those of the model (before temperature and truncation), as vLLM and
    OpenAI report them.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if spec.temperature <= 0.0:
        token = int(torch.argmax(logits))
    else:
        scaled = logits / spec.temperature
        if spec.top_k > 0 and spec.top_k < scaled.numel():
            kth = torch.topk(scaled, spec.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if spec.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = (cumulative - sorted_probs) >= spec.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if spec.logprobs:
        values, indices = torch.topk(logprobs, min(spec.logprobs, logprobs.numel()))
        top = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
    return SampledToken(seq_id=seq_id, token_id=token, logprob=float(logprobs[token]), top_logprobs=top)
