"""LLMServer: one replica holds one copy of the model, its tokenizer and its engine.

Its public methods are the Python API behind every route: `generate` (whole answer),
`generate_stream` (chunks as tokens arrive), `model_card`, `tokenize`. Requests are validated
here, where the tokenizer and the context window are known, and fail with ShardserveError
subclasses that the ingress maps to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.autoscaling import KV_USAGE, RUNNING, TTFT, WAITING, RecentMean
from deployments.config import ShardserveArgs
from deployments.engine.engine import LLMEngine, chunks_of
from deployments.engine.kv_keys import KVNamespace
from deployments.engine.scheduler import Sequence
from deployments.errors import EngineFault, InvalidRequest, RequestTimeout
from deployments.limits import check_budget, check_in_vocabulary, check_request, check_token_ids
from deployments.metrics import EngineMetrics, MetricsPusher, StartupClock, replica_identity
from deployments.replica.checkpoint import ServedCheckpoint
from deployments.replica.grammar import Constraint, ConstraintCompiler
from deployments.replica.held_prefixes import HeldPrefixes
from deployments.replica.kv_tier_client import tier_client
from deployments.replica.output import normalized, prompt_logprobs
from deployments.replica.output_stream import output_chunks
from deployments.replica.tool_calls import format_of, tool_constraint, with_tool_calls
from deployments.served_flag import record_served
from deployments.streams import StreamRecorder, merge
from deployments.tools import Tool
from deployments.types import (
    ChatMessage,
    EmbedRequest,
    EmbedResponse,
    EngineStats,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    SamplingDefaults,
    TokenizeRequest,
    TokenizeResponse,
)
from parallel.checkpoints.loading import resolve_model_dir
from parallel.runner import ModelInfo, ModelRunner
from parallel.runners.distributed_runner import DistributedModelRunner
from parallel.runners.local_runner import LocalModelRunner
from parallel.runners.model_process import ProcessModelRunner

logger = logging.getLogger("ray.serve")


class LLMServer:
    def __init__(self, args: ShardserveArgs, metrics_hub: DeploymentHandle | None = None) -> None:
        self._args = args
        startup = StartupClock()
        model_dir = resolve_model_dir(args.model, args.revision)
        startup.lap("resolve_model")
        self._checkpoint = ServedCheckpoint.open(model_dir, args)
        self._tokenizer = self._checkpoint.tokenizer
        startup.lap("load_tokenizer")
        self._runner = make_runner(args)
        self._info = self._checkpoint.with_stop_ids(self._runner.load())
        startup.lap("load_model")
        _log_context(self._info, self._checkpoint.sampling_defaults)
        namespace = KVNamespace(
            self._checkpoint.fingerprint,
            self._info.dtype,
            self._info.block_size,
            args.tensor_parallel_size,
            args.pipeline_parallel_size,
        )
        self._tier = tier_client(args, self._runner)
        self._engine = LLMEngine(
            self._runner, self._info, args.engine.scheduler_spec(), on_fault=self._leave, namespace=namespace, tier=self._tier
        )
        self._held = None  # this replica's entries in the router's directory
        if args.routing == "prefix_affinity" and args.engine.enable_prefix_caching:
            store = f"{ray.get_runtime_context().get_node_id()}/{namespace.root(None).hex()[:16]}" if self._tier else None
            self._held = HeldPrefixes(self._info.block_size, args.kv_tier.chunk_blocks, store)
        self._constraints = ConstraintCompiler(self._tokenizer, self._info.vocab_size, self._info.eos_token_ids)
        parser = args.tool_call_parser
        self._tool_format = format_of(self._tokenizer.chat_template) if parser == "auto" else parser
        startup.lap("init_engine")
        self._created = int(time.time())
        context = serve.get_replica_context()
        record_served(context.app_name, context.deployment)  # see deployments.served_flag
        self._metrics = EngineMetrics(args.model_name, self._stats)
        self._metrics.startup(startup.phases)
        self._metrics.model_info(self._info.dtype, self._info.attention_backend, self._info.fused_ops)
        logger.info("replica ready: %s", ", ".join(f"{k}={v:.2f}s" for k, v in startup.phases.items()))
        self._recent_ttft = RecentMean()
        self._pusher = None
        if metrics_hub is not None:
            version = {"model_version": str(args.model_version)}
            self._pusher = MetricsPusher(metrics_hub, *replica_identity(), self._metrics.registry, self._metrics.refresh, version)

    def _started(self) -> None:
        """Called on every async entry point: starts the metrics pusher on the replica's loop."""
        if self._pusher is not None:
            self._pusher.ensure_started()

    def _stream_interval(self) -> float:
        """Seconds until an output's next chunk: the configured interval, widened under load so
        that the replica's chunks stay within `stream_chunks_per_s`."""
        engine = self._args.engine
        floor = engine.stream_interval_ms / 1000
        if not engine.stream_chunks_per_s:
            return floor
        return max(floor, self._engine.num_running / engine.stream_chunks_per_s)

    # ---- Python API -------------------------------------------------------------------------

    async def model_card(self) -> ModelCard:
        self._started()  # the ingress asks for the card before anything else: start pushing metrics
        return ModelCard(
            name=self._args.model_name,
            version=self._args.model_version,
            source=self._args.model,
            max_model_len=self._info.max_model_len,
            vocab_size=self._info.vocab_size,
            num_parameters=self._info.num_parameters,
            weight_bytes=self._info.weight_bytes,
            dtype=self._info.dtype,
            created=self._created,
            model_window=self._info.model_window,
            kv_cache_tokens=self._info.num_kv_blocks * self._info.block_size,
            eos_token_ids=list(self._info.eos_token_ids),
            sampling_defaults=self._checkpoint.sampling_defaults,
            fingerprint=self._checkpoint.fingerprint,
            quality=self._checkpoint.quality,
            attention_backend=self._info.attention_backend,
            fused_ops=self._info.fused_ops,
        )

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Generate every output of the request and return them whole (the stream, gathered)."""
        request = self._admit(request)
        recorder = StreamRecorder(request.n)
        async for chunk in self._stream(request):
            recorder.add(chunk)
        response = recorder.response(self._args.model_name, with_logprobs=request.logprobs is not None)
        if response is None:  # cannot happen when the stream ends normally; never return half
            raise EngineFault("generation ended before every output finished")
        return response

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Yield chunks as text becomes available; the first chunk of each output comes as soon
        as its first token is sampled. Validation errors are raised before the first chunk."""
        async for chunk in self._stream(self._admit(request)):
            yield chunk

    def _admit(self, request: GenerateRequest) -> GenerateRequest:
        """The replica's edge, once per call: the limits (pydantic checked the fields' bounds
        when the request was made), then this checkpoint's sampling defaults. The ingress checks
        the limits too, before its result cache; it keys on defaults from a model card that may
        be a rollout behind, so the replica resolves its own."""
        check_request(request, self._args.limits)
        return request.with_defaults(self._checkpoint.sampling_defaults)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self._started()
        request_id = _new_request_id()
        prompt, prompt_ids, max_tokens = self._prepare(request)
        constraint, structured = None, request.structured_output or tool_constraint(request)
        if structured is not None:  # compiling a large schema takes a while the first time
            constraint = await asyncio.to_thread(self._constraints.compile, structured)
        # For the ingress's result cache: what the model read, and which checkpoint answers.
        first = {"prompt": prompt, "prompt_token_ids": prompt_ids, "model_fingerprint": self._checkpoint.fingerprint}
        chunks = self._run(request, request_id, prompt, prompt_ids, max_tokens, constraint)
        if request.calls_tools:
            chunks = with_tool_calls(chunks, request, self._tool_format)
        async for chunk in chunks:
            if first:
                chunk = chunk.model_copy(update=first)
                first = {}
            yield chunk

    async def engine_stats(self) -> EngineStats:
        return self._stats()

    def _stats(self) -> EngineStats:
        stats = self._engine.counters()
        if self._tier is not None:
            stats = stats.model_copy(
                update={"kv_tier_lookups": self._tier.lookups, "kv_tier_lookup_failures": self._tier.lookup_failures}
            )
        return stats

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve reads this every `request_routing_stats_period_s` and hands it to every
        router: this replica's entries in the prefix directory (`held_prefixes`)."""
        if self._held is None:
            return {}
        return await self._held.report(self._engine.held_run, self._tier.held_runs if self._tier is not None else None)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve reads this every `metrics_interval_s`; EngineLoadPolicy scales on it."""
        stats = self._engine.counters()
        return {
            RUNNING: stats.num_running,
            WAITING: stats.num_waiting,
            KV_USAGE: stats.kv_cache_usage,
            TTFT: self._recent_ttft.mean(),
        }

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """The token ids a generation request with this prompt (or these chat turns) would feed
        the model: the count is its `usage.prompt_tokens`."""
        _, ids = self._encode(request.prompt, request.messages, request.add_special_tokens, request.tools)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self._info.max_model_len)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Each input's embedding, all prefilled through the engine together (see EmbedRequest)."""
        self._started()
        prompts = [self._tokenizer.encode(x) if isinstance(x, str) else list(x) for x in request.inputs]
        for ids in prompts:
            check_in_vocabulary("input", ids, self._info.vocab_size)
            if not ids or len(ids) > self._info.max_model_len:
                why = "empty" if not ids else f"{len(ids)} tokens; the context window is {self._info.max_model_len}"
                raise InvalidRequest(f"an input is {why}", param="input", code=None if not ids else "context_length_exceeded")
        width = self._info.hidden_size
        if request.dimensions is not None and request.dimensions > width:
            raise InvalidRequest(f"dimensions must be at most {width}, the model's hidden size", param="dimensions")
        seqs = self._engine.embed(prompts, cache_salt=request.tenant)
        try:
            async with asyncio.timeout(self._args.engine.request_timeout_s):
                for seq in seqs:
                    async for _ in self._engine.stream(seq):
                        pass
        except TimeoutError:
            raise RequestTimeout("embedding did not finish within request_timeout_s", code="timeout") from None
        finally:
            for seq in seqs:
                self._engine.abort(seq)
        if any(seq.embedding is None for seq in seqs):
            raise EngineFault("an embedding ended before it was computed")
        vectors = [normalized(seq.embedding, request.dimensions) for seq in seqs]  # type: ignore[arg-type]
        read = sum(len(ids) for ids in prompts)
        self._metrics.prompt_tokens.inc(read)  # what the engine computed, as for generation
        return EmbedResponse(embeddings=vectors, prompt_tokens=read)

    async def detokenize(self, tokens: list[int]) -> str:
        check_in_vocabulary("tokens", tokens, self._info.vocab_size)
        return self._tokenizer.decode(tokens)

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy."""
        self._started()
        # In a thread: a sharded runner pings its ranks, and a hung rank must not stall the
        # replica's event loop (every stream it serves) while the ping waits out its timeout.
        await asyncio.to_thread(self._engine.health)

    def _leave(self, fault: BaseException) -> None:
        """The runner failed: this replica can serve nothing more. It exits after a grace for
        the in-flight errors to reach their clients; Ray Serve sees the actor die, routes around
        it and starts a replacement at once (its ranks and placement group go with it)."""
        grace = self._args.faults.exit_grace_s
        logger.error("model workers failed (%s: %s); the replica exits in %.1fs", type(fault).__name__, fault, grace)
        asyncio.get_running_loop().call_later(grace, _exit_replica)

    def __del__(self) -> None:
        # Rank actors die with their owner anyway; stopping them first frees their memory now.
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.shutdown()

    # ---- internals --------------------------------------------------------------------------

    def _prepare(self, request: GenerateRequest) -> tuple[str, list[int], int]:
        """Tokenize and check the request against the context window and the limits."""
        limits = self._args.limits
        check_token_ids(request, self._info.vocab_size)
        if request.prompt_token_ids is not None:
            prompt_ids = list(request.prompt_token_ids)
            prompt = self._tokenizer.decode(prompt_ids)
        else:
            prompt, prompt_ids = self._encode(
                request.prompt, request.messages, tools=request.tools if request.calls_tools else None
            )
        if not prompt_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt" if request.messages is None else "messages")
        max_tokens = check_budget(
            request, len(prompt_ids), self._info.max_model_len, limits, self._checkpoint.sampling_defaults.max_tokens
        )
        return prompt, prompt_ids, max_tokens

    def _encode(
        self,
        prompt: str | None,
        messages: list[ChatMessage] | None,
        add_special_tokens: bool = True,
        tools: list[Tool] | None = None,
    ) -> tuple[str, list[int]]:
        """The text the model reads and its ids: chat turns through the template (which places
        the special tokens itself), or a prompt with the tokenizer's own (BOS and the like)."""
        if messages is not None:
            text = self._checkpoint.render_chat(messages, tools)
            return text, self._tokenizer.encode(text, add_special_tokens=False)
        text = prompt or ""
        return text, self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def _run(
        self,
        request: GenerateRequest,
        request_id: str,
        prompt: str,
        prompt_ids: list[int],
        max_tokens: int,
        constraint: Constraint | None,
    ) -> AsyncIterator[GenerateChunk]:
        """Run the request's n sequences, merge their chunks as they come, enforce the timeout.
        The echoed prompt (with its logprobs) and vLLM's prompt logprobs come first, once the
        prompt is read."""
        base_seed = request.seed if request.seed is not None else random.getrandbits(62)
        spec = request.sampling_spec(request.logprobs)
        samplings = [(spec, base_seed + i) for i in range(request.n)]
        tier = None
        if self._tier is not None or self._held is not None:
            keys = self._engine.prompt_keys(prompt_ids, request.tenant)
            chunks = chunks_of(keys, self._args.kv_tier.chunk_blocks) if self._tier is not None else []
            if self._held is not None:
                self._held.track_request(request, len(prompt_ids), keys, chunks)
            if self._tier is not None and request.prompt_top_logprobs is None:  # scored prompts are computed whole
                tier = await self._tier.hint(chunks)
        seqs = self._engine.add(
            prompt_ids,
            samplings,
            max_tokens,
            request.ignore_eos,
            cache_salt=request.tenant,
            stop_token_ids=request.stop_token_ids,
            min_tokens=request.min_tokens,
            constraint=constraint,
            prompt_top_logprobs=request.prompt_top_logprobs,
            tier=tier,
        )
        started = time.monotonic()
        timeout_s = self._args.engine.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        interval = self._stream_interval
        outputs = [
            output_chunks(
                self._engine, seq, self._tokenizer, request, request_id, i, len(prompt_ids), interval, self._metrics.itl.observe
            )
            for i, seq in enumerate(seqs)
        ]
        merged = merge(outputs)
        outcome = "error"
        try:
            if request.echo or request.prompt_logprobs is not None:
                async with asyncio.timeout_at(deadline):
                    prompt_chunks = await self._prompt_chunks(request, request_id, prompt, prompt_ids, seqs[0])
                for prompt_chunk in prompt_chunks:
                    yield prompt_chunk
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        _, chunk = await anext(merged)
                except StopAsyncIteration:
                    outcome = ",".join(str(s.finish_reason) for s in seqs)
                    return
                except TimeoutError:
                    outcome = "timeout"
                    raise RequestTimeout(f"request did not finish within request_timeout_s={timeout_s}", code="timeout") from None
                yield chunk
        finally:
            await merged.aclose()
            for seq in seqs:
                self._engine.abort(seq)
            self._observe(seqs, started, outcome)
            logger.info(
                "request %s: n=%d prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s e2e=%.3fs",
                request_id,
                request.n,
                len(prompt_ids),
                sum(len(s.output_ids) for s in seqs),
                outcome,
                f"{seqs[0].first_token_at - started:.3f}s" if seqs[0].first_token_at else "-",
                time.monotonic() - started,
            )
            if self._args.log_prompts:
                outputs = [self._tokenizer.decode(s.output_ids) for s in seqs]
                logger.info("request %s: prompt=%r outputs=%r", request_id, self._tokenizer.decode(prompt_ids), outputs)

    async def _prompt_chunks(
        self, request: GenerateRequest, request_id: str, prompt: str, prompt_ids: list[int], first: Sequence
    ) -> list[GenerateChunk]:
        """One chunk per output before its tokens: the prompt's text with `echo`, its tokens'
        logprobs with `echo` and `logprobs` (OpenAI's completions) or with `prompt_logprobs`."""
        scores = None
        if first.prompt_top_logprobs is not None:
            await first.prompt_read.wait()
            scores = prompt_logprobs(self._tokenizer, prompt_ids, first.prompt_scores)
        return [
            GenerateChunk(
                request_id=request_id,
                index=i,
                text=prompt if request.echo else "",
                token_ids=[],
                logprobs=scores if request.echo and request.logprobs is not None else None,
                prompt_logprobs=scores if request.prompt_logprobs is not None else None,
                prompt_tokens=len(prompt_ids),
                completion_tokens=0,
            )
            for i in range(request.n)
        ]

    def _observe(self, seqs: list[Sequence], started: float, outcome: str) -> None:
        m, now = self._metrics, time.monotonic()
        m.prompt_tokens.inc(len(seqs[0].prompt_ids))
        for seq in seqs:
            if seq.scheduled_at is not None:
                m.queue.observe(seq.scheduled_at - seq.arrival)
            if seq.first_token_at is not None:
                m.ttft.observe(seq.first_token_at - started)
                self._recent_ttft.add(seq.first_token_at - started)
                if len(seq.output_ids) > 1:
                    m.tpot.observe((now - seq.first_token_at) / (len(seq.output_ids) - 1))
            if seq.finish_reason is not None and outcome not in ("error", "timeout"):
                m.finished(seq.finish_reason)
        if outcome not in ("error", "timeout"):
            m.e2e.observe(now - started)


def _log_context(info: ModelInfo, defaults: SamplingDefaults) -> None:
    """What a user tuning the pool needs at start: the context served and why, and how many
    sequences of it fit at once (as vLLM logs its maximum concurrency)."""
    pool_tokens = info.num_kv_blocks * info.block_size
    logger.info(
        "context: model window %d tokens, KV pool %d blocks x %d = %d tokens (%.0f MiB; %s) -> max_model_len %d, "
        "max concurrency at full context %.2fx; EOS ids %s; sampling defaults %s; attention %s; layers %s",
        info.model_window,
        info.num_kv_blocks,
        info.block_size,
        pool_tokens,
        info.kv_cache_bytes / 2**20,
        info.kv_sizing,
        info.max_model_len,
        pool_tokens / info.max_model_len,
        list(info.eos_token_ids),
        defaults.model_dump(exclude_defaults=True) or "none",
        info.attention_backend,
        "fused" if info.fused_ops else "eager",
    )


def make_runner(args: ShardserveArgs) -> ModelRunner:
    """The replica's runner: a process of its own (or a thread of the replica) for one rank,
    rank actors for a sharded model."""
    if args.world_size > 1:
        return DistributedModelRunner(args.model_spec(), args.kv_cache_spec(), args.parallel_spec())
    engine = args.engine
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = engine.model_threads or max(1, int(cpus))
    if not engine.model_process:
        return LocalModelRunner(args.model_spec(), args.kv_cache_spec(), threads)
    return ProcessModelRunner(args.model_spec(), args.kv_cache_spec(), threads)


def _exit_replica() -> None:
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _new_request_id() -> str:
    return uuid.uuid4().hex
