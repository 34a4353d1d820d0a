"""Turning one sequence's sampled tokens into text: incremental detokenization and stop strings.

Byte-level tokenizers can split a character across tokens, so text is released only once it
decodes cleanly. A stop string may arrive split across tokens too, so a stream holds back the
last few characters that could still be the start of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from deployments.types import TokenLogprob
from parallel.runner import SampledToken


@dataclass
class OutputText:
    """Text of one output so far. `feed` returns the newly released text."""

    tokenizer: PreTrainedTokenizerBase
    stop: list[str]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    released: int = 0
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def feed(self, token_id: int, final: bool, stops: bool = True) -> str:
        """Add a token; returns text that is now safe to send (all of it once final). With
        `stops` False the stop strings are not looked for (before the request's min_tokens,
        as vLLM skips every stop check)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            before = len(self.text)
            self.text += new
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            cut = self._first_stop(before) if stops else None
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
        return self._release(final or self.stopped)

    def finish(self) -> str:
        """Flush whatever is still held back (e.g. a trailing partial character)."""
        if not self.stopped:
            tail = self._decode(self.token_ids[self._prefix_offset :])
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            self.text += tail[len(prefix) :]
        return self._release(True)

    def _release(self, everything: bool) -> str:
        hold = 0 if everything else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.released, len(self.text) - hold)
        out, self.released = self.text[self.released : end], end
        return out

    def _first_stop(self, before: int) -> int | None:
        """The earliest stop string that ends in the text added after `before` (one that ended
        earlier was either found then, or came before min_tokens and does not count)."""
        hits = [i for s in self.stop if s and (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def to_token_logprob(tokenizer: PreTrainedTokenizerBase, tok: SampledToken) -> TokenLogprob:
    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return TokenLogprob(
        token=piece(tok.token_id),
        token_id=tok.token_id,
        logprob=tok.logprob,
        top_logprobs=[(piece(i), lp) for i, lp in tok.top_logprobs],
        rank=tok.rank,
        top_token_ids=[i for i, _ in tok.top_logprobs] if tok.rank is not None else None,
    )


def prompt_logprobs(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], scores: list[SampledToken]) -> list[TokenLogprob]:
    """One entry per prompt token: the first has no logprob (nothing predicts it), the rest
    the model's scores of them."""
    first = TokenLogprob(token=tokenizer.decode(prompt_ids[:1]), token_id=prompt_ids[0], logprob=None)
    return [first, *(to_token_logprob(tokenizer, s) for s in scores)]


def normalized(vector: list[float], dimensions: int | None) -> list[float]:
    """An embedding as returned: its first `dimensions` components (all when None), scaled to
    unit length (OpenAI's embeddings are; cosine similarity is then a dot product)."""
    kept = vector[:dimensions] if dimensions is not None else vector
    norm = math.sqrt(sum(x * x for x in kept)) or 1.0
    return [x / norm for x in kept]
