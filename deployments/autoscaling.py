"""Autoscaling the LLM server on engine load, through Ray Serve's custom policy hook.

Serve's default policy scales on ongoing requests per replica. For an LLM that count says
little: one request with a 4k-token prompt can fill the KV cache while ten short ones leave it
empty, and a replica whose batch is full queues requests inside its engine where Serve does
not see them. Each LLMServer replica therefore reports its engine's state
(`record_autoscaling_stats`, read by Serve every `metrics_interval_s`), and `EngineLoadPolicy`
turns it into a replica count. Serve applies min/max replicas, the up/downscale delays and the
scaling factors to whatever the policy returns, as for its own policy.

Enable it in serve_config.yaml:

    autoscaling_config:
      policy:
        policy_function: deployments.autoscaling:EngineLoadPolicy
        policy_kwargs: {target_num_seqs: 16}

This module is shipped to the Serve controller by value (cloudpickle), so it imports nothing
heavy.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

# The stats each replica reports; the policy reads them by these names.
RUNNING, WAITING, KV_USAGE, TTFT = "num_running", "num_waiting", "kv_cache_usage", "ttft_s"


def replica_load(
    stats: dict[str, float], target_num_seqs: float, target_kv_cache_usage: float, target_ttft_s: float | None
) -> float:
    """How many replicas' worth of work one replica holds: 1.0 is exactly at target.

    The most loaded dimension decides: sequences in the engine (running and queued) against
    `target_num_seqs`, KV-cache usage against `target_kv_cache_usage`, and, when a target is
    given, the recent mean time to first token.
    """
    loads = [
        (stats.get(RUNNING, 0.0) + stats.get(WAITING, 0.0)) / target_num_seqs,
        stats.get(KV_USAGE, 0.0) / target_kv_cache_usage,
    ]
    if target_ttft_s:
        loads.append(stats.get(TTFT, 0.0) / target_ttft_s)
    return max(loads)


class EngineLoadPolicy:
    """Replicas = total engine load (see `replica_load`) plus requests queued in Serve's
    handles, in units of `target_num_seqs`. Falls back to Serve's default policy until the
    replicas have reported engine stats."""

    def __init__(self, target_num_seqs: float = 16, target_kv_cache_usage: float = 0.8, target_ttft_s: float | None = None):
        if target_num_seqs <= 0 or not 0 < target_kv_cache_usage <= 1 or (target_ttft_s is not None and target_ttft_s <= 0):
            raise ValueError("EngineLoadPolicy: targets must be positive and target_kv_cache_usage at most 1")
        self.target_num_seqs = target_num_seqs
        self.target_kv_cache_usage = target_kv_cache_usage
        self.target_ttft_s = target_ttft_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        reported = [r for r in ctx.running_replicas if r in metrics.get(RUNNING, {})]
        if not reported:
            return replica_queue_length_autoscaling_policy(ctx)
        loads = [
            replica_load(
                {name: per_replica[r] for name, per_replica in metrics.items() if r in per_replica},
                self.target_num_seqs,
                self.target_kv_cache_usage,
                self.target_ttft_s,
            )
            for r in reported
        ]
        # Replicas that have not reported yet (just started) count at the mean of the others.
        engine = sum(loads) / len(loads) * max(ctx.current_num_replicas, len(loads))
        queued = (ctx.total_queued_requests or 0.0) / self.target_num_seqs
        return engine + queued, {"engine_load": engine, "handle_queued": queued}


class RecentMean:
    """Mean of the values observed in the last `window_s` seconds (the TTFT a replica reports)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self._window_s = window_s
        self._values: deque[tuple[float, float]] = deque()

    def add(self, value: float) -> None:
        self._values.append((time.monotonic(), value))

    def mean(self) -> float:
        horizon = time.monotonic() - self._window_s
        while self._values and self._values[0][0] < horizon:
            self._values.popleft()
        return sum(v for _, v in self._values) / len(self._values) if self._values else 0.0
