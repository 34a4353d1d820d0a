"""One output of a generation as the chunks its consumer reads: the engine's sampled tokens,
detokenized incrementally, cut at stop strings and stop tokens, batched to the stream interval."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from transformers import PreTrainedTokenizerBase

from deployments.engine.engine import LLMEngine
from deployments.engine.scheduler import Sequence
from deployments.replica.output import OutputText, to_token_logprob
from deployments.types import FinishReason, GenerateChunk, GenerateRequest, TokenLogprob


async def output_chunks(
    engine: LLMEngine,
    seq: Sequence,
    tokenizer: PreTrainedTokenizerBase,
    request: GenerateRequest,
    request_id: str,
    index: int,
    prompt_tokens: int,
    interval_s: Callable[[], float],
    observe_itl: Callable[[float], None],
) -> AsyncIterator[GenerateChunk]:
    """One output's chunks: text released by the detokenizer, ended by EOS, a stop string, the
    length limit or a complete grammar; at most one chunk per `interval_s()` seconds while it
    runs (asked anew after each chunk: it widens with load; the first and the last always go at
    once). `observe_itl` gets each inter-token gap."""
    text = OutputText(tokenizer, request.stop)
    want_logprobs = request.logprobs is not None
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    consumed = 0

    def chunk(delta: str, finish: FinishReason | None) -> GenerateChunk:
        nonlocal ids, logprobs
        out = GenerateChunk(
            request_id=request_id,
            index=index,
            text=delta,
            token_ids=ids,
            finish_reason=finish,
            logprobs=logprobs if want_logprobs else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=consumed,
        )
        ids, logprobs = [], []
        return out

    last_sent, wait_s = 0.0, 0.0  # the first chunk goes at once
    delta = ""
    last_token_at = time.monotonic()
    async for tokens in engine.stream(seq):
        now = time.monotonic()
        if consumed:  # the first token's wait is time to first token, not inter-token latency
            gap = (now - last_token_at) / len(tokens)
            for _ in tokens:
                observe_itl(gap)
        last_token_at = now
        for tok in tokens:
            consumed += 1
            ids.append(tok.token_id)
            if want_logprobs:
                logprobs.append(to_token_logprob(tokenizer, tok))
            if tok.token_id in seq.stop_token_ids:
                yield chunk(delta + text.finish(), "stop")
                return
            delta += text.feed(tok.token_id, final=False, stops=consumed >= request.min_tokens)
            if text.stopped:
                engine.abort(seq)
                yield chunk(delta, "stop")
                return
        if (delta or want_logprobs) and now - last_sent >= wait_s:
            yield chunk(delta, None)
            delta, last_sent, wait_s = "", now, interval_s()
    # The engine ended it: at the length limit, or (a stop token aside) its grammar complete.
    yield chunk(delta + text.finish(), "stop" if seq.finish_reason == "stop" else "length")
