"""Which sequences run in the next step, and how many of their tokens (iteration-level).

Each step has a token budget. Running sequences go first, in arrival order: a decode takes one
token, an unfinished prefill takes the next chunk. Waiting sequences are then admitted while
there is budget, a batch slot and KV blocks for their whole prompt. When a running sequence needs
a new block and the pool is empty, the most recently arrived running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later (its prompt
blocks usually come back from the prefix cache). Pure logic over the block manager; no tensors.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from deployments.engine.block_manager import BlockManager, BlockTable, NoFreeBlocks
from deployments.engine.kv_tier import TierHint, TierLoad, plan_load
from deployments.errors import InvalidRequest, Overloaded
from parallel.runner import SampledToken, SamplingSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SchedulerSpec:
    """What the engine reads of the `engine:` section (deployments.config.EngineConfig declares,
    bounds and documents each field; `EngineConfig.scheduler_spec()` makes this). The rest of
    the section is read by others: the pool's size by the runner (KVCacheSpec), the stream's
    pacing, the timeout and the model process by the replica."""

    max_num_seqs: int
    max_waiting_requests: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool


class ConstraintState(Protocol):
    """Where one output is in its constraint (structured output: the replica compiles grammars
    and starts one state per output). The engine asks which tokens may come next and says which
    one came; it knows nothing of grammars (nor imports xgrammar)."""

    def allowed_tokens(self) -> torch.Tensor:
        """Packed 32 to an int32 (bit j of word i: token 32i+j)."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the constraint does not allow it."""
        ...

    @property
    def finished(self) -> bool:
        """Complete: nothing more may follow."""
        ...


class Constraint(Protocol):
    def start(self) -> ConstraintState:
        """The state of one new output that follows the constraint."""
        ...


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated output: tokens so far, KV blocks, and the queue its consumer reads."""

    prompt_ids: list[int]
    sampling: SamplingSpec
    seed: int
    max_tokens: int
    stop_token_ids: frozenset[int]
    min_tokens: int = 0  # the stop tokens cannot be sampled before this many outputs
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    table: BlockTable | None = None
    queue: asyncio.Queue[SampledToken | BaseException | None] = field(default_factory=asyncio.Queue)
    finish_reason: str | None = None
    aborted: bool = False
    cache_salt: str | None = None  # the tenant: its prefix-cache blocks are its own
    constraint: ConstraintState | None = None  # structured output: the grammar it follows
    prompt_top_logprobs: int | None = None  # prompt logprobs wanted, with this many alternatives
    prompt_scores: list[SampledToken] = field(default_factory=list)  # prompt tokens 1.. scored so far
    prompt_read: asyncio.Event = field(default_factory=asyncio.Event)  # set once the prompt is computed (or it ended)
    embed: bool = False  # an embedding: the prompt's pooled hidden state, no tokens
    embedding: list[float] | None = None
    scheduled_at: float | None = None  # first admitted to the running batch (queue time ends)
    first_token_at: float | None = None
    num_preemptions: int = 0
    tier: TierHint | None = None  # what the cluster KV tier holds of its prompt, and wants of it
    loading: TierLoad | None = None  # chunks being copied in from the tier (it waits a step)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def scores_prompt(self) -> bool:
        """Its prompt logprobs are still to compute: its prompt may not come from the prefix
        cache (cached positions have no logits)."""
        return self.prompt_top_logprobs is not None and len(self.prompt_scores) < len(self.prompt_ids) - 1

    def step_seed(self) -> int:
        """Seed of the next sampled position: depends on the request seed and position only."""
        return (self.seed * 1_000_003 + len(self.output_ids)) % (2**63)


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerSpec, blocks: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._loading: list[Sequence] = []

    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences, or refuse all of them at once."""
        needed = self.blocks.blocks_needed(max(len(s.prompt_ids) + s.max_tokens for s in seqs))
        if needed > self.blocks.num_blocks:
            raise InvalidRequest(
                f"prompt plus max_tokens needs {needed} KV-cache blocks; this server has {self.blocks.num_blocks}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        free_slots = max(0, self.config.max_num_seqs - len(self.running))
        if len(self.waiting) + len(seqs) > self.config.max_waiting_requests + free_slots:
            raise Overloaded("server is overloaded: too many requests waiting", code="queue_full", retry_after_s=1.0)
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def drop_aborted(self) -> list[Sequence]:
        dropped = [s for s in self.running if s.aborted]
        for seq in dropped:
            self.finish(seq)
        waiting_dropped = [s for s in self.waiting if s.aborted]
        if waiting_dropped:
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        return dropped + waiting_dropped

    def finish(self, seq: Sequence) -> None:
        if seq.table is not None:
            self.blocks.free(seq.table)
            seq.table = None
        if seq in self.running:
            self.running.remove(seq)

    def schedule(self) -> list[Scheduled]:
        budget = self.config.max_num_batched_tokens
        out: list[Scheduled] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running or seq.loading is not None:  # preempted; or its KV is on its way
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)  # a decode: 1; a prefill: next chunk
            if not self._grow(seq, seq.num_computed + n, out):
                continue
            out.append(Scheduled(seq, seq.num_computed, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                seq.table = self.blocks.allocate_prompt(
                    seq.tokens(0, seq.num_tokens), reserve=1, salt=seq.cache_salt, reuse=not seq.scores_prompt
                )
            except NoFreeBlocks:
                break
            self.waiting.popleft()
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            seq.num_computed = seq.table.cached_tokens
            self.running.append(seq)
            if self._load_from_tier(seq):
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append(Scheduled(seq, seq.num_computed, n))
            budget -= n
        return out

    def take_loads(self) -> list[tuple[Sequence, TierLoad]]:
        """The tier loads the last `schedule` planned, for the step it scheduled."""
        loading, self._loading = self._loading, []
        return [(seq, seq.loading) for seq in loading if seq.loading is not None]

    def _load_from_tier(self, seq: Sequence) -> bool:
        """Plan copying the tier's chunks of seq's prompt past the pool's own hit; True if any."""
        if seq.tier is None or seq.table is None or seq.scores_prompt:
            return False
        bs = self.blocks.block_size
        usable = (len(seq.prompt_ids) - 1) // bs
        seq.loading = plan_load(seq.tier, seq.table.blocks, seq.num_computed // bs, usable, time.monotonic())
        if seq.loading is None:
            return False
        self._loading.append(seq)
        return True

    def _grow(self, seq: Sequence, num_slots: int, scheduled: list[Scheduled]) -> bool:
        """Make seq's table hold num_slots tokens, preempting later arrivals if needed."""
        needed = min(num_slots, self.max_model_len)
        while True:
            try:
                self.blocks.ensure_capacity(seq.table, needed)  # type: ignore[arg-type]
                return True
            except NoFreeBlocks:
                victim = self.running[-1]
                self._preempt(victim, scheduled)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence, scheduled: list[Scheduled]) -> None:
        seq.loading = None  # (loads land within the step that planned them: none is in flight here)
        self.finish(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        scheduled[:] = [s for s in scheduled if s.seq is not seq]
        self.waiting.appendleft(seq)
