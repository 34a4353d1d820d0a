"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from deployments.api.http_errors import error_response, unwrap
from deployments.api.openai_format import (
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    usage_chunk,
)
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest
from deployments.errors import InvalidRequest, ModelNotFound
from deployments.types import GenerateChunk, GenerateRequest, GenerateResponse, ModelCard, Usage


class Backend(Protocol):
    """What the routes need from the ingress deployment."""

    model_name: str
    max_prompts: int

    async def generate(self, request: GenerateRequest) -> GenerateResponse: ...

    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    async def model_card(self) -> ModelCard: ...


def check_model(backend: Backend, model: str | None) -> None:
    if model is not None and model != backend.model_name:
        raise ModelNotFound(f"model {model!r} does not exist; this server serves {backend.model_name!r}")


def model_object(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.name,
        "object": "model",
        "created": card.created,
        "owned_by": "shardserve",
        "root": card.source,
        "max_model_len": card.max_model_len,
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _merge(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Interleave several chunk streams as chunks arrive; tag each with its stream's position."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerateChunk] | BaseException | None] = asyncio.Queue()

    async def pump(pos: int, stream: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((pos, chunk))
            await queue.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
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
        for t in tasks:
            t.cancel()


async def _start_stream(
    streams: list[AsyncIterator[GenerateChunk]],
) -> tuple[AsyncIterator[tuple[int, GenerateChunk]], tuple[int, GenerateChunk] | None]:
    """Pull the first chunk before answering, so that a bad request still gets its 4xx status."""
    merged = _merge(streams)
    try:
        first = await merged.__anext__()
    except StopAsyncIteration:
        first = None
    return merged, first


def register(app: FastAPI, backend: Backend) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = await backend.model_card()
        return {"object": "list", "data": [model_object(card)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(backend, body.model)
        try:
            requests = body.to_generate_requests()
        except (ValueError, ValidationError) as exc:
            raise InvalidRequest(_first_error(exc), param="prompt") from None
        if len(requests) > backend.max_prompts:
            raise InvalidRequest(f"at most {backend.max_prompts} prompts per request", param="prompt")
        request_id, created = uuid.uuid4().hex, int(time.time())
        if not body.stream:
            responses = await asyncio.gather(*(backend.generate(r) for r in requests))
            return completion_body(request_id, backend.model_name, created, list(responses), body.n)
        merged, first = await _start_stream([backend.generate_stream(r) for r in requests])

        async def events() -> AsyncIterator[str]:
            usage = _UsageCounter()
            try:
                pending = [first] if first else []
                async for item in _chain(pending, merged):
                    pos, chunk = item
                    usage.add(pos, chunk)
                    yield _sse(completion_chunk(request_id, backend.model_name, created, pos * body.n + chunk.index, chunk))
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse(usage_chunk(request_id, backend.model_name, created, "text_completion", usage.total()))
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                yield _sse(json.loads(error_response(raw, unwrap(exc)).body))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_model(backend, body.model)
        if not body.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        request = body.to_generate_request()
        request_id, created = uuid.uuid4().hex, int(time.time())
        if not body.stream:
            response = await backend.generate(request)
            return chat_body(request_id, backend.model_name, created, response)
        merged, first = await _start_stream([backend.generate_stream(request)])

        async def events() -> AsyncIterator[str]:
            usage = _UsageCounter()
            try:
                for i in range(body.n):
                    yield _sse(chat_chunk(request_id, backend.model_name, created, i, {"role": "assistant", "content": ""}, None))
                async for _, chunk in _chain([first] if first else [], merged):
                    usage.add(0, chunk)
                    delta = {"content": chunk.text} if chunk.text or chunk.finish_reason is None else {}
                    yield _sse(chat_chunk(request_id, backend.model_name, created, chunk.index, delta, chunk))
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse(usage_chunk(request_id, backend.model_name, created, "chat.completion.chunk", usage.total()))
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                yield _sse(json.loads(error_response(raw, unwrap(exc)).body))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


class _UsageCounter:
    """Usage of a streamed request: prompt tokens once per prompt, completion tokens per output."""

    def __init__(self) -> None:
        self._prompt: dict[int, int] = {}
        self._completion: dict[tuple[int, int], int] = {}

    def add(self, pos: int, chunk: GenerateChunk) -> None:
        self._prompt[pos] = chunk.prompt_tokens
        self._completion[(pos, chunk.index)] = chunk.completion_tokens

    def total(self) -> Usage:
        prompt, completion = sum(self._prompt.values()), sum(self._completion.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return str(err.get("msg", exc))
    return str(exc)
