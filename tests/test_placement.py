"""Rank layout, stage split and bundles: pure functions (no Ray)."""

from __future__ import annotations

import pytest

from deployments.app import llm_server_options
from deployments.config import ShardserveArgs
from parallel.runners.placement import ParallelLayout, check_heads, replica_bundles


def test_ranks_map_to_stage_and_tp_rank() -> None:
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2, num_layers=4)
    assert [(r.stage, r.tp_rank, r.layers) for r in layout.ranks()] == [
        (0, 0, (0, 2)),
        (0, 1, (0, 2)),
        (1, 0, (2, 4)),
        (1, 1, (2, 4)),
    ]
    assert layout.stage_ranks(1) == [2, 3]
    assert layout.is_last_stage(1) and not layout.is_last_stage(0)


@pytest.mark.parametrize(
    ("layers", "pp", "expected"),
    [(5, 2, [(0, 3), (3, 5)]), (7, 3, [(0, 3), (3, 5), (5, 7)]), (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)])],
)
def test_stages_cover_all_layers_evenly(layers, pp, expected) -> None:
    layout = ParallelLayout(1, pp, layers)
    assert [layout.stage_layers(s) for s in range(pp)] == expected


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="larger than the model's 4 decoder layers"):
        ParallelLayout(1, 5, 4)
    with pytest.raises(ValueError, match="must divide"):
        check_heads(num_attention_heads=4, num_key_value_heads=2, tp=4)
    check_heads(num_attention_heads=4, num_key_value_heads=2, tp=2)


def test_bundles_put_the_replica_first() -> None:
    assert replica_bundles(2, 1.0, 0.0, 1) == [{"CPU": 1}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert replica_bundles(1, 2.0, 1.0, 1)[1] == {"CPU": 2.0, "GPU": 1.0}


def test_sharded_replica_reserves_its_ranks() -> None:
    options = llm_server_options(ShardserveArgs(tensor_parallel_size=2, pipeline_parallel_size=2))
    assert len(options["placement_group_bundles"]) == 5
    assert options["placement_group_strategy"] == "PACK"
    single_node = llm_server_options(ShardserveArgs(tensor_parallel_size=2))
    assert single_node["placement_group_strategy"] == "STRICT_PACK"
    assert "placement_group_bundles" not in llm_server_options(ShardserveArgs())


def test_unplaceable_reason_names_the_missing_resource() -> None:
    from parallel.runners.placement import unplaceable_reason

    bundles = replica_bundles(4, 2.0, 0.0, 1)  # 9 CPUs in all
    two_nodes = [{"CPU": 8.0}, {"CPU": 8.0}]
    assert unplaceable_reason(bundles, "PACK", two_nodes) is None
    reason = unplaceable_reason(bundles, "STRICT_PACK", two_nodes)
    assert reason is not None and "CPU 9 (largest available 8)" in reason and "STRICT_PACK" in reason
    gpu = replica_bundles(2, 1.0, 1.0, 1)
    reason = unplaceable_reason(gpu, "STRICT_PACK", [{"CPU": 16.0}])
    assert reason is not None and "GPU 2 (largest available 0)" in reason
