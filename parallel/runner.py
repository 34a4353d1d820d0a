"""The one interface between the serving side (deployments/) and the model side (parallel/).

The engine calls `step` once per iteration with every running sequence; it is the same call
whether the model lives in the replica process or is sharded over tp×pp rank actors. Sampling
happens on the model side (the last pipeline stage in a distributed runner), so only token ids
and log-probabilities cross the boundary, never logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch


@dataclass(frozen=True)
class ModelSpec:
    """What the model side needs to load a model (built by deployments/config.py)."""

    model: str
    revision: str | None
    dtype: str
    trust_remote_code: bool
    max_model_len: int | None
    device: str
    attention_backend: str = "auto"
    """One of parallel.model.cpu_attention.BACKENDS."""
    fused_ops: bool = True
    """A layer's element-wise steps through parallel.model.fused_layers where they apply."""


@dataclass(frozen=True)
class SamplingSpec:
    """How to pick the next token for one sequence. temperature 0 means greedy; the neutral
    values (top_p 1, top_k 0, min_p 0, repetition_penalty 1, penalties 0, no bias) change nothing."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Logits of tokens already in the prompt or the output are divided by it when positive,
    multiplied when negative (as transformers and vLLM do); greedy choices too."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of each token already in the output (OpenAI's semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of a token in the output."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before any choice."""
    logprobs: int | None = None  # number of top alternatives to return; None: no logprobs

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs the output so far (presence or frequency penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class KVCacheSpec:
    """How big the paged KV pool is: an explicit block count, an explicit memory budget, or
    else `memory_fraction` of the memory free once the weights are loaded (parallel/runners/kv_sizing.py),
    never more than `max_num_seqs` sequences of the whole context need."""

    block_size: int
    num_blocks: int | None
    memory_bytes: int | None
    memory_fraction: float
    max_num_seqs: int
    max_num_batched_tokens: int
    """Tokens of the largest step: the profiling forward on cuda runs this many."""
    host_memory_bytes: int | None = None
    """The host tier behind the pool (blocks evicted from it, kept in host memory and copied
    back on a hit): this many bytes, or else `host_memory_fraction` of the host memory free
    once the pool is allocated (0: none)."""
    host_memory_fraction: float = 0.0

    @classmethod
    def fixed(cls, block_size: int, num_blocks: int, host_blocks_bytes: int | None = None) -> KVCacheSpec:
        """A pool of exactly num_blocks blocks (tests and benchmarks that need a known size),
        and a host tier of `host_blocks_bytes` if given."""
        return cls(block_size, num_blocks, None, 0.0, 0, 0, host_blocks_bytes)


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step: the tokens to feed, where they start, where KV goes.

    A prefill (or a chunk of one) feeds prompt tokens from the first uncomputed position; a
    decode feeds the single token sampled last step. K/V of every fed token is written to the
    sequence's blocks (block_table, owned by the engine's block manager) and attention reads
    positions [0, start_pos + len(token_ids)) from them. When `sample` is set the runner samples
    the next token with a generator seeded from `sample_seed`, which the engine derives from the
    request's seed and the output position: the same seed gives the same tokens whatever the
    batch, chunking or preemption.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sampling: SamplingSpec
    sample: bool = True
    sample_seed: int = 0
    penalty_tokens: tuple[int, ...] = ()
    """The sequence's prompt and output so far, sent only when it samples with a repetition
    penalty (the runner keeps no per-sequence state between steps)."""
    output_tokens: tuple[int, ...] = ()
    """The sequence's output so far, sent only when it samples with a presence or frequency
    penalty."""
    banned_tokens: tuple[int, ...] = ()
    """Tokens this step must not sample (its stop tokens, before the request's min_tokens)."""
    allowed_tokens: torch.Tensor | None = None
    """The only tokens this step may sample, when the output is constrained (structured
    output): int32 words of 32 bits, bit j of word i standing for token 32i+j."""
    prompt_targets: tuple[int, ...] = ()
    """Prompt tokens whose log-probabilities this step reports (prompt logprobs): the tokens
    after each fed position in turn, as far as the prompt goes, predicted by its logits."""
    prompt_top_logprobs: int = 0
    """Alternatives reported with each of `prompt_targets`."""
    embed: bool = False
    """Report the final hidden state (after the last norm) at the sequence's last fed token
    instead of sampling (embeddings: the prompt's last-token pooling)."""


@dataclass(frozen=True)
class ChunkCopy:
    """Blocks of one chunk of the cluster KV tier copied between the pool and the file a store
    owns (parallel.kv_tier.chunk_files). A save writes the whole chunk from `block_ids`; a load
    copies chunk blocks [first, first + len(block_ids)) into `block_ids`."""

    path: str
    """The file, with "{rank}" standing for the rank whose shard of the chunk it holds."""
    block_ids: tuple[int, ...]
    first: int = 0
    checksums: tuple[str, ...] = ()
    """A load's: each rank's file digest as the store recorded it; a file that differs is
    not read (a recompute, never wrong K/V)."""


LoadOutcome = Literal["ok", "missing", "bad"]
"""A chunk load: copied in; its file was not there (the store evicted it, or it lives on
another node); or it was there but not what the store recorded (its digest or its shape)."""


@dataclass(frozen=True)
class ChunkWritten:
    """One rank's file of a saved chunk, as the store records it."""

    nbytes: int
    checksum: str


@dataclass(frozen=True)
class StepInput:
    seqs: list[SequenceStep]
    saves: tuple[ChunkCopy, ...] = ()
    """Chunks copied from the pool to the tier before anything of this step is computed (their
    blocks may be reused by this step's tokens)."""
    loads: tuple[ChunkCopy, ...] = ()
    """Chunks copied from the tier into the pool after the saves, before the forward. The
    sequences they are for are not in `seqs`: they continue next step from what loaded."""
    offloads: tuple[tuple[int, int], ...] = ()
    """(pool block, host slot): blocks the engine evicted from the pool, copied to the host tier
    first of all (this step may write over them)."""
    onloads: tuple[tuple[int, int], ...] = ()
    """(host slot, pool block): blocks copied back from the host tier after the offloads and
    saves, before the forward that reads them (host memory does not fail: no step's wait)."""


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None
    """Its place in the distribution (1: the most likely), where reported (prompt logprobs)."""


@dataclass(frozen=True)
class StepOutput:
    tokens: list[SampledToken]
    prompt_logprobs: list[SampledToken] = field(default_factory=list)
    """One per prompt target of the step, in input order (`token_id` is the target)."""
    embeddings: dict[int, list[float]] = field(default_factory=dict)
    """seq_id -> the hidden state of each sequence that asked to `embed`."""
    saved: tuple[tuple[ChunkWritten, ...] | None, ...] = ()
    """Per save of the input: every rank's file in rank order, or None where any rank failed."""
    loaded: tuple[LoadOutcome, ...] = ()
    """Per load of the input: "ok" if every rank copied its shard in (a sharded replica uses a
    chunk only when all of its ranks hold it), else the worst of the ranks' outcomes."""


@dataclass(frozen=True)
class ModelInfo:
    """What the serving side needs to know about a loaded model."""

    vocab_size: int
    max_model_len: int
    """The context length served: the model's window (or the configured max_model_len), or
    what the KV pool can hold for one sequence when that is less."""
    eos_token_ids: tuple[int, ...]
    num_parameters: int
    dtype: str
    num_kv_blocks: int
    block_size: int
    model_window: int
    """The model's own context window (max_position_embeddings, or the configured max_model_len)."""
    kv_cache_bytes: int
    """The whole pool's memory, every rank's share summed."""
    kv_sizing: str
    """How the pool's size was chosen, in words, for the startup log."""
    weight_bytes: int | None = None
    """Memory held by the weights in this process (None where ranks hold them)."""
    hidden_size: int = 0
    """Width of the final hidden states (an embedding's length)."""
    attention_backend: str = "gather_sdpa"
    """The paged attention the forward runs with (parallel.model.cpu_attention)."""
    fused_ops: bool = False
    """Whether the layers' element-wise steps run as parallel.model.fused_layers' kernels."""
    num_host_blocks: int = 0
    """Blocks the host tier behind the pool holds (0: none)."""


class ModelRunner(Protocol):
    """Runs the model for the engine. Implementations: LocalModelRunner (tp=pp=1).

    The runner is stateless between steps apart from the KV pool: which blocks belong to which
    sequence is decided by the engine and sent with every step.
    """

    def load(self) -> ModelInfo: ...

    def step(self, step_input: StepInput) -> StepOutput:
        """Returns one SampledToken per sequence with `sample` set, in input order."""
        ...

    def health(self) -> None:
        """Raise if the runner cannot serve (a rank died, a device is gone)."""

    def shutdown(self) -> None: ...
