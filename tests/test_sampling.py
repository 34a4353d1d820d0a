"""Sampling on one logits row (no Ray)."""

from __future__ import annotations

import torch

from parallel.runner import SamplingSpec
from parallel.sampling import make_generator, sample_token


def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(100) * 3


def draw(spec: SamplingSpec, count: int = 20) -> list[int]:
    gen = make_generator(spec.seed)
    return [sample_token(logits(), spec, gen, 0).token_id for _ in range(count)]


def test_greedy_is_argmax() -> None:
    row = logits()
    assert sample_token(row, SamplingSpec(), make_generator(0), 0).token_id == int(row.argmax())


def test_same_seed_same_tokens_other_seed_differs() -> None:
    spec = SamplingSpec(temperature=1.0, seed=5)
    assert draw(spec) == draw(spec)
    assert draw(spec) != draw(SamplingSpec(temperature=1.0, seed=6))


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    argmax = int(logits().argmax())
    assert set(draw(SamplingSpec(temperature=1.5, top_k=1, seed=3))) == {argmax}
    assert set(draw(SamplingSpec(temperature=1.5, top_p=1e-6, seed=3))) == {argmax}


def test_top_k_limits_choices() -> None:
    allowed = set(torch.topk(logits(), 3).indices.tolist())
    assert set(draw(SamplingSpec(temperature=2.0, top_k=3, seed=1), count=200)) <= allowed


def test_logprobs_are_model_logprobs() -> None:
    row = logits()
    tok = sample_token(row, SamplingSpec(temperature=0.5, seed=2, logprobs=4), make_generator(2), 0)
    expected = torch.log_softmax(row, -1)
    assert abs(tok.logprob - float(expected[tok.token_id])) < 1e-6
    assert [i for i, _ in tok.top_logprobs] == torch.topk(expected, 4).indices.tolist()
