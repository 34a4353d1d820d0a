"""The one interface between the serving side (deployments/) and the model side (parallel/).

The engine calls `step` once per iteration with every running sequence; it is the same call
whether the model lives in the replica process or is sharded over tp×pp rank actors. Sampling
happens on the model side (the last pipeline stage in a distributed runner), so only token ids
and log-probabilities cross the boundary, never logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingSpec:
    """How to pick the next token for one sequence. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int | None = None  # number of top alternatives to return; None: no logprobs


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step: the tokens to feed and where they start.

    A prefill feeds the whole prompt (start_pos 0, or the first uncached position); a decode
    feeds the single token sampled last step. The runner keeps the sequence's KV cache between
    steps, keyed by seq_id, until `free` is called.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    sampling: SamplingSpec


@dataclass(frozen=True)
class StepInput:
    seqs: list[SequenceStep]


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    tokens: list[SampledToken]


@dataclass(frozen=True)
class ModelInfo:
    """What the serving side needs to know about a loaded model."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_parameters: int
    dtype: str


class ModelRunner(Protocol):
    """Runs the model for the engine. Implementations: LocalModelRunner (tp=pp=1)."""

    def load(self) -> ModelInfo: ...

    def step(self, step_input: StepInput) -> StepOutput: ...

    def free(self, seq_ids: list[int]) -> None: ...

    def health(self) -> None:
        """Raise if the runner cannot serve (a rank died, a device is gone)."""

    def shutdown(self) -> None: ...
