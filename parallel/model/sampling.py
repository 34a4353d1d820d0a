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
    output_tokens: list[tuple[int, ...]] | None = None,
    banned_tokens: list[tuple[int, ...]] | None = None,
    allowed_tokens: list[torch.Tensor | None] | None = None,
) -> list[SampledToken]:
    """Sample one token per logits row; `penalty_tokens[i]` are the tokens row i's repetition
    penalty applies to (prompt and output), `output_tokens[i]` those its presence and frequency
    penalties count (the output), `banned_tokens[i]` those it must not pick this step,
    `allowed_tokens[i]` (a packed bitmask) the only ones it may pick.

    Greedy rows stay where the logits are (argmax and log-softmax on the device, one copy of the
    ids and their logprobs to the host); only rows drawn with a seeded generator, penalized or
    biased are copied to the host whole. Log-probabilities are the model's (before biases,
    penalties, temperature and truncation), as vLLM and OpenAI report them.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    logits = _constrain(logits, allowed_tokens)
    tokens = torch.argmax(logits, dim=-1)
    penalized = {i for i, spec in enumerate(specs) if spec.repetition_penalty != 1.0 and penalty_tokens and penalty_tokens[i]}
    counted = {i for i, spec in enumerate(specs) if spec.counts_output and output_tokens and output_tokens[i]}
    biased = {i for i, spec in enumerate(specs) if spec.logit_bias}
    banned = {i for i, ids in enumerate(banned_tokens or []) if ids}
    drawn_rows = {i for i, spec in enumerate(specs) if spec.temperature >= MIN_TEMPERATURE}
    on_host = sorted(penalized | counted | biased | banned | drawn_rows)
    if on_host:
        host_index = torch.tensor(on_host, device=logits.device)
        rows = logits[host_index].cpu()  # generators live on the CPU
        chosen = []
        for row, i in zip(rows, on_host, strict=True):
            if i in biased:
                _bias(row, specs[i].logit_bias)
            if i in penalized:
                _penalize(row, penalty_tokens[i], specs[i].repetition_penalty)  # type: ignore[index]
            if i in counted:
                _penalize_output(row, output_tokens[i], specs[i])  # type: ignore[index]
            if i in banned:
                row[torch.tensor(banned_tokens[i], dtype=torch.long)] = float("-inf")  # type: ignore[index]
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


def _constrain(logits: torch.Tensor, allowed: list[torch.Tensor | None] | None) -> torch.Tensor:
    """The logits with every token outside a row's allowed set at -inf. One masked fill over the
    batch: rows without a set get a mask of all ones, which costs less than indexing the
    constrained rows out and back."""
    if not allowed or all(mask is None for mask in allowed):
        return logits
    width = next(mask for mask in allowed if mask is not None).numel()
    everything = torch.full((width,), -1, dtype=torch.int32)  # every bit set: all tokens allowed
    words = torch.stack([everything if mask is None else mask for mask in allowed]).to(logits.device)
    bits = ((words.unsqueeze(-1) >> _BIT_SHIFTS.to(logits.device)) & 1).flatten(1)[:, : logits.shape[-1]]
    return logits.masked_fill(bits == 0, float("-inf"))


_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def _penalize(row: torch.Tensor, seen: tuple[int, ...], penalty: float) -> None:
    """transformers' and vLLM's repetition penalty, in place: a seen token's positive logit is
    divided by the penalty, a negative one multiplied (both less likely when penalty > 1)."""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long)
    values = row[ids]
    row[ids] = torch.where(values > 0, values / penalty, values * penalty)


def _bias(row: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> None:
    """OpenAI's logit_bias, in place: each listed token's logit plus its bias."""
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
    row.index_add_(0, ids, torch.tensor([b for _, b in bias], dtype=row.dtype))


def _penalize_output(row: torch.Tensor, output: tuple[int, ...], spec: SamplingSpec) -> None:
    """OpenAI's presence and frequency penalties, in place: a token seen c times in the output
    loses c * frequency_penalty + presence_penalty from its logit (as vLLM applies them)."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.numel())[: row.numel()].to(row.dtype)
    row -= counts * spec.frequency_penalty + (counts > 0).to(row.dtype) * spec.presence_penalty


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


def sample_step(logits: torch.Tensor, step_input: StepInput, pooled: torch.Tensor | None = None) -> StepOutput:
    """Sample for the sequences of a step that want a token (one logits row each, in order),
    then score the prompt targets (the rows after those, see paged_model.prepare); `pooled`
    holds the hidden states of the sequences that embed, in order."""
    wanted = [s for s in step_input.seqs if s.sample]
    embedding = [s.seq_id for s in step_input.seqs if s.embed]
    vectors = pooled.float().cpu().tolist() if pooled is not None and embedding else []
    return StepOutput(
        embeddings=dict(zip(embedding, vectors, strict=True)),
        prompt_logprobs=score_prompt(logits[len(wanted) :], step_input),
        tokens=sample_batch(
            logits[: len(wanted)],
            [s.sampling for s in wanted],
            [s.sample_seed for s in wanted],
            [s.seq_id for s in wanted],
            [s.penalty_tokens for s in wanted],
            [s.output_tokens for s in wanted],
            [s.banned_tokens for s in wanted],
            [s.allowed_tokens for s in wanted],
        )
    )


def score_prompt(logits: torch.Tensor, step_input: StepInput) -> list[SampledToken]:
    """Each prompt target's log-probability under the model (and its top alternatives): row r
    of `logits` predicts target r, sequences in input order."""
    scored = [s for s in step_input.seqs if s.prompt_targets]
    if not scored:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([t for s in scored for t in s.prompt_targets], device=logits.device)
    chosen_values = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen_values).sum(dim=-1) + 1).tolist()
    chosen = chosen_values[:, 0].tolist()
    k = min(max(s.prompt_top_logprobs for s in scored), logprobs.shape[-1])
    top_values, top_ids = (torch.topk(logprobs, k) if k else (torch.empty(len(targets), 0),) * 2)
    values, ids = top_values.tolist(), top_ids.tolist()
    out, row = [], 0
    for s in scored:
        for target in s.prompt_targets:
            n = s.prompt_top_logprobs
            top = list(zip(ids[row][:n], values[row][:n], strict=True))
            out.append(SampledToken(s.seq_id, target, chosen[row], top, rank=ranks[row]))
            row += 1
    return out
