"""Iteration-level generation engine over a ModelRunner.

One asyncio task runs steps back to back while there is work. Each step feeds every running
sequence (new ones with their prompt, the rest with their last token), so a new request joins
at the next step and a finished or aborted one leaves at once: no request waits for an
unrelated generation to end. The runner's step runs in a worker thread so that the replica's
event loop keeps serving health checks and streams while the model computes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from deployments.config import EngineConfig
from deployments.errors import EngineFault, Overloaded
from parallel.runner import ModelInfo, ModelRunner, SampledToken, SamplingSpec, SequenceStep, StepInput

logger = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One generated output: its tokens so far and the queue its consumer reads."""

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingSpec
    max_tokens: int
    stop_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    queue: asyncio.Queue[SampledToken | BaseException | None] = field(default_factory=asyncio.Queue)
    finish_reason: str | None = None
    aborted: bool = False

    def next_feed(self) -> SequenceStep:
        if not self.output_ids:
            return SequenceStep(self.seq_id, self.prompt_ids, 0, self.sampling)
        pos = len(self.prompt_ids) + len(self.output_ids) - 1
        return SequenceStep(self.seq_id, [self.output_ids[-1]], pos, self.sampling)


class LLMEngine:
    def __init__(self, runner: ModelRunner, info: ModelInfo, config: EngineConfig) -> None:
        self._runner = runner
        self._info = info
        self._config = config
        self._ids = itertools.count()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._to_free: list[int] = []
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._fault: BaseException | None = None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, prompt_ids: list[int], sampling: SamplingSpec, max_tokens: int, ignore_eos: bool) -> Sequence:
        """Queue a sequence; refuses at once (503) when the waiting queue is full."""
        if self._fault is not None:
            raise EngineFault("the model runner failed; the replica is restarting")
        free_slots = max(0, self._config.max_num_seqs - len(self._running))
        if len(self._waiting) >= self._config.max_waiting_requests + free_slots:
            raise Overloaded("server is overloaded: too many requests waiting", code="queue_full", retry_after_s=1.0)
        seq = Sequence(
            seq_id=next(self._ids),
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop_token_ids=frozenset() if ignore_eos else frozenset(self._info.eos_token_ids),
        )
        self._waiting.append(seq)
        self._ensure_loop()
        self._wakeup.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop generating for seq; it leaves the batch before the next step."""
        seq.aborted = True
        self._wakeup.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[SampledToken]:
        """Tokens of seq as they are sampled; aborts the sequence if the consumer goes away."""
        try:
            while True:
                item = await seq.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if seq.finish_reason is None:
                self.abort(seq)

    def health(self) -> None:
        if self._fault is not None:
            raise RuntimeError(f"engine failed: {self._fault!r}")
        self._runner.health()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        while True:
            self._drop_aborted()
            self._admit()
            if not self._running:
                if self._to_free:
                    await asyncio.to_thread(self._runner.free, self._flush_frees())
                self._wakeup.clear()
                if not self._waiting:
                    await self._wakeup.wait()
                continue
            batch = list(self._running)
            step_input = StepInput(seqs=[s.next_feed() for s in batch])
            frees = self._flush_frees()
            try:
                output = await asyncio.to_thread(self._step, frees, step_input)
            except Exception as exc:  # a runner fault ends every in-flight request, not the loop
                logger.exception("model runner step failed")
                self._fault = exc
                self._fail_all(EngineFault("the model runner failed while generating"))
                return
            self._apply(batch, output.tokens)

    def _step(self, frees: list[int], step_input: StepInput):  # runs in the worker thread
        if frees:
            self._runner.free(frees)
        return self._runner.step(step_input)

    def _flush_frees(self) -> list[int]:
        frees, self._to_free = self._to_free, []
        return frees

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._config.max_num_seqs:
            seq = self._waiting.popleft()
            if not seq.aborted:
                self._running.append(seq)

    def _drop_aborted(self) -> None:
        keep = []
        for seq in self._running:
            if seq.aborted:
                self._finish(seq, "abort")
            else:
                keep.append(seq)
        self._running = keep

    def _apply(self, batch: list[Sequence], tokens: list[SampledToken]) -> None:
        done: set[int] = set()
        for seq, tok in zip(batch, tokens, strict=True):
            if seq.aborted:
                continue
            seq.output_ids.append(tok.token_id)
            seq.queue.put_nowait(tok)
            total = len(seq.prompt_ids) + len(seq.output_ids)
            if tok.token_id in seq.stop_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= seq.max_tokens or total >= self._info.max_model_len:
                self._finish(seq, "length")
            else:
                continue
            done.add(seq.seq_id)
        if done:
            self._running = [s for s in self._running if s.seq_id not in done]

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.queue.put_nowait(None)
        self._to_free.append(seq.seq_id)

    def _fail_all(self, error: BaseException) -> None:
        for seq in [*self._running, *self._waiting]:
            seq.finish_reason = "error"
            seq.queue.put_nowait(error)
        self._running.clear()
        self._waiting.clear()
