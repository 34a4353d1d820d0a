"""Where the ranks of one model replica go: pure functions of (tp, pp), tested without Ray.

Rank r serves pipeline stage r // tp as tensor-parallel rank r % tp. Each stage holds a
contiguous run of decoder layers, as even as the layer count allows; stage 0 also holds the
embeddings, the last stage the final norm and the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelSpec:
    """How a sharded replica's ranks are laid out, placed and supervised (from the config)."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    cpus_per_rank: float
    gpus_per_rank: float
    placement_strategy: str
    micro_batches: int
    step_timeout_s: float
    load_timeout_s: float


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    stage: int
    tp_rank: int
    layers: tuple[int, int]  # [first, last) decoder layers of this rank's stage

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_layers: int

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be at least 1")
        if self.pipeline_parallel_size > self.num_layers:
            raise ValueError(
                f"pipeline_parallel_size {self.pipeline_parallel_size} is larger than the model's "
                f"{self.num_layers} decoder layers"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_layers(self, stage: int) -> tuple[int, int]:
        base, extra = divmod(self.num_layers, self.pipeline_parallel_size)
        first = stage * base + min(stage, extra)
        return first, first + base + (1 if stage < extra else 0)

    def rank(self, rank: int) -> RankPlacement:
        stage, tp_rank = divmod(rank, self.tensor_parallel_size)
        return RankPlacement(rank, stage, tp_rank, self.stage_layers(stage))

    def ranks(self) -> list[RankPlacement]:
        return [self.rank(r) for r in range(self.world_size)]

    def stage_ranks(self, stage: int) -> list[int]:
        tp = self.tensor_parallel_size
        return list(range(stage * tp, (stage + 1) * tp))

    def is_last_stage(self, stage: int) -> bool:
        return stage == self.pipeline_parallel_size - 1


def check_heads(num_attention_heads: int, num_key_value_heads: int, tp: int) -> None:
    """Tensor parallelism splits attention by key/value head: every rank needs whole heads."""
    if num_key_value_heads % tp or num_attention_heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's attention heads ({num_attention_heads}) "
            f"and key/value heads ({num_key_value_heads})"
        )


def replica_bundles(world_size: int, cpus_per_rank: float, gpus_per_rank: float, replica_cpus: float) -> list[dict[str, float]]:
    """Ray Serve placement_group_bundles: the replica's own bundle first, then one per rank."""
    rank_bundle = {"CPU": cpus_per_rank}
    if gpus_per_rank:
        rank_bundle["GPU"] = gpus_per_rank
    return [{"CPU": replica_cpus}] + [dict(rank_bundle) for _ in range(world_size)]


def unplaceable_reason(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> str | None:
    """Why a placement group cannot be placed on these nodes (their total resources), or None.

    STRICT_PACK needs one node holding every bundle; the other strategies need the cluster's
    sum. (A check on totals: whether the resources are free right now is Ray's business.)
    """
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    if strategy == "STRICT_PACK":
        best = max(nodes, key=lambda n: sum(min(n.get(k, 0.0) / v, 1.0) for k, v in need.items() if v), default={})
        missing = {k: v for k, v in need.items() if best.get(k, 0.0) < v}
        where = "on any one node (STRICT_PACK)"
        have = best
    else:
        have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
        missing = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
        where = f"in the whole cluster ({strategy})"
    if not missing:
        return None
    parts = ", ".join(f"{k} {v:g} (largest available {have.get(k, 0.0):g})" for k, v in sorted(missing.items()))
    return f"a replica and its ranks need {parts} {where}"
