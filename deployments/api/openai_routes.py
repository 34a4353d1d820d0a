"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from deployments.api.cache_control import mark_cache_status, with_cache_control
from deployments.api.http_errors import error_response, unwrap
from deployments.api.openai_format import (
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    embeddings_body,
    usage_chunk,
)
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest, DetokenizeBody, EmbeddingsBody, TokenizeBody
from deployments.errors import InvalidRequest, ModelNotFound
from deployments.streams import merge
from deployments.types import (
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)


class Backend(Protocol):
    """What the routes need from the ingress deployment."""

    model_name: str
    max_prompts: int
    versions: list[int]
    labels: dict[str, int]

    def resolve_version(self, version: int | str | None = None, label: str | None = None) -> int: ...

    async def generate(self, request: GenerateRequest, version: int | None = None) -> GenerateResponse: ...

    def generate_stream(self, request: GenerateRequest, version: int | None = None) -> AsyncIterator[GenerateChunk]: ...

    async def model_card(self, version: int | None = None) -> ModelCard: ...

    async def tokenize(self, request: TokenizeRequest, version: int | None = None) -> TokenizeResponse: ...

    async def detokenize(self, tokens: list[int], version: int | None = None) -> str: ...

    async def embed(self, request: EmbedRequest, version: int | None = None) -> EmbedResponse: ...


def check_model(backend: Backend, model: str | None) -> int | None:
    """The version a `model` field names: `name` (the newest) or `name:version`."""
    if model is None or model == backend.model_name:
        return None
    name, _, version = model.partition(":")
    if name == backend.model_name and version:
        try:
            return backend.resolve_version(version)
        except ModelNotFound:
            pass
    served = f"{backend.model_name!r} (versions {backend.versions})"
    raise ModelNotFound(f"model {model!r} does not exist; this server serves {served}")


def model_object(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.name,
        "object": "model",
        "created": card.created,
        "owned_by": "shardserve",
        "root": card.source,
        "max_model_len": card.max_model_len,
        # What the replica computes with (an operator sees a kernel fallback here and in
        # shardserve:model_info); clients of OpenAI's schema ignore fields they do not know.
        "dtype": card.dtype,
        "attention_backend": card.attention_backend,
        "fused_ops": card.fused_ops,
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _start_stream(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Pull the first chunk before answering, so that a bad request still gets its 4xx status."""
    merged = merge(streams)
    try:
        first = await anext(merged)
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncIterator[tuple[int, GenerateChunk]]:
        if first is not None:
            yield first
        async for item in merged:
            yield item

    return chained()


def register(app: FastAPI, backend: Backend) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The model by its name (the newest version) and, when several versions are served,
        each as `name:version`."""
        data = [model_object(await backend.model_card())]
        if len(backend.versions) > 1:
            for v in backend.versions:
                data.append({**model_object(await backend.model_card(v)), "id": f"{backend.model_name}:{v}"})
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> TokenizeResponse:
        """vLLM's route: the prompt's token ids as a generation would read them."""
        version = check_model(backend, body.model)
        try:
            request = body.to_request()
        except ValidationError as exc:
            raise InvalidRequest(_first_error(exc), param="prompt") from None
        return await backend.tokenize(request, version)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict[str, str]:
        return {"prompt": await backend.detokenize(body.tokens, check_model(backend, body.model))}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsBody, raw: Request) -> dict[str, Any]:
        """Each input's embedding (see EmbedRequest), as floats or base64 of little-endian float32."""
        version = check_model(backend, body.model)
        inputs = body.inputs()
        if not inputs or len(inputs) > backend.max_prompts:
            raise InvalidRequest(f"give 1 to {backend.max_prompts} inputs", param="input")
        tenant = raw.scope.get("state", {}).get("tenant")
        answer = await backend.embed(EmbedRequest(inputs=inputs, dimensions=body.dimensions, tenant=tenant), version)
        return embeddings_body(backend.model_name, answer, body.encoding_format)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request, response: Response):
        version = check_model(backend, body.model)
        try:
            requests = body.to_generate_requests()
        except (ValueError, ValidationError) as exc:
            raise InvalidRequest(_first_error(exc), param="prompt") from None
        if len(requests) > backend.max_prompts:
            raise InvalidRequest(f"at most {backend.max_prompts} prompts per request", param="prompt")
        requests = with_cache_control(requests, raw)
        request_id, created = uuid.uuid4().hex, int(time.time())
        if not body.stream:
            responses = list(await asyncio.gather(*(backend.generate(r, version) for r in requests)))
            mark_cache_status(response, responses)
            return completion_body(request_id, backend.model_name, created, responses, body.n)
        stream = await _start_stream([backend.generate_stream(r, version) for r in requests])

        async def payloads() -> AsyncIterator[dict[str, Any]]:
            usage = _UsageCounter()
            async for pos, chunk in stream:
                usage.add(pos, chunk)
                yield completion_chunk(request_id, backend.model_name, created, pos * body.n + chunk.index, chunk)
            if body.stream_options and body.stream_options.include_usage:
                yield usage_chunk(request_id, backend.model_name, created, "text_completion", usage.total())

        return _sse_response(raw, payloads())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request, response: Response):
        version = check_model(backend, body.model)
        try:
            generate = body.to_generate_request()
        except ValidationError as exc:  # tools that do not fit together (GenerateRequest._tools_fit)
            message = _first_error(exc)
            raise InvalidRequest(message, param=next((f for f in ("tool_choice", "tools") if f in message), None)) from None
        [request] = with_cache_control([generate], raw)
        request_id, created = uuid.uuid4().hex, int(time.time())
        if not body.stream:
            answer = await backend.generate(request, version)
            mark_cache_status(response, [answer])
            return chat_body(request_id, backend.model_name, created, answer)
        stream = await _start_stream([backend.generate_stream(request, version)])

        async def payloads() -> AsyncIterator[dict[str, Any]]:
            usage = _UsageCounter()
            for i in range(body.n):
                yield chat_chunk(request_id, backend.model_name, created, i, {"role": "assistant", "content": ""}, None)
            async for _, chunk in stream:
                usage.add(0, chunk)
                delta: dict[str, Any] = {}
                if chunk.text or (chunk.finish_reason is None and not chunk.tool_calls):
                    delta["content"] = chunk.text
                if chunk.tool_calls:
                    delta["tool_calls"] = [d.openai() for d in chunk.tool_calls]
                yield chat_chunk(request_id, backend.model_name, created, chunk.index, delta, chunk)
            if body.stream_options and body.stream_options.include_usage:
                yield usage_chunk(request_id, backend.model_name, created, "chat.completion.chunk", usage.total())

        return _sse_response(raw, payloads())


def _sse_response(raw: Request, payloads: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-Sent Events ending with [DONE]. An error after the status line was sent is
    reported in-band, in the same error shape."""

    async def events() -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                yield _sse(payload)
        except Exception as exc:  # noqa: BLE001 - mapped to the error body, never a traceback
            yield _sse(json.loads(error_response(raw, unwrap(exc)).body))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


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
