"""EngineLoadPolicy on Ray Serve's own AutoscalingContext, without a cluster."""

from __future__ import annotations

import time

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import KV_USAGE, RUNNING, TTFT, WAITING, EngineLoadPolicy, RecentMean, replica_load

DEP = DeploymentID(name="LLMServer", app_name="shardserve")


def context(per_replica: dict[str, dict[str, float]], queued: float = 0.0, current: int | None = None) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=name, deployment_id=DEP) for name in per_replica]
    metrics: dict[str, dict[ReplicaID, float]] = {}
    for rid, stats in zip(replicas, per_replica.values(), strict=True):
        for key, value in stats.items():
            metrics.setdefault(key, {})[rid] = value
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name="LLMServer",
        app_name="shardserve",
        current_num_replicas=current if current is not None else len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=replicas,
        total_num_requests=10.0,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=5),
    )


def test_replica_load_takes_the_most_loaded_dimension() -> None:
    assert replica_load({RUNNING: 8, WAITING: 8, KV_USAGE: 0.2}, 16, 0.8, None) == 1.0
    assert replica_load({RUNNING: 1, WAITING: 0, KV_USAGE: 0.8}, 16, 0.4, None) == 2.0  # long prompts fill the cache
    assert replica_load({RUNNING: 1, WAITING: 0, KV_USAGE: 0.1, TTFT: 3.0}, 16, 0.8, 1.0) == 3.0
    assert replica_load({RUNNING: 1, WAITING: 0, KV_USAGE: 0.1, TTFT: 3.0}, 16, 0.8, None) == pytest.approx(0.125)


def test_policy_sums_engine_load_and_handle_queue() -> None:
    policy = EngineLoadPolicy(target_num_seqs=4, target_kv_cache_usage=0.5)
    busy = context({"a": {RUNNING: 4, WAITING: 4, KV_USAGE: 0.1}, "b": {RUNNING: 2, WAITING: 0, KV_USAGE: 0.5}}, queued=4)
    desired, state = policy(busy)
    assert desired == pytest.approx(2.0 + 1.0 + 1.0)  # a: 8/4, b: kv 0.5/0.5, queue: 4/4
    assert state == {"engine_load": pytest.approx(3.0), "handle_queued": pytest.approx(1.0)}
    idle, _ = policy(context({"a": {RUNNING: 0, WAITING: 0, KV_USAGE: 0.0}, "b": {RUNNING: 1, WAITING: 0, KV_USAGE: 0.0}}))
    assert idle == pytest.approx(0.25)  # below one replica: Serve clamps to min_replicas


def test_replicas_not_reported_yet_count_at_the_mean() -> None:
    policy = EngineLoadPolicy(target_num_seqs=4)
    desired, _ = policy(context({"a": {RUNNING: 8, WAITING: 0, KV_USAGE: 0.0}}, current=2))
    assert desired == pytest.approx(4.0)


def test_without_engine_stats_it_falls_back_to_serves_policy() -> None:
    desired, _ = EngineLoadPolicy()(context({"a": {}, "b": {}}))
    assert desired == pytest.approx(2 * 10.0 / (5 * 2))  # Serve's ongoing-requests rule


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError):
        EngineLoadPolicy(target_num_seqs=0)
    with pytest.raises(ValueError):
        EngineLoadPolicy(target_kv_cache_usage=1.5)


def test_recent_mean_forgets_old_values() -> None:
    window = RecentMean(window_s=0.05)
    assert window.mean() == 0.0
    window.add(1.0)
    window.add(3.0)
    assert window.mean() == 2.0
    time.sleep(0.06)  # past the window: a deterministic bound, not a wait for something
    assert window.mean() == 0.0
