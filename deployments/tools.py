"""Function tools as OpenAI's chat API spells them: what a request offers the model, and the
calls an answer makes. Plain data; how calls are constrained and parsed is in
deployments/replica/tool_calls.py."""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object (None: no arguments)."""
    strict: bool | None = None  # the schema is enforced when the call is required either way

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("function names are 1-64 letters, digits, underscores or dashes")
        return v

    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters else {"type": "object", "properties": {}}


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call exactly this one."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(BaseModel):
    name: str
    arguments: str
    """The arguments object as JSON text (as OpenAI returns it)."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    id: str = Field(default_factory=new_call_id)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolCallDelta(BaseModel):
    """A piece of a call as it streams: the first piece of call `index` carries its id and
    name, every piece extends its arguments text (OpenAI's chunk shape)."""

    index: int
    """The call's position among the output's calls."""
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    @classmethod
    def whole(cls, index: int, call: ToolCall) -> ToolCallDelta:
        return cls(index=index, id=call.id, name=call.function.name, arguments=call.function.arguments)

    def openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


def merged(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls a stream of deltas makes."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        if d.id is not None:
            calls[d.index] = ToolCall(id=d.id, function=ToolCallFunction(name=d.name or "", arguments=d.arguments))
        else:
            calls[d.index].function.arguments += d.arguments
    return [calls[i] for i in sorted(calls)]
