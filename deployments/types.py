"""Typed requests and responses of the Python handle API (and the engine's output).

`await handle.generate.remote(GenerateRequest(...))` returns a GenerateResponse;
`handle.options(stream=True).generate_stream.remote(...)` yields GenerateChunk objects. The HTTP
routes translate OpenAI and TF-Serving bodies into these, so both paths run the same code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.sampling import Logprobs, MaxTokens, SamplingDefaults, SamplingParams
from deployments.tools import Tool, ToolCall, ToolCallDelta, ToolChoice

FinishReason = Literal["stop", "length", "tool_calls"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """Plain text of the message; OpenAI content parts of type `text` are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class StructuredOutput(BaseModel):
    """A constraint every output must satisfy, enforced token by token while sampling (a
    grammar masks each step's logits), so that even a weak model's answer parses. Exactly one
    field is set. OpenAI's `response_format` and vLLM's `structured_outputs` map onto it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    """A JSON schema the output validates against (objects take no properties it does not
    name unless it allows them, as OpenAI's strict mode)."""
    json_object: bool = False
    """Any JSON object."""
    regex: str | None = None
    """A regular expression the whole output matches."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect, GBNF-like, rule `root` first) the output derives."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        given = [self.json_schema is not None, self.json_object, self.regex is not None, self.choice is not None]
        if sum([*given, self.grammar is not None]) != 1:
            raise ValueError("give exactly one of json_schema, json_object, regex, choice, grammar")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return self


class GenerateRequest(SamplingParams):
    """One prompt (text, token ids, or chat messages) and how to continue it (the sampling
    fields are `SamplingParams`'). A sampling field left None takes the model's default (its
    generation_config.json, as vLLM does), see `ModelCard.sampling_defaults`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    """Text to continue."""
    prompt_token_ids: list[int] | None = None
    """Token ids to continue, instead of `prompt`."""
    messages: list[ChatMessage] | None = None
    """Chat turns, rendered through the model's chat template, instead of `prompt`."""
    max_tokens: MaxTokens | None = None
    """Most tokens to generate; None: up to the end of the context window."""
    logprobs: Logprobs | None = None
    """Return the sampled token's log-probability and this many top alternatives; with `echo`
    the prompt tokens' too (the first has none), as OpenAI's completions do."""
    echo: bool = False
    """Prepend the prompt to the returned text."""
    structured_output: StructuredOutput | None = None
    """Constrain every output to a JSON schema, a regex, a choice or a grammar."""
    tools: list[Tool] | None = None
    """Functions the model may call (chat only): offered through the chat template, the calls
    parsed from the answer into `CompletionOutput.tool_calls`."""
    tool_choice: ToolChoice | None = None
    """"auto" (the default with tools): the model decides; "none": no calls; "required" or a
    named function: the answer is calls, their arguments valid against the schemas (enforced
    by structured output)."""
    parallel_tool_calls: bool = True
    """With "required": more than one call allowed."""
    tenant: str | None = None
    """Set by the ingress from the caller's API key; result-cache entries are partitioned by it."""
    cache: bool = True
    """False: neither answered from nor stored in the result cache (the HTTP routes set it from
    a `cache: false` body field or a `Cache-Control: no-cache`/`no-store` header)."""

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids, messages")
        return self

    @model_validator(mode="after")
    def _tools_fit(self) -> GenerateRequest:
        choice, names = self.tool_choice, [t.function.name for t in self.tools or []]
        if self.tools and self.messages is None:
            raise ValueError("tools need messages (chat): the chat template offers them to the model")
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice required or a named function needs tools")
        if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}")
        if self.calls_tools and choice not in (None, "auto") and self.structured_output is not None:
            raise ValueError("a required or named tool_choice is itself a constraint: leave out the structured output")
        if len(set(names)) != len(names):
            raise ValueError("tools must have unique names")
        return self

    @property
    def calls_tools(self) -> bool:
        """Tools are offered and may be called (tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def prompt_top_logprobs(self) -> int | None:
        """Alternatives each prompt token's logprob comes with, or None: the prompt is not
        scored (it is for `prompt_logprobs`, and for `logprobs` with `echo`)."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @property
    def reproducible(self) -> bool:
        """Greedy, or sampled with a seed: the same request gives the same answer (only
        meaningful once `with_defaults` has set the temperature)."""
        return self.temperature == 0 or self.seed is not None


class TokenizeRequest(BaseModel):
    """Text or chat turns to tokenize exactly as a generation request would be."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    """Rendered through the model's chat template first, as for chat completions."""
    add_special_tokens: bool = True
    """For `prompt`: the tokenizer's BOS and the like, as a completion's prompt gets them."""
    tools: list[Tool] | None = None
    """With `messages`: offered through the template, as a chat request's tools are."""

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt, messages")
        if self.tools and self.messages is None:
            raise ValueError("tools need messages")
        return self


class EmbedRequest(BaseModel):
    """Texts (or token id lists) to embed: each is one prefill through the engine, batched with
    whatever else runs, its last token's final hidden state L2-normalised (last-token pooling,
    as vLLM pools a generative model)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] | list[list[int]] = Field(min_length=1)
    dimensions: int | None = Field(default=None, ge=1)
    """Keep the first this many components (then normalise), as OpenAI's `dimensions` does."""
    tenant: str | None = None
    """Set by the ingress from the caller's API key: its prefix-cache blocks are its own."""


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    prompt_tokens: int
    """Tokens read, all inputs together."""


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class TokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float | None
    """None for a prompt's first token: nothing predicts it."""
    top_logprobs: list[tuple[str, float]] = Field(default_factory=list)
    rank: int | None = None
    """Its place in the model's distribution (1: the most likely); for prompt tokens."""
    top_token_ids: list[int] | None = None
    """The ids of `top_logprobs`, for prompt tokens (vLLM keys its prompt logprobs by id)."""


class CompletionOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """With `GenerateRequest.prompt_logprobs`: one per prompt token."""
    tool_calls: list[ToolCall] | None = None
    """The calls the answer makes (finish_reason "tool_calls"); `text` is then what the model
    said besides them."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    request_id: str
    model: str
    created: int
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    usage: Usage
    cached: bool = False
    """Answered from the result cache."""
    model_fingerprint: str | None = None
    """The fingerprint of the checkpoint that generated it (`ModelCard.fingerprint`)."""


class GenerateChunk(BaseModel):
    """A piece of one output of a streamed generation; the last piece has finish_reason set."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """On an output's first chunk, with `GenerateRequest.prompt_logprobs`: one per prompt token."""
    tool_calls: list[ToolCallDelta] | None = None
    """Calls as they are written: a call's first delta carries its id and name, each delta
    extends its arguments (`deployments.tools.merged` makes the whole calls)."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far for this output."""
    cached: bool = False
    """Replayed from the result cache."""
    prompt: str | None = None
    """Set on the first chunk of a stream only: the prompt as the model read it."""
    prompt_token_ids: list[int] | None = None
    """Set on the first chunk of a stream only."""
    model_fingerprint: str | None = None
    """Set on the first chunk of a stream only: the checkpoint generating it."""


class ModelCard(BaseModel):
    """What a replica serves; backs /v1/models and the TF-Serving status routes."""

    name: str
    version: int
    source: str
    max_model_len: int
    vocab_size: int
    num_parameters: int
    dtype: str
    created: int
    weight_bytes: int | None = None
    """Memory the weights take in the replica (int8 versions: about a quarter of float32)."""
    model_window: int | None = None
    """The model's own context window; `max_model_len` is less when the KV pool holds less."""
    kv_cache_tokens: int | None = None
    """Tokens the KV pool holds, all sequences together."""
    eos_token_ids: list[int] = Field(default_factory=list)
    """Every id that ends a generation (config.json, generation_config.json, the tokenizer's)."""
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    quality: dict[str, Any] | None = None
    """Held-out loss and perplexity from the model's training.json (the built-in doc-llama)."""
    fingerprint: str = ""
    """Identity of the weights served (source, revision, dtype, weight files): result-cache
    entries of another checkpoint under the same name and version never match."""
    attention_backend: str = ""
    """The paged attention in use (`cpu_paged`, or `gather_sdpa` where the CPU kernel does not
    apply or could not be built): what `attention_backend: auto` became on this replica."""
    fused_ops: bool = False
    """Whether the layers run the fused CPU kernels (`cpu_fused_ops`), or eager torch ops."""


class EngineStats(BaseModel):
    """A replica engine's load, for monitoring and tests."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    generation_tokens: int
    host_cache_hit_tokens: float = 0
    """Prompt tokens copied back from the replica's host tier instead of computed."""
    host_cache_offloads: float = 0
    """Blocks evicted from the pool into the host tier."""
    kv_tier_lookups: float = 0
    """Prompts looked up in the cluster KV tier."""
    kv_tier_lookup_failures: float = 0
    """Lookups that timed out or found no store (the prompt was computed)."""
    kv_tier_hit_tokens: float = 0
    """Prompt tokens loaded from the cluster KV tier instead of computed."""
    kv_tier_loads: float = 0
    """Sequences that loaded chunks from the tier."""
    kv_tier_load_failures: float = 0
    """Chunks whose load failed (recomputed)."""
    kv_tier_load_seconds: float = 0
    """Time sequences waited for their loads, summed."""
    kv_tier_loaded_bytes: float = 0
    kv_tier_saves: float = 0
    """Chunks written to the tier."""
    kv_tier_saved_bytes: float = 0
