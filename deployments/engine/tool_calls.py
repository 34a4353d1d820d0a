"""Tool calls: the constraint a required or named tool_choice puts on the answer, and the calls
read back out of the model's text in its checkpoint's own format.

`tool_choice: "required"` constrains the answer to a JSON array of `{"name", "parameters"}`
objects, one schema per offered function (vLLM's shape), and a named function to that
function's arguments object, so the arguments validate even on a random-weight model. With
`"auto"` the model writes calls in the format its chat template taught it: Hermes/Qwen
`<tool_call>{...}</tool_call>`, Llama 3's bare `{"name", "parameters"}` JSON, or Mistral's
`[TOOL_CALLS][...]` array; the format is read off the chat template, or set in the config
(`tool_call_parser`). An answer that offers tools is held back until it ends, then sent as its
calls (finish_reason "tool_calls") or, when it made none, as its text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from deployments.tools import Tool, ToolCall
from deployments.types import GenerateChunk, GenerateRequest, StructuredOutput

ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


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
    """(what the model said besides the calls, the calls) of a finished answer; no calls when
    it made none, or none the offered tools name."""
    choice, names = request.tool_choice, {t.function.name for t in request.tools or []}
    if choice not in (None, "auto", "none", "required"):  # named: the whole answer is the arguments
        parsed = _json(text)
        return ("", [ToolCall.of(choice.function.name, text)]) if isinstance(parsed, dict) else (text, [])  # type: ignore[union-attr]
    if choice == "required":
        parsed = _json(text)
        items = parsed if isinstance(parsed, list) else []
        return "", [
            ToolCall.of(c["name"], c.get("parameters", {})) for c in items if isinstance(c, dict) and c.get("name") in names
        ]
    content, raw = _split(text, fmt)
    calls = [
        ToolCall.of(c["name"], c.get("arguments", c.get("parameters", {})))
        for c in raw
        if isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments", c.get("parameters", {})), dict | str)
    ]
    return (content if calls else text), calls


def _split(text: str, fmt: ToolCallFormat) -> tuple[str, list[Any]]:
    """(content, raw call objects) in a format; the content is the text before the calls."""
    if fmt == "hermes":
        found = [_json(m) for m in _HERMES.findall(text)]
        return text.split("<tool_call>", 1)[0].strip(), [c for c in found if c is not None]
    if fmt == "mistral":  # [TOOL_CALLS] is a special token: decoded without it, the array remains
        head, marker, tail = text.partition("[TOOL_CALLS]")
        body = tail if marker else text
        start = body.find("[")
        parsed = _json(body[start:]) if start >= 0 else None
        return (head if marker else body[:start]).strip(), parsed if isinstance(parsed, list) else []
    body = text.replace("<|python_tag|>", "").strip()  # llama3_json: {"name": ..., "parameters": ...}; ...
    parts = [_json(p) for p in body.split(";")] if body.startswith("{") else []
    return "", [p for p in parts if p is not None] if all(p is not None for p in parts) else []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


async def with_tool_calls(
    chunks: AsyncIterator[GenerateChunk], request: GenerateRequest, fmt: ToolCallFormat
) -> AsyncIterator[GenerateChunk]:
    """Each output held back until it ends, then sent as one chunk: its calls (finish_reason
    "tool_calls") or its text. Chunks before any output's tokens (the prompt's) pass through."""
    held: dict[int, list[GenerateChunk]] = {}
    async for chunk in chunks:
        if chunk.finish_reason is None:
            if chunk.token_ids or chunk.text:
                held.setdefault(chunk.index, []).append(chunk)
            else:
                yield chunk
            continue
        parts = [*held.pop(chunk.index, []), chunk]
        text = "".join(p.text for p in parts)
        content, calls = parse_tool_calls(request, text, fmt) if chunk.finish_reason == "stop" else (text, [])
        logprobs = [lp for p in parts for lp in p.logprobs or []] if chunk.logprobs is not None else None
        yield chunk.model_copy(
            update={
                "text": content,
                "token_ids": [t for p in parts for t in p.token_ids],
                "logprobs": logprobs,
                "tool_calls": calls or None,
                "finish_reason": "tool_calls" if calls else chunk.finish_reason,
            }
        )


def tools_for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]
