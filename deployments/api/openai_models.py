"""OpenAI request bodies, validated by pydantic, and their translation into GenerateRequest."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.types import ChatMessage, GenerateRequest, TokenizeRequest, check_logit_bias


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of OpenAI's API (and vLLM's extensions) that would change the answer and that this
# server does not honour yet, with the values that ask for nothing (what SDKs send by default).
# Any other value is a 400 naming the field: a 200 that ignored it would pass for an answer.
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "prompt_logprobs": (),
    "structured_outputs": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "best_of": (1,),
    "suffix": ("",),
}


class _Common(BaseModel):
    # Fields outside OpenAI's API are ignored, as OpenAI and vLLM do; the API's own fields that
    # are not honoured are refused (UNHONOURED), never dropped in silence.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # Sampling fields left out take the model's defaults (its generation_config.json), as in vLLM.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension, as are min_p and repetition_penalty
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # JSON's string keys are token ids
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension, as is stop_token_ids
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    cache: bool = True  # extension: false keeps this request out of the result cache
    # Declared only to be refused when they ask for something (see UNHONOURED).
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_logprobs: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*UNHONOURED)
    @classmethod
    def _not_honoured(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v not in UNHONOURED[info.field_name]:  # type: ignore[index]
            raise ValueError("this server does not support this field yet; leave it out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        return check_logit_bias(v)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if (isinstance(v, list) and any(not s for s in v)) or v == "":
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_fields(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self.logit_bias,
            "min_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids or [],
            "seed": self.seed,
            "stop": self.stop_list(),
            "n": self.n,
            "ignore_eos": self.ignore_eos,
            "cache": self.cache,
        }


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM allows 20 alternatives (OpenAI 5)

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo (the prompt tokens' logprobs) is not supported yet; use one or the other")
        return v

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
        common = {**self.sampling_fields(), "max_tokens": self.max_tokens, "echo": self.echo, "logprobs": self.logprobs}
        return [
            GenerateRequest(prompt=p, **common) if isinstance(p, str) else GenerateRequest(prompt_token_ids=p, **common)
            for p in prompts
        ]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def to_generate_request(self) -> GenerateRequest:
        return GenerateRequest(
            messages=self.messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **self.sampling_fields(),
        )


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a completion's `prompt` or a chat's `messages`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    def to_request(self) -> TokenizeRequest:
        return TokenizeRequest(prompt=self.prompt, messages=self.messages, add_special_tokens=self.add_special_tokens)


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
