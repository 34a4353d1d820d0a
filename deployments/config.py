"""Everything shardserve adds to serve_config.yaml, under `applications[].args`.

Declared once, here. `build_app` validates the args with these models, so a typo or a bad value
fails `serve run` at once with the field's name. Autoscaling, replica resources and other
deployment options stay in the `deployments:` section, where Ray Serve validates them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.engine.scheduler import SchedulerSpec
from parallel.runner import KVCacheSpec, ModelSpec
from parallel.runners.placement import ParallelSpec


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, docstrings become the reference."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class EngineConfig(StrictModel):
    """Limits of the generation engine in one replica."""

    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    """Most sequences generated together in one step (the running batch)."""

    max_waiting_requests: int = Field(default=128, ge=0)
    """Bounded queue of sequences waiting for a batch slot; beyond it requests get 503 at once."""

    @property
    def replica_capacity(self) -> int:
        """Requests one replica holds at once: those it runs and those it queues."""
        return self.max_num_seqs + self.max_waiting_requests

    @property
    def router_queue_size(self) -> int:
        """Requests Serve's router may hold per caller when every replica is full. Only enough
        to refill the engine's queue as sequences finish (a few per step): a quarter batch."""
        return max(1, self.max_num_seqs // 4)

    max_num_batched_tokens: int = Field(default=512, ge=1)
    """Token budget of one step. Long prompts are prefilled in chunks of at most this many
    tokens, so that running decodes keep going while a long prompt is read."""

    block_size: int = Field(default=16, ge=1, le=1024)
    """Tokens per KV-cache block (the unit of allocation and of prefix sharing)."""

    kv_cache_blocks: int | None = Field(default=None, ge=1)
    """Size of the KV pool in blocks; None: sized by `kv_cache_memory_mb` or, without it, by
    `kv_cache_memory_fraction`."""

    kv_cache_memory_mb: int | None = Field(default=None, ge=1)
    """Memory given to the KV pool (to each rank's slice of it when sharded) when
    `kv_cache_blocks` is not set; None: `kv_cache_memory_fraction` of the free memory."""

    kv_cache_memory_fraction: float | None = Field(default=None, gt=0, le=0.95)
    """Share of the memory free once the weights are loaded that the KV pool takes when neither
    `kv_cache_blocks` nor `kv_cache_memory_mb` is set: host RAM on cpu (split among a replica's
    ranks on one node), on cuda the GPU memory a profiling forward of the largest step leaves
    (as vLLM's `gpu_memory_utilization`). None: 0.9 on cuda, 0.5 on cpu (host RAM is shared with
    every other process of the node). The pool never exceeds what `max_num_seqs` sequences of
    the whole context can use; the context served is the model's window, or what the pool holds
    for one sequence when that is less."""

    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a shared prompt prefix (system prompt, earlier chat turns)."""

    stream_interval_ms: float = Field(default=50.0, ge=0)
    """A streamed output sends its first token at once, then at most one chunk per this many
    milliseconds (carrying every token since the last). Fewer messages through Ray Serve leave
    the CPU to the model: a chunk took about 4 ms of CPU over the LLM server, ingress and proxy
    on the bench machine, whatever it carried. 50 is Ray Serve LLM's own stream batching
    interval; 0 sends every token on its own."""

    stream_chunks_per_s: float = Field(default=200.0, ge=0)
    """The replica's budget of streamed chunks per second, over all the outputs it is
    generating: with more running than `stream_interval_ms` lets through within it, each
    output's interval widens to (running outputs / this) seconds. A chunk costs CPU in every
    Ray Serve hop it crosses whatever it carries, taken from the cores the model runs on; with
    the budget that cost stays a fixed share as load grows (vLLM's engine likewise sends one
    message per step whatever the batch). The first chunk still goes at once. 0: no budget."""

    request_timeout_s: float = Field(default=300.0, gt=0)
    """A request still generating after this many seconds is ended with 504."""

    model_process: bool = True
    """Run a model of one rank (tensor and pipeline size 1) in a process of its own beside the
    replica, as vLLM runs its engine core: the replica's Python (streaming through Ray Serve,
    detokenizing, health checks) then never holds the GIL the model thread needs between its
    operators. False: the model runs on a thread of the replica's own process (one process
    fewer per replica). A sharded model always runs on its rank actors."""

    model_threads: int | None = Field(default=None, ge=1)
    """Torch threads of a one-rank model. None: the replica's CPUs (`ray_actor_options.num_cpus`
    in its deployment's section), at least one. Ranks of a sharded model use
    `parallel.cpus_per_rank`."""

    def scheduler_spec(self) -> SchedulerSpec:
        """The fields the engine reads, for LLMEngine."""
        return SchedulerSpec(
            self.max_num_seqs, self.max_waiting_requests, self.max_num_batched_tokens, self.enable_prefix_caching
        )


class KVTierConfig(StrictModel):
    """The cluster KV tier: chunks of prompt KV kept in shared memory by one store actor per
    node, outliving the replicas that computed them, loaded by any replica of the same model
    instead of recomputed (README "Caching")."""

    enabled: bool = True
    """Off: each replica's prefix cache is all there is (it dies with the replica)."""

    memory_mb: int | None = Field(default=None, ge=1)
    """The node store's budget; None: `memory_fraction` of the shared memory free when the
    store starts. The first replica on a node starts its store; later ones share it."""

    memory_fraction: float = Field(default=0.25, gt=0, le=0.9)
    """Share of the node's free shared memory (/dev/shm, RAM) the store takes when
    `memory_mb` is not set."""

    chunk_blocks: int = Field(default=8, ge=1, le=1024)
    """KV blocks per chunk, the tier's unit of storage and transfer (8 blocks of 16 tokens are
    2 MiB for shardserve/bench-llama: large enough that copies run at memory speed)."""

    min_sightings: int = Field(default=2, ge=1)
    """A chunk is stored once this many requests have asked for it (a prefix seen once is not
    worth the copy); 1 stores every prompt's chunks."""

    lookup_timeout_ms: float = Field(default=50.0, gt=0)
    """Most a request waits for the store's answer before computing its prompt anyway."""

    host_memory_mb: int | None = Field(default=None, ge=0)
    """The host tier in each replica, between its pool and the node store: blocks evicted from
    the pool are copied to this much host memory (each rank its shard) and copied back on a hit,
    in the same step. None: `host_memory_fraction` of the host memory free once the pool is
    allocated; 0: none."""

    host_memory_fraction: float = Field(default=0.05, ge=0, le=0.5)
    """Share of the free host memory the host tier takes when `host_memory_mb` is not set."""


class LimitsConfig(StrictModel):
    """Bounds on what one request may ask for; each violation is a 4xx naming the field."""

    max_request_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest HTTP body accepted; larger ones get 413 before they are parsed."""

    max_n: int = Field(default=8, ge=1)
    """Most completions per prompt (`n`)."""

    max_prompts: int = Field(default=32, ge=1)
    """Most prompts in one request (`prompt` as a list, TF-Serving `instances`)."""

    max_stop_sequences: int = Field(default=8, ge=0)
    """Most stop strings per request."""

    max_stop_chars: int = Field(default=256, ge=1)
    """Longest stop string, in characters (each is matched against every new token's text)."""

    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Most tokens in one prompt (after the chat template); None: the context window less one."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Largest `max_tokens` a request may ask for; None: what the context window leaves."""

    max_messages: int = Field(default=256, ge=1)
    """Most chat messages per request."""

    max_logprobs: int = Field(default=5, ge=0)
    """Most alternatives per token in `logprobs` / `top_logprobs`."""


class ResultCacheConfig(StrictModel):
    """The exact-result cache in front of the LLM server. Only reproducible answers are cached:
    greedy (temperature 0) or sampled with an explicit seed."""

    enabled: bool = True
    """Look requests up before generating and store reproducible answers."""

    url: str | None = None
    """None: an in-process cache per ingress replica. `redis://host:port/db`: one Redis shared by
    every ingress replica, surviving their restarts (bound its memory with Redis's own
    `maxmemory` and `maxmemory-policy allkeys-lru`)."""

    max_entries: int = Field(default=4096, ge=1)
    """Most answers held by the in-process cache; the least recently used go first."""

    max_bytes: int = Field(default=64 * 2**20, ge=1024)
    """Most bytes of answers held by the in-process cache; the least recently used go first."""

    max_entry_bytes: int = Field(default=1 * 2**20, ge=256)
    """Answers larger than this are not cached (either backend)."""

    ttl_s: float = Field(default=3600.0, gt=0)
    """An entry is served for at most this many seconds after it was stored."""

    redis_timeout_s: float = Field(default=0.05, gt=0)
    """A Redis call slower than this is given up: the request is served uncached, with a warning
    and `shardserve:result_cache_errors_total`, never failed."""

    @model_validator(mode="after")
    def _redis_url(self) -> ResultCacheConfig:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("cache.url must be a redis://, rediss:// or unix:// URL")
        return self


class ApiKeyConfig(StrictModel):
    """One API key, by its SHA-256 digest: the key itself never appears in a config file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the key: `python -c "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY`."""

    tenant: str = Field(min_length=1)
    """Who the key belongs to; result-cache entries are partitioned by it."""

    requests_per_s: float | None = Field(default=None, gt=0)
    """Sustained request rate allowed to this key (token bucket); beyond it 429 with Retry-After."""

    burst: int = Field(default=10, ge=1)
    """Requests this key may send at once above its rate."""

    max_concurrent: int | None = Field(default=None, ge=1)
    """Requests of this key in flight at once (a stream counts until it ends); beyond it 429."""


class AuthConfig(StrictModel):
    """API keys. With any key configured, every route but /health needs
    `Authorization: Bearer <key>` (401 otherwise)."""

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    """Keys given inline (digests only)."""

    api_keys_file: str | None = None
    """A JSON file with a list of keys in the same shape (e.g. a mounted Kubernetes secret);
    read by each ingress replica when it starts."""

    api_keys_env: str | None = None
    """The name of an environment variable holding that JSON list (set it in runtime_env)."""

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.api_keys_file or self.api_keys_env)


class ModelRepositoryConfig(StrictModel):
    """Serve versions from a TF-Serving-style repository, `<base_path>/<name>/<version>/`, as
    `shardserve compress` writes it. The newest served version is the default (its deployment
    is `LLMServer`, so the `deployments:` section's settings apply to it); every other served
    version gets its own deployment `LLMServer-v<N>`."""

    base_path: str
    """Directory holding `<name>/<version>/` model directories."""

    name: str
    """Model name in the repository; clients use it in URLs and `model` fields."""

    version_policy: Literal["latest", "all", "specific"] = "latest"
    """Which versions are served: the newest `latest_n`, every one, or those in `versions`."""

    latest_n: int = Field(default=1, ge=1)
    """With `version_policy: latest`: how many of the newest versions."""

    versions: list[int] = Field(default_factory=list)
    """With `version_policy: specific`: the versions to serve."""

    labels: dict[str, int] = Field(default_factory=dict)
    """Version labels (`stable: 1`, `canary: 2`) for `/v1/models/{name}/labels/{label}` routes;
    each must name a served version."""

    traffic: dict[int, float] | None = None
    """Canary split of the requests that name no version: weight per served version (`{1: 0.9,
    2: 0.1}`); None sends them all to the newest. Requests naming a version or label go there."""

    @model_validator(mode="after")
    def _traffic_weights(self) -> ModelRepositoryConfig:
        weights = list((self.traffic or {}).values())
        if self.traffic is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError("repository.traffic needs non-negative weights with a positive sum")
        return self


class ParallelConfig(StrictModel):
    """How the ranks of a sharded replica (tensor_parallel_size x pipeline_parallel_size > 1)
    are placed and supervised."""

    cpus_per_rank: float = Field(default=1.0, gt=0)
    """CPUs reserved for each rank actor (its torch threads)."""

    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] | None = None
    """Placement group strategy for a replica and its ranks; None: STRICT_PACK (one node) when
    pipeline_parallel_size is 1, PACK otherwise (pipeline stages may span nodes)."""

    micro_batches: int = Field(default=0, ge=0)
    """Micro-batches per step with pipeline parallelism, so that stages work at once;
    0: one per pipeline stage. 1 turns the overlap off."""

    step_timeout_s: float = Field(default=30.0, gt=0)
    """A step, or a collective inside it, that takes longer fails the in-flight requests and
    the replica (see `faults`): Ray Serve replaces it with a fresh group of ranks."""

    allow_pending_placement: bool = False
    """Deploy even when no node of the cluster as it is now can hold a replica and its ranks
    (or, unsharded on cuda, a replica and its GPU); set it on autoscaling clusters, where nodes
    join on demand. Otherwise building the app fails at once naming the missing resource
    instead of leaving the replica pending."""

    load_timeout_s: float = Field(default=300.0, gt=0)
    """Most time for placing, starting and loading the ranks; past it the replica fails to
    start with a message naming the missing resource."""


class FaultsConfig(StrictModel):
    """What a replica does when its model workers fail, and what the ingress does about it."""

    exit_grace_s: float = Field(default=1.0, ge=0)
    """After its runner fails (a rank died or hung), a replica refuses new requests (503,
    code `replica_failed`) and its process exits this long after, once the in-flight requests
    have their errors: Ray Serve then routes around it and replaces it at once, instead of
    after three failed health checks that would each let it fail more requests."""

    retries_on_replica_failure: int = Field(default=3, ge=0)
    """A request refused by a failed replica (nothing of it ran) is sent again up to this many
    times, 0.2 s, 0.4 s, ... apart, so that it reaches a healthy replica; one whose replica
    process died under it, before it produced any output, is sent again once (it may be what
    killed the replica). A stream that had started is never sent twice, nor a request in flight
    when its replica's ranks failed."""


class ShardserveArgs(StrictModel):
    """The `args:` of a shardserve application in serve_config.yaml."""

    model: str = "shardserve/doc-llama"
    """Built-in model name (`shardserve/doc-llama`, trained on the Python documentation and
    shipped in the repository; `shardserve/tiny-llama` and `shardserve/bench-llama`, random
    weights generated on first use, for tests and benchmarks), a local Hugging Face model
    directory, or a hub id. Weights are loaded from safetensors only."""

    served_model_name: str | None = None
    """Name clients use in `model` fields and URLs; defaults to the last part of `model`."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) when `model` is a hub id."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight and activation dtype. CPUs want float32; GPUs bfloat16."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Where the model runs."""

    attention_backend: Literal["auto", "cpu_paged", "gather_sdpa"] = "auto"
    """Paged attention of decode tokens. cpu_paged: shardserve's C kernel reading the KV blocks
    in place (CPU, float32; built with the machine's C compiler on first use and cached under
    `$SHARDSERVE_CACHE/kernels`). gather_sdpa: each sequence's blocks gathered, then torch's
    scaled_dot_product_attention (any device and dtype). auto: cpu_paged where it applies and
    builds, else gather_sdpa."""

    cpu_fused_ops: bool = True
    """Run each layer's norms and residual adds, rotary embedding and K/V write, and SiLU gate
    as fused C kernels (built like cpu_paged's) where the model's layers are what they compute:
    float32 on CPU, Llama-style pre-norm layers with a SiLU-gated MLP (Llama, Mistral, Qwen2,
    Qwen3). Off: torch's eager operators, as transformers runs them."""

    trust_remote_code: bool = False
    """Allow model code shipped inside the checkpoint to run. Off: it executes arbitrary code."""

    generation_config: Literal["auto", "ignore"] = "auto"
    """auto: a request that leaves temperature, top_p, top_k, min_p, repetition_penalty or
    max_tokens out gets the checkpoint's generation_config.json value (as vLLM does); ignore:
    OpenAI's defaults. Its EOS ids end generations either way."""

    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = "auto"
    """How tool calls are read from an answer with tool_choice auto: hermes (Qwen, Hermes:
    `<tool_call>{...}</tool_call>`), llama3_json (a bare `{"name", "parameters"}` object),
    mistral (`[TOOL_CALLS][...]`); auto: the one the chat template uses (hermes when unclear)."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """Ranks that split each layer's heads and MLP (DeepSpeed AutoTP). Must divide the
    model's attention and key/value head counts."""

    pipeline_parallel_size: int = Field(default=1, ge=1)
    """Pipeline stages, each holding a contiguous run of decoder layers."""

    parallel: ParallelConfig = ParallelConfig()
    """Placement and supervision of the ranks when the model is sharded."""

    max_model_len: int | None = Field(default=None, ge=16)
    """Context window (prompt + generated tokens); defaults to the model's own."""

    model_version: int = Field(default=1, ge=1)
    """Version number reported by the TF-Serving status routes."""

    engine: EngineConfig = EngineConfig()
    """Generation engine limits."""

    limits: LimitsConfig = LimitsConfig()
    """Per-request bounds."""

    cache: ResultCacheConfig = ResultCacheConfig()
    """Exact-result cache in front of the LLM server."""

    kv_tier: KVTierConfig = KVTierConfig()
    """The cluster KV tier behind each replica's prefix cache (needs
    engine.enable_prefix_caching)."""

    repository: ModelRepositoryConfig | None = None
    """Serve one or more versions from a model repository instead of `model`."""

    auth: AuthConfig = AuthConfig()
    """API keys, tenants and per-key limits (off when no key is configured)."""

    faults: FaultsConfig = FaultsConfig()
    """How a replica whose model workers failed leaves, and how requests route around it."""

    log_prompts: bool = False
    """Log each request's prompt and generated text at INFO with its request id. Off: logs
    carry ids, token counts and timings only (prompts may hold personal data or secrets)."""

    routing: Literal["prefix_affinity", "power_of_two"] = "prefix_affinity"
    """How requests pick an LLM server replica: `prefix_affinity` prefers the replica that
    already holds the prompt's prefix in its KV cache unless it is overloaded (only with
    engine.enable_prefix_caching); `power_of_two` is Ray Serve's default (shorter of two
    random queues). A `request_router_config` in the deployment's section overrides either."""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def parallel_spec(self) -> ParallelSpec:
        par = self.parallel
        return ParallelSpec(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            cpus_per_rank=par.cpus_per_rank,
            gpus_per_rank=1.0 if self.device == "cuda" else 0.0,
            placement_strategy=par.placement_strategy or ("STRICT_PACK" if self.pipeline_parallel_size == 1 else "PACK"),
            micro_batches=par.micro_batches or self.pipeline_parallel_size,
            step_timeout_s=par.step_timeout_s,
            load_timeout_s=par.load_timeout_s,
        )

    def kv_cache_spec(self) -> KVCacheSpec:
        engine = self.engine
        fraction = engine.kv_cache_memory_fraction
        if fraction is None:
            fraction = 0.9 if self.device == "cuda" else 0.5
        return KVCacheSpec(
            block_size=engine.block_size,
            num_blocks=engine.kv_cache_blocks,
            memory_bytes=engine.kv_cache_memory_mb * 2**20 if engine.kv_cache_memory_mb else None,
            memory_fraction=fraction,
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            **self._host_tier(),
        )

    def _host_tier(self) -> dict[str, int | float | None]:
        tier = self.kv_tier
        if not (tier.enabled and self.engine.enable_prefix_caching) or tier.host_memory_mb == 0:
            return {"host_memory_bytes": None, "host_memory_fraction": 0.0}
        if tier.host_memory_mb is not None:
            return {"host_memory_bytes": tier.host_memory_mb * 2**20, "host_memory_fraction": 0.0}
        return {"host_memory_bytes": None, "host_memory_fraction": tier.host_memory_fraction}

    @model_validator(mode="after")
    def _cuda_dtype(self) -> ShardserveArgs:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 is not supported on device cpu; use float32 or bfloat16")
        if self.attention_backend == "cpu_paged" and (self.device, self.dtype) != ("cpu", "float32"):
            raise ValueError(f"attention_backend cpu_paged runs on device cpu in float32, not {self.device} in {self.dtype}")
        return self

    @property
    def model_name(self) -> str:
        if self.repository is not None:
            return self.repository.name
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]

    def for_version(self, version: int) -> ShardserveArgs:
        """The args of one served version of the repository: a plain single-model config."""
        assert self.repository is not None
        path = Path(self.repository.base_path) / self.repository.name / str(version)
        return self.model_copy(
            update={"model": str(path), "model_version": version, "served_model_name": self.repository.name, "repository": None}
        )

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            model=self.model,
            revision=self.revision,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            max_model_len=self.max_model_len,
            device=self.device,
            attention_backend=self.attention_backend,
            fused_ops=self.cpu_fused_ops,
        )


def config_reference_markdown() -> str:
    """The README's config reference, generated from the models above (tests keep it in sync)."""
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[StrictModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, StrictModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            optional = [a for a in get_args(annotation) if a is not type(None)]
            if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], StrictModel):
                doc = " ".join((field.description or "").split()).replace("|", "\\|")
                rows.append(f"| `{prefix}{name}` | section | `None` | {doc} Its fields: |")
                walk(optional[0], f"{prefix}{name}.")
                continue
            kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            kind = kind.replace("|", "\\|")
            if field.is_required():
                default = "required"
            else:
                default = repr(field.default_factory() if field.default_factory else field.default)  # type: ignore[call-arg]
            doc = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{kind}` | `{default}` | {doc} |")

    walk(ShardserveArgs, "")
    return "\n".join(rows)
