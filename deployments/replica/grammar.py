"""Structured output: a request's constraint compiled to a grammar, one matcher per sequence.

xgrammar (what vLLM and SGLang use by default) compiles a JSON schema, regex, choice list or
EBNF grammar against the tokenizer's vocabulary once; a matcher then says, before each sampled
token, which tokens keep the output inside the grammar, as a bitmask of vocab_size bits. The
engine computes the masks (it owns the per-sequence state, like vLLM's scheduler) and sends them
with the step; the model side only applies them (parallel.model.sampling), so constrained and free
sequences share one batched step and nothing about grammars crosses into parallel/.
"""

from __future__ import annotations

import functools
import json
import re

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from deployments.errors import InvalidRequest
from deployments.types import StructuredOutput

# Compiled grammars kept per replica: a schema sent with every request compiles once.
_CACHE_BYTES = 64 * 2**20


class Constraint:
    """A compiled grammar; `start` makes the state of one output that follows it."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int) -> None:
        self._compiled = compiled
        self._vocab_size = vocab_size

    def start(self) -> ConstraintState:
        return ConstraintState(xgrammar.GrammarMatcher(self._compiled), self._vocab_size)


class ConstraintState:
    """Where one output is in its grammar."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed_tokens(self) -> torch.Tensor:
        """The tokens allowed next, packed 32 to an int32 (bit j of word i: token 32i+j)."""
        mask = xgrammar.allocate_token_bitmask(1, self._vocab_size)
        self._matcher.fill_next_token_bitmask(mask)
        return mask[0]

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def finished(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return bool(self._matcher.is_terminated())


class ConstraintCompiler:
    """Compiles StructuredOutputs for one tokenizer; compiled grammars are cached by content."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=True, cache_limit_bytes=_CACHE_BYTES)
        self._vocab_size = vocab_size

    def compile(self, spec: StructuredOutput, param: str = "structured_output") -> Constraint:
        """Raises InvalidRequest (400) naming `param` when the schema, regex or grammar is not
        one xgrammar can compile. Slow for large schemas on first sight: call off the loop."""
        try:
            return Constraint(self._compile(spec), self._vocab_size)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"{_kind(spec)} cannot be compiled: {_reason(exc)}", param=param) from None

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        c = self._compiler
        # Compact JSON (OpenAI's own output style): a grammar that admits any whitespace lets a
        # weak model spend its whole budget on spaces between tokens of a valid object.
        if spec.json_schema is not None:
            return c.compile_grammar(_json_grammar(json.dumps(spec.json_schema), strict=True))
        if spec.json_object:
            return c.compile_grammar(_json_grammar('{"type": "object"}', strict=False))
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(choice) for choice in spec.choice))
        assert spec.grammar is not None
        return c.compile_grammar(spec.grammar)


# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (maxLength, minLength) as
# any character but quote, backslash, CR and LF: that admits the raw control characters JSON
# forbids inside strings (a random model emits them, and json.loads refuses the answer). Its
# unbounded strings exclude the whole range 0x00-0x1f, as the bounded ones get here.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


@functools.lru_cache(maxsize=256)
def _json_grammar(schema: str, strict: bool) -> str:
    """The EBNF of a JSON schema (compact, see ConstraintCompiler._compile), strings as JSON has them."""
    ebnf = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _kind(spec: StructuredOutput) -> str:
    for name in ("json_schema", "regex", "choice", "grammar"):
        if getattr(spec, name) is not None:
            return name
    return "json_object"


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ("[04:01:40] /project/cpp/x.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip()).splitlines()[0]
