"""OpenAI request bodies, validated by pydantic, and their translation into GenerateRequest."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deployments.sampling import Logprobs, MaxTokens, SamplingParams
from deployments.tools import Tool, ToolChoice
from deployments.types import ChatMessage, GenerateRequest, StructuredOutput, TokenizeRequest


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(BaseModel):
    """OpenAI's response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self

    def to_structured_output(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        assert self.json_schema is not None and self.json_schema.schema_ is not None
        return StructuredOutput(json_schema=self.json_schema.schema_)


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @field_validator("json_", mode="before")
    @classmethod
    def _schema_text(cls, v: Any) -> Any:
        """vLLM takes the schema as an object or as its JSON text."""
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON schema: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        self.to_structured_output()
        return self

    def to_structured_output(self) -> StructuredOutput:
        return StructuredOutput(
            json_schema=self.json_, json_object=bool(self.json_object), regex=self.regex, choice=self.choice, grammar=self.grammar
        )


# Fields of OpenAI's API (and vLLM's extensions) that would change the answer and that this
# server does not honour yet, with the values that ask for nothing (what SDKs send by default).
# Any other value is a 400 naming the field: a 200 that ignored it would pass for an answer.
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none", "auto"),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "best_of": (1,),
    "suffix": ("",),
}


class _Common(SamplingParams):
    """What completions and chat share: the sampling fields (`SamplingParams`, left-out ones
    taking the model's defaults, as in vLLM), streaming, the result cache, structured output."""

    # Fields outside OpenAI's API are ignored, as OpenAI and vLLM do; the API's own fields that
    # are not honoured are refused (UNHONOURED), never dropped in silence.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache: bool = True  # extension: false keeps this request out of the result cache
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (one of them per request).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None  # checked as structured_outputs' json
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Declared only to be refused when they ask for something (see UNHONOURED).
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    store: Any = None
    service_tier: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*UNHONOURED)
    @classmethod
    def _not_honoured(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v not in UNHONOURED[info.field_name]:  # type: ignore[index]
            raise ValueError("this server does not support this field yet; leave it out")
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> _Common:
        self.structured_output()  # raises for a malformed or doubled constraint
        return self

    def structured_output(self) -> StructuredOutput | None:
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        legacy = {k: v for k, v in guided.items() if v is not None}
        given = [
            c
            for c in (
                self.response_format.to_structured_output() if self.response_format else None,
                self.structured_outputs.to_structured_output() if self.structured_outputs else None,
                StructuredOutputs.model_validate(legacy).to_structured_output() if legacy else None,
            )
            if c is not None
        ]
        if len(given) > 1:
            raise ValueError("give one of response_format, structured_outputs, guided_* (one constraint per request)")
        return given[0] if given else None

    def generate_fields(self) -> dict[str, Any]:
        """What a GenerateRequest takes from this body besides the prompt and the lengths."""
        return {**self.sampling_fields(), "cache": self.cache, "structured_output": self.structured_output()}


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens | None = 16
    echo: bool = False
    logprobs: Logprobs | None = None

    def to_generate_requests(self) -> list[GenerateRequest]:
        """One GenerateRequest per prompt (a list of strings or of token lists is a batch)."""
        prompts: list[str | list[int]]
        if isinstance(self.prompt, str):
            prompts = [self.prompt]
        elif self.prompt and all(isinstance(p, int) for p in self.prompt):
            prompts = [list(self.prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(self.prompt)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompt must not be empty")
        common = {**self.generate_fields(), "max_tokens": self.max_tokens, "echo": self.echo, "logprobs": self.logprobs}
        return [
            GenerateRequest(prompt=p, **common) if isinstance(p, str) else GenerateRequest(prompt_token_ids=p, **common)
            for p in prompts
        ]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None

    @model_validator(mode="after")
    def _prompt_logprobs_whole_only(self) -> ChatCompletionRequest:
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not supported with stream on chat completions (as in vLLM)")
        return self

    def to_generate_request(self) -> GenerateRequest:
        return GenerateRequest(
            messages=self.messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            tools=self.tools or None,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            **self.generate_fields(),
        )


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a completion's `prompt` or a chat's `messages`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    tools: list[Tool] | None = None

    def to_request(self) -> TokenizeRequest:
        return TokenizeRequest(
            prompt=self.prompt, messages=self.messages, add_special_tokens=self.add_special_tokens, tools=self.tools
        )


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class EmbeddingsBody(BaseModel):
    """OpenAI's /v1/embeddings."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """One text or token list per embedding (a flat list of ints is one input)."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(x, int) for x in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]
