"""OpenAI response bodies built from GenerateResponse and GenerateChunk."""

from __future__ import annotations

from typing import Any

from deployments.types import GenerateChunk, GenerateResponse, TokenLogprob, Usage


def completion_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The legacy completions `logprobs` object (parallel lists)."""
    if items is None:
        return None
    offsets, pos = [], 0
    for it in items:
        offsets.append(pos)
        pos += len(it.token)
    return {
        "tokens": [it.token for it in items],
        "token_logprobs": [it.logprob for it in items],
        "top_logprobs": [dict(it.top_logprobs) for it in items],
        "text_offset": offsets,
    }


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {
        "content": [
            {
                "token": it.token,
                "logprob": it.logprob,
                "bytes": list(it.token.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in it.top_logprobs],
            }
            for it in items
        ]
    }


def usage_dict(usage: Usage) -> dict[str, int]:
    return usage.model_dump()


def sum_usage(responses: list[GenerateResponse]) -> Usage:
    prompt = sum(r.usage.prompt_tokens for r in responses)
    completion = sum(r.usage.completion_tokens for r in responses)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_body(request_id: str, model: str, created: int, responses: list[GenerateResponse], n: int) -> dict[str, Any]:
    choices = [
        {
            "index": p * n + out.index,
            "text": out.text,
            "logprobs": completion_logprobs(out.logprobs),
            "finish_reason": out.finish_reason,
        }
        for p, r in enumerate(responses)
        for out in r.outputs
    ]
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_dict(sum_usage(responses)),
    }


def chat_body(request_id: str, model: str, created: int, response: GenerateResponse) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": chat_logprobs(out.logprobs),
                "finish_reason": out.finish_reason,
            }
            for out in response.outputs
        ],
        "usage": usage_dict(response.usage),
    }


def completion_chunk(request_id: str, model: str, created: int, index: int, chunk: GenerateChunk) -> dict[str, Any]:
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": chunk.text,
                "logprobs": completion_logprobs(chunk.logprobs),
                "finish_reason": chunk.finish_reason,
            }
        ],
    }


def chat_chunk(
    request_id: str, model: str, created: int, index: int, delta: dict[str, Any], chunk: GenerateChunk | None
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "logprobs": chat_logprobs(chunk.logprobs) if chunk else None,
                "finish_reason": chunk.finish_reason if chunk else None,
            }
        ],
    }


def usage_chunk(request_id: str, model: str, created: int, obj: str, usage: Usage) -> dict[str, Any]:
    prefix = "chatcmpl" if obj == "chat.completion.chunk" else "cmpl"
    return {
        "id": f"{prefix}-{request_id}",
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_dict(usage),
    }
