"""OpenAI response bodies built from GenerateResponse and GenerateChunk."""

from __future__ import annotations

import base64
import struct
from typing import Any

from deployments.tools import ToolCall
from deployments.types import EmbedResponse, GenerateChunk, GenerateResponse, TokenLogprob, Usage


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
        # A prompt's first token has neither (with echo), as in OpenAI's and vLLM's answers.
        "top_logprobs": [dict(it.top_logprobs) if it.logprob is not None else None for it in items],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(items: list[TokenLogprob] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, its own and its top alternatives' logprobs
    keyed by token id (None for the first token)."""
    if items is None:
        return None
    out: list[dict[str, Any] | None] = []
    for it in items:
        if it.logprob is None:
            out.append(None)
            continue
        entry = {str(it.token_id): {"logprob": it.logprob, "rank": it.rank, "decoded_token": it.token}}
        for rank, (token_id, (token, logprob)) in enumerate(zip(it.top_token_ids or [], it.top_logprobs, strict=True), start=1):
            entry.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": token})
        out.append(entry)
    return out


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


def _prompt_logprobs_field(items: list[TokenLogprob] | None) -> dict[str, Any]:
    """vLLM's `prompt_logprobs` key where they were asked for, nothing otherwise."""
    return {} if items is None else {"prompt_logprobs": vllm_prompt_logprobs(items)}


def embeddings_body(model: str, answer: EmbedResponse, encoding_format: str) -> dict[str, Any]:
    def encoded(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":  # what the openai SDK asks for by default
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(answer.embeddings)],
        "model": model,
        "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens},
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
            **_prompt_logprobs_field(out.prompt_logprobs),
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
                "message": _message(out.text, out.tool_calls),
                "logprobs": chat_logprobs(out.logprobs),
                "finish_reason": out.finish_reason,
            }
            for out in response.outputs
        ],
        "usage": usage_dict(response.usage),
        **_prompt_logprobs_field(response.outputs[0].prompt_logprobs),  # vLLM's: once per answer
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
                **_prompt_logprobs_field(chunk.prompt_logprobs),
            }
        ],
    }


def _message(text: str, calls: list[ToolCall] | None) -> dict[str, Any]:
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": [c.model_dump() for c in calls]}


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
