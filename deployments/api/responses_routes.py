"""OpenAI's Responses API: POST /v1/responses, text in and out, whole or as its typed stream
of events (response.created ... response.output_text.delta ... response.completed).

A response is a chat generation: `instructions` become a system turn ahead of the `input` turns,
rendered through the model's chat template. Nothing is stored (there is no GET of a response), so
`store: true`, `previous_response_id` and `background` are refused, as is every field that would
change the answer and is not honoured (tools, reasoning, ...): a 400 naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.api.cache_control import mark_cache_status, with_cache_control
from deployments.api.http_errors import error_response, unwrap
from deployments.api.openai_routes import Backend, check_model
from deployments.errors import InvalidRequest
from deployments.sampling import MaxTokens, Temperature, TopP
from deployments.types import ChatMessage, GenerateRequest, StructuredOutput, Usage

# The values that ask for nothing; anything else is a 400 naming the field.
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "store": (False,),
    "previous_response_id": (),
    "background": (False,),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "reasoning": ({}, {"effort": None}),
    "include": ([],),
    "prompt": (),
    "conversation": (),
    "top_logprobs": (0,),
    "truncation": ("disabled",),
    "max_tool_calls": (),
}


class InputPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    """One turn of `input` (the easy form `{role, content}` or `type: "message"`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]

    def to_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    # The two sampling fields of OpenAI's Responses API, declared as everywhere (deployments.sampling).
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    text: TextOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    # Declared only to be refused when they ask for something (see UNHONOURED).
    store: Any = None
    previous_response_id: Any = None
    background: Any = None
    tools: Any = None
    tool_choice: Any = None
    reasoning: Any = None
    include: Any = None
    prompt: Any = None
    conversation: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    max_tool_calls: Any = None

    @field_validator(*UNHONOURED)
    @classmethod
    def _not_honoured(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v not in UNHONOURED[info.field_name]:  # type: ignore[index]
            raise ValueError("this server does not support this field yet (responses are not stored); leave it out")
        return v

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: str | list[InputMessage]) -> str | list[InputMessage]:
        if not v:
            raise ValueError("input must not be empty")
        return v

    def to_generate_request(self) -> GenerateRequest:
        turns = (
            [ChatMessage(role="user", content=self.input)] if isinstance(self.input, str) else [m.to_chat() for m in self.input]
        )
        if self.instructions:
            turns.insert(0, ChatMessage(role="system", content=self.instructions))
        return GenerateRequest(
            messages=turns,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            structured_output=self._structured_output(),
        )

    def _structured_output(self) -> StructuredOutput | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput(json_object=True)
        if fmt.schema_ is None:
            raise InvalidRequest("text.format of type json_schema needs a schema", param="text.format.schema")
        return StructuredOutput(json_schema=fmt.schema_)

    def echo_fields(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        fmt = self.text.format if self.text and self.text.format else TextFormat(type="text")
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "metadata": self.metadata or {},
            "user": self.user,
            "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
            "tool_choice": "none" if self.tool_choice == "none" else "auto",
            "tools": [],
            "store": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "truncation": "disabled",
        }


def register(app: FastAPI, backend: Backend) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request, response: Response):
        version = check_model(backend, body.model)
        [request] = with_cache_control([body.to_generate_request()], raw)
        ids = _Ids(f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time()))
        if not body.stream:
            try:
                answer = await backend.generate(request, version)
            except InvalidRequest as exc:
                raise _in_responses_terms(exc) from None
            mark_cache_status(response, [answer])
            out = answer.outputs[0]
            return response_object(body, ids, backend.model_name, out.text, out.finish_reason, answer.usage)
        stream = backend.generate_stream(request, version)
        try:
            first = await anext(stream, None)  # before the status line: a bad request is still a 4xx
        except InvalidRequest as exc:
            raise _in_responses_terms(exc) from None

        async def events() -> AsyncIterator[str]:
            numbered = _Events()
            try:
                begun = response_object(body, ids, backend.model_name, "", None, None)
                yield numbered("response.created", response=begun)
                yield numbered("response.in_progress", response=begun)
                item = {"type": "message", "id": ids.message, "status": "in_progress", "role": "assistant", "content": []}
                yield numbered("response.output_item.added", output_index=0, item=item)
                where = {"item_id": ids.message, "output_index": 0, "content_index": 0}
                yield numbered("response.content_part.added", **where, part=_text_part(""))
                text, finish, prompt_tokens, completion_tokens = [], None, 0, 0
                chunks = _chain(first, stream)
                async for chunk in chunks:
                    if chunk.text:
                        text.append(chunk.text)
                        yield numbered("response.output_text.delta", **where, delta=chunk.text, logprobs=[])
                    finish = chunk.finish_reason or finish
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                whole = "".join(text)
                yield numbered("response.output_text.done", **where, text=whole, logprobs=[])
                yield numbered("response.content_part.done", **where, part=_text_part(whole))
                done = response_object(body, ids, backend.model_name, whole, finish, _usage(prompt_tokens, completion_tokens))
                yield numbered("response.output_item.done", output_index=0, item=done["output"][0])
                yield numbered(f"response.{done['status']}", response=done)
            except Exception as exc:  # noqa: BLE001 - reported in-band, never a traceback
                error = error_response(raw, unwrap(exc)).body
                yield numbered.raw("error", error)

        return StreamingResponse(events(), media_type="text/event-stream")


_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "prompt": "input", "structured_output": "text.format"}


def _in_responses_terms(exc: InvalidRequest) -> InvalidRequest:
    """The generation's error naming this API's field (max_output_tokens, not max_tokens)."""
    return InvalidRequest(exc.message, param=_PARAMS.get(exc.param or "", exc.param), code=exc.code)


class _Ids:
    def __init__(self, response: str, message: str, created: int) -> None:
        self.response, self.message, self.created = response, message, created


class _Events:
    """Server-sent events of the Responses stream, each with its type and sequence number."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def raw(self, kind: str, body: bytes | memoryview) -> str:
        error = json.loads(bytes(body))["error"]
        return self(kind, code=error.get("code"), message=error["message"], param=error.get("param"))


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def response_object(
    body: ResponsesRequest, ids: _Ids, model: str, text: str, finish: str | None, usage: Usage | None
) -> dict[str, Any]:
    """The Response object: in progress (no finish yet), completed, or incomplete at the
    max_output_tokens limit."""
    status = "in_progress" if finish is None else ("incomplete" if finish == "length" else "completed")
    output = []
    if finish is not None:
        item_status = "incomplete" if status == "incomplete" else "completed"
        output = [
            {"type": "message", "id": ids.message, "status": item_status, "role": "assistant", "content": [_text_part(text)]}
        ]
    return {
        "id": ids.response,
        "object": "response",
        "created_at": ids.created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "usage": None
        if usage is None
        else {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        },
        **body.echo_fields(),
    }
