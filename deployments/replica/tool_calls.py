"""Tool calls: the constraint a required or named tool_choice puts on the answer, and the calls
read back out of the model's text in its checkpoint's own format.

`tool_choice: "required"` constrains the answer to a JSON array of `{"name", "parameters"}`
objects, one schema per offered function (vLLM's shape), and a named function to that
function's arguments object, so the arguments validate even on a random-weight model. With
`"auto"` the model writes calls in the format its chat template taught it: Hermes/Qwen
`<tool_call>{...}</tool_call>`, Llama 3's bare `{"name", "parameters"}` JSON, or Mistral's
`[TOOL_CALLS][...]` array; the format is read off the chat template, or set in the config
(`tool_call_parser`). Calls stream as the model writes them: a call is announced once its name
is written, then its arguments follow piece by piece (OpenAI's and vLLM's deltas); what the
model says before its first call streams as content.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from deployments.tools import NamedToolChoice, ToolCall, ToolCallDelta, merged, new_call_id
from deployments.types import GenerateChunk, GenerateRequest, StructuredOutput

ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]


def format_of(chat_template: str | None) -> ToolCallFormat:
    """The tool-call format a chat template teaches its model (Hermes when it names none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def tool_constraint(request: GenerateRequest) -> StructuredOutput | None:
    """The structured output a required or named tool_choice stands for (None otherwise)."""
    choice, tools = request.tool_choice, request.tools or []
    if not request.calls_tools or choice in (None, "auto"):
        return None
    if choice != "required":
        [named] = [t for t in tools if t.function.name == choice.function.name]  # type: ignore[union-attr]
        return StructuredOutput(json_schema=named.function.arguments_schema())
    calls = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": t.function.arguments_schema()},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "items": calls, "minItems": 1}
    if not request.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutput(json_schema=schema)


def parse_tool_calls(request: GenerateRequest, text: str, fmt: ToolCallFormat) -> tuple[str, list[ToolCall]]:
    """(what the model said besides the calls, the calls) of a whole answer: the text when it
    made no call the offered tools name."""
    stream = ToolCallStream(request, fmt)
    content, deltas = stream.feed(text)
    rest, more = stream.finish()
    return content + rest, merged([*deltas, *more])


_ARGUMENTS = ("arguments", "parameters")


@dataclass
class _Call:
    """A call object found in the text: where its arguments are, and how much of them was sent."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_string: str | None = None
    """Arguments given as a JSON string (sent whole once it closes)."""
    closed: bool = False
    index: int | None = None
    """The call's position among the output's calls, once announced."""
    sent: int = 0
    done: bool = False

    def pending(self, text: str) -> str:
        """The arguments text not sent yet (an object's text as far as it is written)."""
        if self.done:
            return ""
        if self.args_string is not None:
            self.done = True
            return self.args_string
        if self.args_start is not None:
            end = self.args_end if self.args_end is not None else len(text)
            piece = text[self.args_start + self.sent : end]
            self.sent += len(piece)
            self.done = self.args_end is not None
            return piece
        if self.closed:  # a call without arguments
            self.done = True
            return "{}"
        return ""


class _CallScanner:
    """Reads JSON as it is written and finds the `{"name": ..., "arguments"|"parameters": ...}`
    objects in it at `depth` (1: bare objects one after another, 2: objects in an array), so
    that a call's arguments can be sent while the model is still writing them. Text that is
    not JSON is read past without error: nothing in it is a call."""

    def __init__(self, start: int, depth: int, single: bool) -> None:
        self.pos, self.depth, self.single = start, depth, single
        self.stack: list[str] = []
        self.calls: list[_Call] = []
        self.in_string = self.escaped = self.in_call = self.value_open = False
        self.string_start = 0
        self.expect = "key"  # at the call object's own level: key, colon, value, next
        self.key: Any = None
        self.ended_at: int | None = None
        """Where the first complete top-level value ends."""

    def scan(self, text: str) -> None:
        for i in range(self.pos, len(text)):
            if self.single and self.ended_at is not None:
                break
            self._read(text, i)
        self.pos = len(text)

    def _read(self, text: str, i: int) -> None:
        c = text[i]
        at_call = self.in_call and len(self.stack) == self.depth
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if at_call:
                    self._string_at_call(_json(text[self.string_start : i + 1]))
            return
        if c == '"':
            self.in_string, self.string_start = True, i
        elif c in "{[":
            if at_call and self.expect == "value":
                if c == "{" and self.key in _ARGUMENTS:
                    self.calls[-1].args_start = i
                self.value_open, self.expect = True, "next"
            self.stack.append(c)
            if c == "{" and len(self.stack) == self.depth and (self.depth == 1 or self.stack[0] == "["):
                self.calls.append(_Call())
                self.in_call, self.expect, self.key = True, "key", None
        elif c in "}]" and self.stack:
            before = len(self.stack)
            self.stack.pop()
            if self.in_call and before == self.depth + 1 and self.value_open:
                self.value_open = False
                call = self.calls[-1]
                if call.args_start is not None and call.args_end is None:
                    call.args_end = i + 1
            elif self.in_call and before == self.depth:
                self.in_call, self.calls[-1].closed = False, True
            if not self.stack and self.ended_at is None:
                self.ended_at = i + 1
        elif at_call:
            if c == ":" and self.expect == "colon":
                self.expect = "value"
            elif c == ",":
                self.expect = "key"
            elif self.expect == "value" and not c.isspace():
                self.expect = "next"  # a number or literal: no call field

    def _string_at_call(self, value: Any) -> None:
        if self.expect == "key":
            self.key, self.expect = value, "colon"
        elif self.expect == "value":
            call = self.calls[-1]
            if self.key == "name" and isinstance(value, str):
                call.name = value
            elif self.key in _ARGUMENTS and isinstance(value, str):
                call.args_string = value
            self.expect = "next"


_MARKERS: dict[ToolCallFormat, str] = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}


class ToolCallStream:
    """One output's text, as it grows, split into what the model says (content, sent as it
    comes) and the calls it makes (each announced with its id and name once the name is
    written, then its arguments piece by piece). Content ends where the first call starts;
    when the whole answer made no call the offered tools name, all of it is content."""

    def __init__(self, request: GenerateRequest, fmt: ToolCallFormat) -> None:
        choice = request.tool_choice
        self._named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self._names = {t.function.name for t in request.tools or []}
        self._parallel = request.parallel_tool_calls
        self._fmt = fmt
        self._text = ""
        self._sent = 0
        """Characters of the text sent as content."""
        self._looked = 0
        """Where the search for the next call region goes on from."""
        self._plain = False
        """Decided: the answer is text (a Llama 3 answer that does not open with a call)."""
        self._scanners: list[_CallScanner] = []
        self._scanning = False
        self._calls = 0
        self._required = choice == "required"
        if self._required:
            self._open(0, depth=2)

    @property
    def made_calls(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, call deltas) that the text so far adds."""
        self._text += text
        if self._named is not None:
            return "", self._named_delta(text)
        content = ""
        while True:
            if not self._scanning:
                found = self._next_region()
                if found is None:
                    if not self._scanners:
                        content += self._content_upto(self._safe_end())
                    break
                at, region, depth = found
                if not self._scanners:
                    content += self._content_upto(at)
                self._open(region, depth)
            scanner = self._scanners[-1]
            scanner.scan(self._text)
            if scanner.single and scanner.ended_at is not None:  # Hermes: look for the next <tool_call>
                self._scanning, self._looked = False, scanner.ended_at
                continue
            break
        return content, self._deltas()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left once the output ended: the held-back text when no call was made."""
        deltas = self._deltas()
        if self._calls:
            return "", deltas
        rest, self._sent = self._text[self._sent :], len(self._text)
        return rest, deltas

    def _next_region(self) -> tuple[int, int, int] | None:
        """(where content ends, where the call JSON starts, its depth) of the next call region
        from `_looked`, or None while there is none (yet)."""
        if self._plain:
            return None
        text, marker = self._text, _MARKERS[self._fmt]
        at = text.find(marker, self._looked)
        if at >= 0:
            return at, at + len(marker), 2 if self._fmt == "mistral" else 1
        if not self._at_opening() or self._undecided():
            return None
        opener = "[" if self._fmt == "mistral" else "{"
        if text[self._looked :].lstrip().startswith(opener):
            return text.index(opener), text.index(opener), 2 if self._fmt == "mistral" else 1
        self._plain = self._fmt == "llama3_json"  # a Llama 3 call opens the answer, or there is none
        return None

    def _safe_end(self) -> int:
        """How far the text can be sent as content: not a marker's beginning at its end, and
        nothing while the answer could still turn out to open with a call."""
        text, marker = self._text, _MARKERS[self._fmt]
        if self._at_opening() and self._undecided():
            return self._sent
        for keep in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)

    def _at_opening(self) -> bool:
        """Nothing but whitespace so far, in a format whose calls may open the answer without
        their marker (Llama 3's bare JSON, Mistral's array once decoding dropped [TOOL_CALLS])."""
        return (
            self._fmt != "hermes"
            and not self._plain
            and not self._scanners
            and not self._sent
            and not self._text[: self._looked].strip()
        )

    def _undecided(self) -> bool:
        """Only whitespace, or the marker's beginning, after `_looked` so far."""
        head = self._text[self._looked :].lstrip()
        return not head or _MARKERS[self._fmt].startswith(head)

    def _content_upto(self, end: int) -> str:
        """The unsent content before `end`, less trailing whitespace (held: it is dropped
        when a call follows)."""
        piece = self._text[self._sent : end]
        kept = piece.rstrip()
        self._sent += len(kept)
        self._looked = max(self._looked, self._sent)
        return kept

    def _deltas(self) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for call in (c for scanner in self._scanners for c in scanner.calls):
            if call.name is None or call.index == -1:
                continue
            if call.index is None:
                if call.name not in self._names or (self._calls and not self._parallel):
                    call.index = -1  # not a call of an offered tool: ignored
                    continue
                call.index, self._calls = self._calls, self._calls + 1
                out.append(ToolCallDelta(index=call.index, id=new_call_id(), name=call.name))
            piece = call.pending(self._text)
            if not piece:
                continue
            if out and out[-1].index == call.index:
                out[-1].arguments += piece
            else:
                out.append(ToolCallDelta(index=call.index, arguments=piece))
        return out

    def _open(self, start: int, depth: int) -> None:
        self._scanners.append(_CallScanner(start, depth, single=self._fmt == "hermes" and not self._required))
        self._scanning = True

    def _named_delta(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        if self._calls:
            return [ToolCallDelta(index=0, arguments=text)]
        self._calls = 1
        return [ToolCallDelta(index=0, id=new_call_id(), name=self._named, arguments=text)]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


async def with_tool_calls(
    chunks: AsyncIterator[GenerateChunk], request: GenerateRequest, fmt: ToolCallFormat
) -> AsyncIterator[GenerateChunk]:
    """Each chunk with its text split into content and call deltas (ToolCallStream); an output
    that made calls finishes with finish_reason "tool_calls" (or "length" when cut short, its
    last call's arguments then incomplete, as OpenAI's are)."""
    streams: dict[int, ToolCallStream] = {}
    async for chunk in chunks:
        if chunk.finish_reason is None and not (chunk.token_ids or chunk.text):
            yield chunk  # the prompt's chunk, before any output
            continue
        stream = streams.setdefault(chunk.index, ToolCallStream(request, fmt))
        content, deltas = stream.feed(chunk.text)
        update: dict[str, Any] = {}
        if chunk.finish_reason is not None:
            rest, more = stream.finish()
            content, deltas = content + rest, deltas + more
            if stream.made_calls and chunk.finish_reason == "stop":
                update["finish_reason"] = "tool_calls"
        yield chunk.model_copy(update={**update, "text": content, "tool_calls": deltas or None})
