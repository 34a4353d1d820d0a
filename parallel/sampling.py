"""Token sampling for a step's batch, reproducible per sequence.

Every sampled position gets its own generator, seeded by the engine from the request's seed and
the output position, so a seeded request gives the same tokens whatever else shares its batch,
and even after it was preempted and recomputed. Greedy rows (the common case) are one argmax.
"""

from __future__ import annotations

import torch

from parallel.runner import SampledToken, SamplingSpec, StepInput, StepOutput

# Below this a temperature is greedy (as in vLLM): dividing logits by 1e-117 gives infinities,
# and softmax of infinities is NaN, which multinomial refuses, failing the whole step.
MIN_TEMPERATURE = 1e-5


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def sample_batch(
    logits: torch.Tensor,
    specs: list[SamplingSpec],
    seeds: list[int],
    seq_ids: list[int],
    penalty_tokens: list[tuple[int, ...]] | None = None,
) -> list[SampledToken]:
    """Sample one token per logits row; `penalty_tokens[i]` are the tokens row i's repetition
    penalty applies to.

    Greedy rows stay where the logits are (argmax and log-softmax on the device, one copy of the
    ids and their logprobs to the host); only rows drawn with a seeded generator or penalized
    are copied to the host whole. Log-probabilities are the model's (before penalties,
    temperature and truncation), as vLLM and OpenAI report them.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    penalized = {i for i, spec in enumerate(specs) if spec.repetition_penalty != 1.0 and penalty_tokens and penalty_tokens[i]}
    on_host = sorted(penalized | {i for i, spec in enumerate(specs) if spec.temperature >= MIN_TEMPERATURE})
    if on_host:
        host_index = torch.tensor(on_host, device=logits.device)
        rows = logits[host_index].cpu()  # generators live on the CPU
        chosen = []
        for row, i in zip(rows, on_host, strict=True):
            if i in penalized:
                _penalize(row, penalty_tokens[i], specs[i].repetition_penalty)  # type: ignore[index]
            drawn = specs[i].temperature >= MIN_TEMPERATURE
            chosen.append(_draw(row, specs[i], make_generator(seeds[i])) if drawn else int(row.argmax()))
        tokens = tokens.clone()
        tokens[host_index] = torch.tensor(chosen, device=logits.device)
    token_logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
    wanted = [i for i, spec in enumerate(specs) if spec.logprobs]
    top: dict[int, list[tuple[int, float]]] = {}
    if wanted:
        k = min(max(specs[i].logprobs for i in wanted), logprobs.shape[-1])
        values, indices = torch.topk(logprobs[torch.tensor(wanted, device=logits.device)], k)
        for i, vals, ids in zip(wanted, values.tolist(), indices.tolist(), strict=True):
            n = min(specs[i].logprobs, k)
            top[i] = list(zip(ids[:n], vals[:n], strict=True))
    ids, lps = tokens.tolist(), token_logprobs.tolist()
    return [
        SampledToken(seq_id=seq_ids[i], token_id=ids[i], logprob=lps[i], top_logprobs=top.get(i, []))
        for i in range(len(specs))
    ]


def _penalize(row: torch.Tensor, seen: tuple[int, ...], penalty: float) -> None:
    """transformers' and vLLM's repetition penalty, in place: a seen token's positive logit is
    divided by the penalty, a negative one multiplied (both less likely when penalty > 1)."""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long)
    values = row[ids]
    row[ids] = torch.where(values > 0, values / penalty, values * penalty)


def _draw(row: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> int:
    scaled = row / spec.temperature
    if 0 < spec.top_k < scaled.numel():
        kth = torch.topk(scaled, spec.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if spec.min_p > 0.0:
        probs = probs.masked_fill(probs < spec.min_p * probs.max(), 0.0)
    if spec.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (cumulative - sorted_probs) >= spec.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(torch.argmax(row))  # no distribution to draw from (non-finite logits): never fail the batch
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_step(logits: torch.Tensor, step_input: StepInput) -> StepOutput:
    """Sample for the sequences of a step that want a token (one logits row each, in order)."""
    wanted = [s for s in step_input.seqs if s.sample]
    return StepOutput(
        tokens=sample_batch(
            logits,
            [s.sampling for s in wanted],
            [s.sample_seed for s in wanted],
            [s.seq_id for s in wanted],
            [s.penalty_tokens for s in wanted],
        )
    )
