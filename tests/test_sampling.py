"""Sampling on logits rows (no Ray)."""

from __future__ import annotations

import math

import torch

from parallel.model.sampling import sample_batch
from parallel.runner import SamplingSpec


def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(100) * 3


def draw(spec: SamplingSpec, seed: int, count: int = 20) -> list[int]:
    row = logits()
    return [sample_batch(row[None], [spec], [seed * 1000 + i], [0])[0].token_id for i in range(count)]


def test_greedy_is_argmax_for_every_row() -> None:
    rows = torch.randn(5, 50)
    tokens = sample_batch(rows, [SamplingSpec()] * 5, [0] * 5, list(range(5)))
    assert [t.token_id for t in tokens] == rows.argmax(-1).tolist()
    assert [t.seq_id for t in tokens] == list(range(5))


def test_same_seed_same_tokens_other_seed_differs() -> None:
    spec = SamplingSpec(temperature=1.0)
    assert draw(spec, 5) == draw(spec, 5)
    assert draw(spec, 5) != draw(spec, 6)


def test_row_result_does_not_depend_on_batch_neighbours() -> None:
    spec = SamplingSpec(temperature=1.0, top_p=0.9)
    row = logits()
    alone = sample_batch(row[None], [spec], [42], [0])[0].token_id
    batch = torch.stack([torch.randn(100), row, torch.randn(100)])
    together = sample_batch(batch, [SamplingSpec(temperature=0.7)] + [spec] * 2, [1, 42, 3], [0, 1, 2])
    assert together[1].token_id == alone


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    argmax = int(logits().argmax())
    assert set(draw(SamplingSpec(temperature=1.5, top_k=1), 3)) == {argmax}
    assert set(draw(SamplingSpec(temperature=1.5, top_p=1e-6), 3)) == {argmax}


def test_top_k_limits_choices() -> None:
    allowed = set(torch.topk(logits(), 3).indices.tolist())
    assert set(draw(SamplingSpec(temperature=2.0, top_k=3), 1, count=200)) <= allowed


def test_logprobs_are_model_logprobs() -> None:
    row = logits()
    (tok,) = sample_batch(row[None], [SamplingSpec(temperature=0.5, logprobs=4)], [2], [0])
    expected = torch.log_softmax(row, -1)
    assert abs(tok.logprob - float(expected[tok.token_id])) < 1e-6
    assert [i for i, _ in tok.top_logprobs] == torch.topk(expected, 4).indices.tolist()


def test_degenerate_temperatures_and_logits_never_fail_a_batch() -> None:
    """Found by fuzzing: temperature 1e-117 made every logit infinite, softmax NaN and the whole
    step (every request in the batch) fail."""
    argmax = int(logits().argmax())
    assert set(draw(SamplingSpec(temperature=1.1e-117), 1)) == {argmax}
    assert set(draw(SamplingSpec(temperature=1e-6, top_k=3, top_p=0.5), 1)) == {argmax}
    row = logits()
    row[7] = float("inf")
    assert sample_batch(row[None], [SamplingSpec(temperature=1.0)], [0], [0])[0].token_id == 7
    nan_row = torch.full((100,), float("nan"))
    assert 0 <= sample_batch(nan_row[None], [SamplingSpec(temperature=1.0)], [0], [0])[0].token_id < 100


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    """A seen token loses count * frequency_penalty + presence_penalty: token 3 leads token 5 by
    1.0 and was sampled twice, so the lead survives exactly while the penalty is below 1.0."""
    row = torch.zeros(10)
    row[3], row[5] = 2.0, 1.0
    output = (3, 3, 8)

    def pick(**penalties: float) -> int:
        spec = SamplingSpec(**penalties)
        return sample_batch(row[None], [spec], [0], [0], [()], [output])[0].token_id

    assert pick() == 3
    assert pick(frequency_penalty=0.45) == 3 and pick(frequency_penalty=0.55) == 5  # 2 x 0.45 < 1 < 2 x 0.55
    assert pick(presence_penalty=0.9) == 3 and pick(presence_penalty=1.1) == 5  # counted once, however often
    assert pick(frequency_penalty=-1.0) == 3  # negative penalties encourage repeats
    # Without the output (the first token) nothing is penalized; logprobs stay the model's.
    (tok,) = sample_batch(row[None], [SamplingSpec(presence_penalty=2.0, logprobs=1)], [0], [0], [()], [()])
    assert tok.token_id == 3 and abs(tok.logprob - float(torch.log_softmax(row, -1)[3])) < 1e-6


def test_logit_bias_shifts_the_sampled_distribution() -> None:
    """Sampled at temperature 1 over two equal tokens, a bias of ln(3) on one makes it 3:1."""
    row = torch.full((6,), -50.0)
    row[1] = row[2] = 0.0
    spec = SamplingSpec(temperature=1.0, logit_bias=((2, math.log(3.0)),))
    drawn = [sample_batch(row[None], [spec], [seed], [0])[0].token_id for seed in range(2000)]
    assert set(drawn) == {1, 2}
    assert 0.70 < drawn.count(2) / len(drawn) < 0.80
    greedy = sample_batch(row[None], [SamplingSpec(logit_bias=((4, 100.0),))], [0], [0])[0]
    assert greedy.token_id == 4
