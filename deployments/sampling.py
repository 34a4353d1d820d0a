"""A request's sampling fields, declared once: type, bound, default and meaning.

`SamplingParams` is the base of the Python handle's `GenerateRequest` and of the OpenAI bodies
(completions and chat), so a new field is added here and nowhere else; a route that takes only
some of them (the Responses API, TF-Serving's `parameters`) declares those with the same types
below, which carry the bounds. Defaults resolve once, in `with_defaults`: what the request set,
else the served checkpoint's generation_config.json (`SamplingDefaults`), else OpenAI's neutral
values; `sampling_spec` then turns the resolved request into what the model side samples with.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from parallel.runner import SamplingSpec


def _none_is_zero(v: Any) -> Any:
    return 0.0 if v is None else v


def _none_is_empty(v: Any) -> Any:
    return [] if v is None else v  # a new list each time: never one shared by every request


def check_logit_bias(bias: dict[int, float] | None) -> dict[int, float] | None:
    """OpenAI's range for each bias; an empty map is no bias."""
    if bias and any(not -100.0 <= b <= 100.0 for b in bias.values()):
        raise ValueError("logit_bias values must be between -100 and 100")
    return bias or None


def _stop_list(v: Any) -> Any:
    """OpenAI takes one stop string or a list; null is none."""
    return [] if v is None else [v] if isinstance(v, str) else v


def _no_empty_stop(v: list[str]) -> list[str]:
    if any(not s for s in v):
        raise ValueError("stop strings must not be empty")
    return v


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=2.0)]
Penalty = Annotated[float, BeforeValidator(_none_is_zero), Field(ge=-2.0, le=2.0)]
"""OpenAI's presence and frequency penalties (null: 0)."""
LogitBias = Annotated[dict[int, float] | None, AfterValidator(check_logit_bias)]
TokenIds = Annotated[list[int], BeforeValidator(_none_is_empty)]
StopStrings = Annotated[list[str], BeforeValidator(_stop_list), AfterValidator(_no_empty_stop)]
Logprobs = Annotated[int, Field(ge=0, le=20)]
"""Alternatives reported with each token's log-probability (vLLM allows 20; OpenAI 5)."""
MaxTokens = Annotated[int, Field(ge=1)]

DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The fields a checkpoint's generation_config.json may set a default for (vLLM reads the same)."""


class SamplingDefaults(BaseModel):
    """What a request that leaves a sampling field out gets: the served checkpoint's
    generation_config.json values where it sets them (unless `generation_config: ignore`),
    OpenAI's neutral values otherwise. Reported on the model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    max_tokens: MaxTokens | None = None
    """generation_config's `max_new_tokens`: the cap on a request that sets no max_tokens."""

    @classmethod
    def from_generation_config(cls, fields: dict[str, Any]) -> SamplingDefaults:
        """The values generation_config.json sets (vLLM reads the same ones, and like vLLM this
        ignores `do_sample`: a checkpoint that names a temperature is sampled with it)."""
        named = {k: fields[k] for k in DEFAULTED if fields.get(k) is not None}
        if fields.get("max_new_tokens"):
            named["max_tokens"] = fields["max_new_tokens"]
        return cls.model_validate(named)


class SamplingParams(BaseModel):
    """How to pick each token. A field of DEFAULTED left None takes the model's default."""

    temperature: Temperature | None = None
    """0 is greedy."""
    top_p: TopP | None = None
    """Sample from the smallest set of tokens whose probabilities reach top_p."""
    top_k: TopK | None = None
    """Sample from the k most likely tokens; 0 or -1: no top-k truncation (vLLM's)."""
    min_p: MinP | None = None
    """Drop tokens less likely than min_p times the most likely one (vLLM's)."""
    repetition_penalty: RepetitionPenalty | None = None
    """Above 1 discourages tokens already in the prompt or output (transformers' semantics)."""
    presence_penalty: Penalty = 0.0
    """Subtracted from the logit of every token already in the output (OpenAI's semantics)."""
    frequency_penalty: Penalty = 0.0
    """Subtracted from a token's logit once for each time it is already in the output."""
    logit_bias: LogitBias = None
    """Token id -> bias in [-100, 100] added to its logit at every step (greedy choices too);
    -100 bans a token, +100 all but forces it. JSON's string keys are token ids."""
    min_tokens: int = Field(default=0, ge=0)
    """EOS and `stop_token_ids` cannot end the output before this many tokens (vLLM's)."""
    stop_token_ids: TokenIds = Field(default_factory=list)
    """Token ids that end the output like EOS, even with ignore_eos (vLLM's)."""
    stop: StopStrings = Field(default_factory=list)
    """Generation ends before the first occurrence of any of these strings (one string or a list)."""
    seed: int | None = None
    """Makes sampled output reproducible."""
    ignore_eos: bool = False
    """Generate past EOS until max_tokens (vLLM's; benchmarks use it)."""
    n: int = Field(default=1, ge=1)
    """Outputs to generate for the prompt."""
    prompt_logprobs: Logprobs | None = None
    """Return each prompt token's log-probability and this many top alternatives (vLLM's); its
    prompt is computed, not taken from the prefix cache."""

    def sampling_fields(self) -> dict[str, Any]:
        """Every field declared here, as set: what a route hands on to a GenerateRequest."""
        return {name: getattr(self, name) for name in SamplingParams.model_fields}

    def with_defaults(self, defaults: SamplingDefaults) -> Self:
        """This request with every field of DEFAULTED it left out set from `defaults`: what the
        engine runs, and what the result cache keys on (its answer depends on them)."""
        unset = {k: getattr(defaults, k) for k in DEFAULTED if getattr(self, k) is None}
        return self.model_copy(update=unset) if unset else self

    def sampling_spec(self, logprobs: int | None) -> SamplingSpec:
        """What the model side samples with; the defaults must be resolved (`with_defaults`)."""
        resolved = {k: getattr(self, k) for k in DEFAULTED}
        if None in resolved.values():
            raise ValueError(f"resolve the sampling defaults first: {[k for k, v in resolved.items() if v is None]} unset")
        return SamplingSpec(
            **{**resolved, "top_k": max(resolved["top_k"], 0)},
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            logprobs=logprobs,
        )
