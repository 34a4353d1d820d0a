"""OpenAI request bodies, validated by pydantic, and their translation into GenerateRequest."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.types import ChatMessage, GenerateRequest


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do: SDKs send fields we do not use.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # Sampling fields left out take the model's defaults (its generation_config.json), as in vLLM.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension, as are min_p and repetition_penalty
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    cache: bool = True  # extension: false keeps this request out of the result cache

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
    logprobs: int | None = Field(default=None, ge=0)

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
    top_logprobs: int | None = Field(default=None, ge=0)

    def to_generate_request(self) -> GenerateRequest:
        return GenerateRequest(
            messages=self.messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **self.sampling_fields(),
        )
