"""The request limits that need no tokenizer, checked before any work is sized by a request.

The ingress checks them before it allocates per-output state for the result cache, the LLM
server again before its own (handle callers skip the ingress): a request asking for n=10**11
must be a 400, not a list of 10**11 slots. Limits on tokens are checked after tokenization, in
the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from deployments.config import LimitsConfig
from deployments.errors import InvalidRequest
from deployments.types import GenerateRequest


def check_request(request: GenerateRequest, limits: LimitsConfig) -> None:
    if request.n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n}, got {request.n}", param="n")
    if len(request.stop) > limits.max_stop_sequences:
        raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
    if any(len(stop) > limits.max_stop_chars for stop in request.stop):
        raise InvalidRequest(f"stop strings must be at most {limits.max_stop_chars} characters", param="stop")
    if limits.max_tokens is not None and request.max_tokens is not None and request.max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens must be at most {limits.max_tokens}, got {request.max_tokens}", param="max_tokens")
    if request.logprobs is not None and request.logprobs > limits.max_logprobs:
        raise InvalidRequest(f"logprobs must be at most {limits.max_logprobs}", param="logprobs")
    if request.prompt_logprobs is not None and request.prompt_logprobs > limits.max_logprobs:
        raise InvalidRequest(f"prompt_logprobs must be at most {limits.max_logprobs}", param="prompt_logprobs")
    if request.messages is not None:
        if not request.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if len(request.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages are allowed", param="messages")


def check_token_ids(request: GenerateRequest, vocab_size: int) -> None:
    """Every token id a request names (prompt, logit_bias, stop_token_ids) is in the vocabulary:
    one outside it would index past the embedding or the logits row."""
    named = (
        ("prompt", request.prompt_token_ids or []),
        ("logit_bias", request.logit_bias or {}),
        ("stop_token_ids", request.stop_token_ids),
    )
    for param, ids in named:
        check_in_vocabulary(param, ids, vocab_size)


def check_in_vocabulary(param: str, ids: Iterable[int], vocab_size: int) -> None:
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise InvalidRequest(f"token id {outside[0]} in {param} is outside the vocabulary", param=param)


def check_budget(request: GenerateRequest, prompt_tokens: int, window: int, limits: LimitsConfig, default_cap: int | None) -> int:
    """The request's max_tokens once its prompt is tokenized: what it asked for, or the rest of
    the context window capped by the limits and the checkpoint's max_new_tokens (`default_cap`);
    a prompt or budget the window (or the limits) cannot take is a 400."""
    prompt_param = "prompt" if request.messages is None else "messages"
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens; at most {limits.max_prompt_tokens} are allowed",
            param=prompt_param,
            code="prompt_too_long",
        )
    if prompt_tokens >= window:
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens; the context window is {window} tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    max_tokens = request.max_tokens if request.max_tokens is not None else window - prompt_tokens
    if request.max_tokens is None:
        for cap in (limits.max_tokens, default_cap):
            max_tokens = min(max_tokens, cap or max_tokens)
    if prompt_tokens + max_tokens > window:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context window of {window} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if request.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    return max_tokens
