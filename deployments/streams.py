"""Merging several async streams into one, as items arrive (n outputs, several prompts), and
rebuilding a whole answer from a generation's chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from deployments.tools import merged
from deployments.types import CompletionOutput, GenerateChunk, GenerateResponse, Usage

T = TypeVar("T")


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (stream position, item) in arrival order; an error in any stream is raised here,
    and closing the merged stream cancels the rest."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(pos: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((pos, item))
            await queue.put(None)
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


class StreamRecorder:
    """Rebuilds the whole answer from a request's chunks: how the LLM server answers
    `generate`, and how the ingress fills the result cache from a streamed miss."""

    def __init__(self, n: int) -> None:
        self._text: dict[int, list[str]] = {i: [] for i in range(n)}
        self._ids: dict[int, list[int]] = {i: [] for i in range(n)}
        self._logprobs: dict[int, list] = {i: [] for i in range(n)}
        self._prompt_logprobs: dict[int, list] = {}
        self._tool_calls: dict[int, list] = {}
        self._finish: dict[int, str] = {}
        self._first: GenerateChunk | None = None

    def add(self, chunk: GenerateChunk) -> None:
        if self._first is None:
            self._first = chunk
        self._text[chunk.index].append(chunk.text)
        self._ids[chunk.index].extend(chunk.token_ids)
        if chunk.logprobs is not None:
            self._logprobs[chunk.index].extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            self._prompt_logprobs[chunk.index] = chunk.prompt_logprobs
        if chunk.tool_calls:
            self._tool_calls.setdefault(chunk.index, []).extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            self._finish[chunk.index] = chunk.finish_reason

    def response(self, model: str, with_logprobs: bool) -> GenerateResponse | None:
        """The answer, or None if the stream did not finish every output."""
        first = self._first
        if first is None or len(self._finish) != len(self._text) or first.prompt_token_ids is None:
            return None
        outputs = [
            CompletionOutput(
                index=i,
                text="".join(self._text[i]),
                token_ids=self._ids[i],
                finish_reason=self._finish[i],  # type: ignore[arg-type]
                logprobs=self._logprobs[i] if with_logprobs else None,
                prompt_logprobs=self._prompt_logprobs.get(i),
                tool_calls=merged(self._tool_calls[i]) if i in self._tool_calls else None,
            )
            for i in self._text
        ]
        prompt_tokens = len(first.prompt_token_ids)
        generated = sum(len(o.token_ids) for o in outputs)
        return GenerateResponse(
            request_id=first.request_id,
            model=model,
            created=int(time.time()),
            prompt=first.prompt or "",
            prompt_token_ids=first.prompt_token_ids,
            outputs=outputs,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated),
            model_fingerprint=first.model_fingerprint,
        )
