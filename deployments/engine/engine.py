"""Continuous-batching generation engine over a ModelRunner.

One asyncio task runs steps back to back while there is work. Each step is one runner call over
everything the scheduler picked: decodes of running sequences and (chunks of) prefills of new
ones, so a new request joins at the next step and a finished or aborted one leaves at once and
frees its KV blocks. The runner's step runs in a worker thread so that the replica's event loop
keeps serving health checks and streams while the model computes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection

from deployments.engine.block_manager import BlockManager
from deployments.engine.kv_keys import BlockKey, KVNamespace, block_keys, chunk_key
from deployments.engine.kv_tier import TierHint, TierLoad, TierSink, due_saves, loaded_blocks
from deployments.engine.scheduler import Constraint, Scheduled, Scheduler, SchedulerSpec, Sequence
from deployments.errors import EngineFault, Overloaded
from deployments.types import EngineStats
from parallel.runner import (
    ChunkCopy,
    ChunkWritten,
    LoadOutcome,
    ModelInfo,
    ModelRunner,
    SampledToken,
    SamplingSpec,
    SequenceStep,
    StepInput,
    StepOutput,
)

logger = logging.getLogger(__name__)


def chunks_of(keys: list[BlockKey], chunk_blocks: int) -> list[BlockKey]:
    """Keys of the whole chunks of `chunk_blocks` blocks among a prompt's block `keys` (each
    from the key of its last block)."""
    return [chunk_key(k, chunk_blocks) for k in keys[chunk_blocks - 1 :: chunk_blocks]]


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        info: ModelInfo,
        config: SchedulerSpec,
        on_fault: Callable[[BaseException], None] | None = None,
        namespace: KVNamespace | None = None,
        tier: TierSink | None = None,
    ) -> None:
        """`on_fault` is told once when the runner fails: the engine is done for good then.
        `namespace`: what the pool's block keys are under (the model's fingerprint and layout);
        `tier`: where saved chunks of the cluster KV tier are written and committed."""
        self._runner = runner
        self._on_fault = on_fault
        self._info = info
        self._blocks = BlockManager(
            info.num_kv_blocks, info.block_size, config.enable_prefix_caching, namespace, info.num_host_blocks
        )
        self._tier = tier
        self._saves: list[tuple[BlockKey, ChunkCopy]] = []
        self._tier_counts = dict.fromkeys(
            ("hit_tokens", "loads", "load_failures", "load_seconds", "loaded_bytes", "saves", "saved_bytes"), 0.0
        )
        self._scheduler = Scheduler(config, self._blocks, info.max_model_len)
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._fault: BaseException | None = None
        self._steps = 0
        self._generated = 0

    def counters(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._scheduler.running),
            num_waiting=len(self._scheduler.waiting),
            kv_cache_usage=self._blocks.usage(),
            prefix_cache_queries=self._blocks.prefix_queries,
            prefix_cache_hits=self._blocks.prefix_hits,
            num_preemptions=self._scheduler.num_preemptions,
            num_steps=self._steps,
            generation_tokens=self._generated,
            host_cache_hit_tokens=self._blocks.host_hits,
            host_cache_offloads=self._blocks.host_offloads,
            **{f"kv_tier_{k}": v for k, v in self._tier_counts.items()},
        )

    def prompt_keys(self, prompt_ids: list[int], salt: str | None) -> list[BlockKey]:
        """Keys of the prompt's full blocks that can be cached: short of the block that holds
        the last token (always computed)."""
        bs = self._info.block_size
        usable = (len(prompt_ids) - 1) // bs * bs
        return block_keys(self._blocks.namespace.root(salt), prompt_ids[:usable], bs)

    def chunk_keys(self, prompt_ids: list[int], salt: str | None, chunk_blocks: int) -> list[BlockKey]:
        return chunks_of(self.prompt_keys(prompt_ids, salt), chunk_blocks)

    def held_run(self, keys: list[BlockKey]) -> int:
        """Leading blocks of `keys` this replica holds (pool or host tier), for the router."""
        return self._blocks.held_run(keys)

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    def add(
        self,
        prompt_ids: list[int],
        samplings: list[tuple[SamplingSpec, int]],
        max_tokens: int,
        ignore_eos: bool,
        cache_salt: str | None = None,
        stop_token_ids: Collection[int] = (),
        min_tokens: int = 0,
        constraint: Constraint | None = None,
        prompt_top_logprobs: int | None = None,
        tier: TierHint | None = None,
    ) -> list[Sequence]:
        """Queue one sequence per (sampling, seed); refuses all at once (503) when full.
        `cache_salt` (the tenant) keeps its prefix-cache blocks apart from other tenants'.
        `stop_token_ids` end a sequence like EOS (even with ignore_eos); none of them nor EOS
        is sampled before `min_tokens` outputs. With a `constraint` every output follows its
        grammar and ends ("stop") when the grammar is complete. With `prompt_top_logprobs` the
        first sequence scores its prompt tokens (`Sequence.prompt_scores`, complete once
        `prompt_read` is set). `tier`: what the cluster KV tier holds of the prompt (and wants
        of it), from a lookup with `chunk_keys`."""
        self._check_healthy()
        stop = (frozenset() if ignore_eos else frozenset(self._info.eos_token_ids)) | frozenset(stop_token_ids)
        seqs = [
            Sequence(
                list(prompt_ids),
                spec,
                seed,
                max_tokens,
                stop,
                min_tokens=min_tokens,
                cache_salt=cache_salt,
                constraint=constraint.start() if constraint is not None else None,
                prompt_top_logprobs=prompt_top_logprobs if i == 0 else None,
                tier=tier if self._tier is not None else None,
            )
            for i, (spec, seed) in enumerate(samplings)
        ]
        return self._queue(seqs)

    def embed(self, prompts: list[list[int]], cache_salt: str | None = None) -> list[Sequence]:
        """Queue one prefill per prompt whose last token's final hidden state becomes the
        sequence's `embedding` (it ends, "stop", once computed); refuses all at once when full."""
        self._check_healthy()
        return self._queue(
            [Sequence(list(p), SamplingSpec(), 0, 0, frozenset(), cache_salt=cache_salt, embed=True) for p in prompts]
        )

    def _check_healthy(self) -> None:
        if self._fault is not None:  # worth retrying elsewhere: nothing of it ran here
            raise Overloaded("the model replica failed and is being replaced", code="replica_failed", retry_after_s=1.0)

    def _queue(self, seqs: list[Sequence]) -> list[Sequence]:
        self._scheduler.add(seqs)
        self._ensure_loop()
        self._wakeup.set()
        return seqs

    def abort(self, seq: Sequence) -> None:
        """Stop generating for seq; it leaves the batch before the next step."""
        if seq.finish_reason is None:
            seq.aborted = True
            self._wakeup.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[list[SampledToken]]:
        """Tokens of seq as they are sampled, every token already there in one list (a slow
        consumer gets fewer, larger pieces); aborts the sequence if the consumer goes away."""
        try:
            while True:
                items = [await seq.queue.get()]
                while not seq.queue.empty():
                    items.append(seq.queue.get_nowait())
                tokens = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        if tokens:
                            yield tokens
                        return
                    tokens.append(item)
                yield tokens
        finally:
            self.abort(seq)

    def health(self) -> None:
        if self._fault is not None:
            raise RuntimeError(f"engine failed: {self._fault!r}")
        self._runner.health()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            # A fresh context, not the request's that happened to start the loop: Ray treats the
            # rank tasks a step submits as children of the request in the current context and
            # cancels them when that client disconnects, failing the step for everyone.
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._run_loop(), context=contextvars.Context())

    async def _run_loop(self) -> None:
        """Steps until idle. Any failure (the runner's, or a bug here) ends every in-flight request
        with a 500 and marks the engine unhealthy, so that Serve replaces the replica: nothing
        is left waiting on a loop that died."""
        try:
            while True:
                await self._iterate()
        except Exception as exc:
            logger.exception("engine step failed")
            self._fault = exc
            self._fail_all(EngineFault("the model runner failed while generating"))
            if self._on_fault is not None:
                self._on_fault(exc)

    async def _iterate(self) -> None:
        scheduler = self._scheduler
        for seq in scheduler.drop_aborted():
            self._end(seq, "abort")
        for seq in scheduler.running:  # chunks that came into the pool by the last step's copies
            self._queue_saves(seq)  # (not after `schedule`: its copies back land in this step)
        batch = scheduler.schedule()
        loads = scheduler.take_loads()
        saves, self._saves = self._saves, []
        offloads, onloads = self._blocks.take_host_copies()
        if not (batch or loads or saves or offloads or onloads):
            self._wakeup.clear()
            if not scheduler.has_work():
                await self._wakeup.wait()
            else:  # blocked on KV blocks held by nothing running: cannot happen, but never spin
                await asyncio.sleep(0.001)
            return
        step_input = StepInput(
            seqs=[self._feed(s) for s in batch],
            saves=tuple(copy for _, copy in saves),
            loads=tuple(copy for _, load in loads for copy in load.copies),
            offloads=offloads,
            onloads=onloads,
        )
        output = await asyncio.to_thread(self._runner.step, step_input)
        self._steps += 1
        self._landed(loads, output.loaded)
        self._saved(saves, output.saved)
        self._apply(batch, step_input, output)

    def _queue_saves(self, seq: Sequence) -> None:
        """Queue saves of seq's chunks that the tier wants and that are computed now."""
        if seq.tier is None or seq.table is None or self._tier is None or not seq.tier.wanted - seq.tier.queued:
            return
        computed = min(seq.num_computed, len(seq.prompt_ids)) // self._info.block_size
        self._saves.extend(due_saves(seq.tier, seq.table.blocks, computed, self._tier))

    def _landed(self, loads: list[tuple[Sequence, TierLoad]], loaded: tuple[LoadOutcome, ...]) -> None:
        """Sequences whose tier loads were in the step go on from what landed."""
        results = iter(loaded)
        bs, counts, now = self._info.block_size, self._tier_counts, time.monotonic()
        for seq, load in loads:
            outcomes = [next(results) for _ in load.copies]
            oks = [o == "ok" for o in outcomes]
            for key, copy, outcome in zip(load.keys, load.copies, outcomes, strict=True):
                if outcome != "ok" and self._tier is not None:  # gone, or not what the store recorded
                    self._forget(key, copy.checksums)
            if seq.loading is not load or seq.table is None:  # ended meanwhile
                continue
            local = seq.num_computed // bs
            usable = loaded_blocks(load, local, oks)
            seq.loading = None
            seq.num_computed = usable * bs
            self._blocks.register_full_blocks(seq.table, seq.tokens, seq.num_computed)
            counts["hit_tokens"] += (usable - local) * bs
            counts["loads"] += 1
            counts["load_failures"] += oks.count(False)
            counts["load_seconds"] += now - load.started
            counts["loaded_bytes"] += load.nbytes * sum(oks) // max(1, len(oks))

    def _forget(self, key: BlockKey, checksums: tuple[str, ...]) -> None:
        try:
            self._tier.forget(key, checksums)  # type: ignore[union-attr]
        except Exception:  # the tier is a cache: whatever fails there, generation goes on
            logger.warning("KV tier forget failed", exc_info=True)

    def _saved(self, saves: list[tuple[BlockKey, ChunkCopy]], saved: tuple[tuple[ChunkWritten, ...] | None, ...]) -> None:
        for (key, copy), written in zip(saves, saved, strict=True):
            if self._tier is None:
                continue
            try:
                if written is None:  # some rank could not write its file: the others' go too
                    self._tier.discard(copy.path)
                    continue
                self._tier.commit(key, copy.path, written)
            except Exception:  # the tier is a cache: whatever fails there, generation goes on
                logger.warning("KV tier commit failed", exc_info=True)
                continue
            self._tier_counts["saves"] += 1
            self._tier_counts["saved_bytes"] += sum(w.nbytes for w in written)

    @staticmethod
    def _feed(s: Scheduled) -> SequenceStep:
        seq = s.seq
        assert seq.table is not None
        penalized = s.samples and seq.sampling.repetition_penalty != 1.0
        targets: list[int] = []
        if seq.scores_prompt and len(seq.prompt_scores) == s.start:  # not again after a preemption
            targets = seq.prompt_ids[s.start + 1 : s.start + s.num_tokens + 1]
        return SequenceStep(
            seq_id=seq.seq_id,
            token_ids=seq.tokens(s.start, s.start + s.num_tokens),
            start_pos=s.start,
            block_table=list(seq.table.blocks),
            sampling=seq.sampling,
            sample=s.samples and not seq.embed,
            embed=s.samples and seq.embed,
            sample_seed=seq.step_seed(),
            penalty_tokens=(*seq.prompt_ids, *seq.output_ids) if penalized else (),
            output_tokens=tuple(seq.output_ids) if s.samples and seq.sampling.counts_output else (),
            banned_tokens=tuple(sorted(seq.stop_token_ids)) if s.samples and len(seq.output_ids) < seq.min_tokens else (),
            allowed_tokens=seq.constraint.allowed_tokens() if s.samples and seq.constraint is not None else None,
            prompt_targets=tuple(targets),
            prompt_top_logprobs=seq.prompt_top_logprobs or 0,
        )

    def _apply(self, batch: list[Scheduled], step_input: StepInput, output: StepOutput) -> None:
        sampled = iter(output.tokens)
        scores = iter(output.prompt_logprobs)
        now = time.monotonic()
        for s, fed in zip(batch, step_input.seqs, strict=True):
            seq = s.seq
            seq.prompt_scores.extend(next(scores) for _ in fed.prompt_targets)  # what _feed asked for
            seq.num_computed = s.start + s.num_tokens
            if seq.num_computed >= len(seq.prompt_ids):
                seq.prompt_read.set()
            if seq.table is not None:
                self._blocks.register_full_blocks(seq.table, seq.tokens, seq.num_computed)
                self._queue_saves(seq)  # before it may end and free its blocks
            if seq.embed:
                if s.samples and seq.finish_reason is None:
                    seq.embedding = output.embeddings[seq.seq_id]
                    self._end(seq, "stop")
                continue
            if not s.samples:
                continue
            tok = next(sampled)
            if seq.aborted or seq.finish_reason is not None:
                continue
            seq.output_ids.append(tok.token_id)
            self._generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.queue.put_nowait(tok)
            if tok.token_id in seq.stop_token_ids:
                self._end(seq, "stop")
            elif seq.constraint is not None and not self._follows(seq, tok.token_id):
                self._end(seq, "stop")
            elif len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self._info.max_model_len:
                self._end(seq, "length")

    @staticmethod
    def _follows(seq: Sequence, token_id: int) -> bool:
        """Advance seq's grammar; False when it is complete (or, were the sampler to pick a
        token outside the mask, broken): the output ends there either way."""
        assert seq.constraint is not None
        if not seq.constraint.accept(token_id):
            logger.warning("sequence %d: token %d is outside its grammar; ending the output", seq.seq_id, token_id)
            return False
        return not seq.constraint.finished

    def _end(self, seq: Sequence, reason: str) -> None:
        self._scheduler.finish(seq)
        seq.prompt_read.set()  # nobody waits for a prompt that will not be read
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.queue.put_nowait(None)

    def _fail_all(self, error: BaseException) -> None:
        for seq in [*self._scheduler.running, *self._scheduler.waiting]:
            self._scheduler.finish(seq)
            seq.finish_reason = "error"
            seq.prompt_read.set()
            seq.queue.put_nowait(error)
        self._scheduler.waiting.clear()
