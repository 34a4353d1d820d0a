"""Prometheus metrics with the names vLLM operators know, under one `/metrics` URL for the app.

Every replica (ingress and LLM server) keeps its own prometheus-client registry and pushes a
snapshot of it to the MetricsHub deployment every few seconds (the ingress pushes its own just
before it answers a scrape). The hub labels each series with the replica it came from and
renders them all, so one scrape covers every replica wherever it runs, and a replica that stops
pushing (gone, or stuck) disappears after `STALE_AFTER_S`. Ray's own `ray_serve_*` metrics are
untouched: they go through Ray's metrics agent as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from ray import serve

from deployments.types import EngineStats

logger = logging.getLogger("ray.serve")

PUSH_INTERVAL_S = 2.0
STALE_AFTER_S = 10.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# A family as it travels to the hub: (name, type, help, [(sample name, labels, value)]).
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def snapshot(registry: CollectorRegistry, extra_labels: dict[str, str] | None = None) -> list[Family]:
    """The registry's current samples as plain data, without prometheus-client's `_created`
    timestamps (noise to a scraper; Prometheus detects counter resets itself). `extra_labels`
    go on every sample (an LLM server's `model_version`)."""
    extra = extra_labels or {}
    return [
        (
            m.name,
            m.type,
            m.documentation,
            [(s.name, {**s.labels, **extra}, float(s.value)) for s in m.samples if not s.name.endswith("_created")],
        )
        for m in registry.collect()
    ]


def replica_identity() -> tuple[str, str]:
    """(replica id, deployment name) of the calling Serve replica, for its metrics' labels."""
    ctx = serve.get_replica_context()
    return ctx.replica_id.unique_id, ctx.deployment


class IngressMetrics:
    """What the ingress sees: HTTP requests by route and status, and the result cache."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model = model_name
        self._requests = Counter(
            "shardserve:http_requests",
            "HTTP requests by route and status.",
            ["model_name", "route", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "shardserve:http_request_duration_seconds", "Time to the last byte of an HTTP response, by route.",
            ["model_name", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._cache = {
            event: Counter(f"shardserve:result_cache_{name}", doc, ["model_name"], registry=self.registry)
            for event, name, doc in (
                ("hit", "hits", "Requests answered from the result cache."),
                ("miss", "misses", "Cacheable requests not found in the result cache."),
                ("error", "errors", "Result-cache calls that failed (the request was served uncached)."),
            )
        }

    def http_request(self, route: str, status: int, seconds: float) -> None:
        self._requests.labels(self._model, route, str(status)).inc()
        self._duration.labels(self._model, route).observe(seconds)

    def cache_event(self, event: str) -> None:
        self._cache[event].labels(self._model).inc()


class EngineMetrics:
    """What an LLM server replica sees: vLLM's request latencies, tokens and engine load."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model = model_name
        self._stats = stats
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"shardserve:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between two generated tokens of a sequence.", _TOKEN_BUCKETS)
        self.tpot = hist(
            "request_time_per_output_token_seconds", "Per request: (e2e - ttft) / (output tokens - 1).", _TOKEN_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time a sequence waited before it was first scheduled.", _LATENCY_BUCKETS)
        self.prompt_tokens = Counter("shardserve:prompt_tokens", "Prompt tokens read.", labels, registry=r).labels(model_name)
        self._success = Counter(
            "shardserve:request_success", "Finished requests by finish reason.", [*labels, "finished_reason"], registry=r
        )
        self._gauges = {
            key: Gauge(f"shardserve:{name}", doc, labels, registry=r).labels(model_name)
            for key, name, doc in (
                ("num_running", "num_requests_running", "Sequences in the running batch."),
                ("num_waiting", "num_requests_waiting", "Sequences waiting for a batch slot."),
                ("kv_cache_usage", "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."),
            )
        }
        # Counters the engine already keeps; mirrored here by their increase since the last push.
        self._mirrored = {
            key: Counter(f"shardserve:{name}", doc, labels, registry=r).labels(model_name)
            for key, name, doc in (
                ("generation_tokens", "generation_tokens", "Tokens generated."),
                ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
                ("num_preemptions", "num_preemptions", "Sequences preempted for lack of KV blocks."),
                ("host_cache_hit_tokens", "host_kv_cache_hit_tokens", "Prompt tokens copied back from the host tier."),
                ("host_cache_offloads", "host_kv_cache_offloads", "Blocks evicted from the pool into the host tier."),
                ("kv_tier_lookups", "kv_tier_lookups", "Prompts looked up in the cluster KV tier."),
                ("kv_tier_lookup_failures", "kv_tier_lookup_failures", "Tier lookups that timed out or found no store."),
                ("kv_tier_hit_tokens", "kv_tier_hit_tokens", "Prompt tokens loaded from the cluster KV tier."),
                ("kv_tier_loads", "kv_tier_loads", "Sequences that loaded chunks from the cluster KV tier."),
                ("kv_tier_load_failures", "kv_tier_load_failures", "Tier chunks that failed to load (recomputed)."),
                ("kv_tier_load_seconds", "kv_tier_load_seconds", "Time sequences waited for tier loads, summed."),
                ("kv_tier_loaded_bytes", "kv_tier_loaded_bytes", "Bytes copied from the tier into the pool."),
                ("kv_tier_saves", "kv_tier_saves", "Chunks written to the cluster KV tier."),
                ("kv_tier_saved_bytes", "kv_tier_saved_bytes", "Bytes copied from the pool to the tier."),
            )
        }
        self._seen: dict[str, int] = dict.fromkeys(self._mirrored, 0)

    def startup(self, phases: dict[str, float]) -> None:
        gauge = Gauge(
            "shardserve:replica_startup_seconds", "What this replica's cold start was made of, by phase.",
            ["model_name", "phase"], registry=self.registry,
        )  # fmt: skip
        for phase, seconds in phases.items():
            gauge.labels(self._model, phase).set(seconds)

    def model_info(self, dtype: str, attention_backend: str, fused_ops: bool) -> None:
        """What this replica computes with, as labels of a gauge set to 1 (vLLM's `*_info`
        shape): a kernel that fell back shows as `attention_backend="gather_sdpa"` or
        `layer_ops="eager"` beside the replicas that have it."""
        Gauge(
            "shardserve:model_info", "What the replica computes with (labels); always 1.",
            ["model_name", "dtype", "attention_backend", "layer_ops"], registry=self.registry,
        ).labels(self._model, dtype, attention_backend, "fused" if fused_ops else "eager").set(1)  # fmt: skip

    def finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def refresh(self) -> None:
        """Copy the engine's live state into the gauges and mirrored counters."""
        stats = self._stats()
        for key, gauge in self._gauges.items():
            gauge.set(getattr(stats, key))
        for key, counter in self._mirrored.items():
            value = getattr(stats, key)
            if value > self._seen[key]:
                counter.inc(value - self._seen[key])
            self._seen[key] = value


class StartupClock:
    """Times the phases of a replica's constructor (the rest of a cold start, Ray placing the
    actor and starting its process, is seen from outside: bench/autoscaling.py)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self._last
        self._last = now


class MetricsPusher:
    """Pushes one replica's registry to the hub every PUSH_INTERVAL_S, from the replica's own
    event loop (started on the first async call, where a loop is sure to be running)."""

    def __init__(
        self,
        hub: Any,
        source: str,
        deployment: str,
        registry: CollectorRegistry,
        before: Callable[[], None],
        extra_labels: dict[str, str] | None = None,
    ) -> None:
        self._hub, self._source, self._deployment = hub, source, deployment
        self._registry, self._before, self._extra = registry, before, extra_labels
        self._task: asyncio.Task[None] | None = None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def push_now(self) -> None:
        self._before()
        await self._hub.push.remote(self._source, self._deployment, snapshot(self._registry, self._extra))

    async def _loop(self) -> None:
        while True:
            try:
                await self.push_now()
            except Exception as exc:  # noqa: BLE001 - monitoring must never take the replica down
                logger.warning("metrics push failed: %s", type(exc).__name__)
            await asyncio.sleep(PUSH_INTERVAL_S)


class MetricsHub:
    """The Serve deployment that holds the latest snapshot of every replica and renders them."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[float, str, list[Family]]] = {}

    async def push(self, source: str, deployment: str, families: list[Family]) -> None:
        self._sources[source] = (time.monotonic(), deployment, families)

    async def render(self, source: str | None = None, deployment: str = "", families: list[Family] | None = None) -> str:
        """Prometheus text for every live replica; the caller's own snapshot is taken first."""
        if source is not None and families is not None:
            await self.push(source, deployment, families)
        return generate_latest(_Merged(self._live())).decode()  # type: ignore[arg-type]

    def _live(self) -> dict[str, tuple[str, list[Family]]]:
        now = time.monotonic()
        for source in [s for s, (at, _, _) in self._sources.items() if now - at > STALE_AFTER_S]:
            del self._sources[source]
        return {source: (deployment, families) for source, (_, deployment, families) in self._sources.items()}


class _Merged:
    """A prometheus-client collector over the hub's snapshots: each family once, with a
    `replica` label on every sample, plus the number of live replicas per deployment."""

    def __init__(self, live: dict[str, tuple[str, list[Family]]]) -> None:
        self._live = live

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        replicas: dict[str, int] = {}
        for source, (deployment, families) in sorted(self._live.items()):
            replicas[deployment] = replicas.get(deployment, 0) + 1
            for name, typ, doc, samples in families:
                metric = merged.setdefault(name, Metric(name, doc, typ))
                for sample_name, labels, value in samples:
                    metric.add_sample(sample_name, {**labels, "replica": source}, value)
        count = Metric("shardserve:num_replicas", "Replicas reporting metrics, by deployment.", "gauge")
        for deployment, n in sorted(replicas.items()):
            count.add_sample("shardserve:num_replicas", {"deployment": deployment}, n)
        return [*merged.values(), count]
