"""Merging several async streams into one, as items arrive (n outputs, several prompts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

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
