"""The benchmark's own pieces run (no timing is asserted: machine noise must not fail CI)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bench import workload
from bench.ceiling import engine_decode_tokens_per_s, load_runner, raw_decode_tokens_per_s
from bench.serving import render
from parallel.builtin_models import ensure_builtin_model


def test_workloads_are_seeded_and_within_ranges() -> None:
    tok = AutoTokenizer.from_pretrained(ensure_builtin_model("shardserve/tiny-llama"))
    a = workload.mixed_workload(tok, 6, seed=3, prompt_range=(20, 40), output_range=(5, 9))
    assert a == workload.mixed_workload(tok, 6, seed=3, prompt_range=(20, 40), output_range=(5, 9))
    assert all(5 <= r.max_tokens <= 9 for r in a)
    assert all(10 <= r.prompt_tokens <= 60 for r in a)  # re-tokenized text: near the drawn length
    shared = workload.shared_prefix_workload(tok, 3, seed=1, prefix_tokens=64)
    prefix = min(len(r.prompt) for r in shared) // 2
    assert len({r.prompt[:prefix] for r in shared}) == 1


def test_summary_and_report_numbers() -> None:
    results = [
        workload.RequestResult(True, 0.1, 1.1, 11),
        workload.RequestResult(True, 0.3, 2.3, 21),
        workload.RequestResult(False, 0, 0, 0),
    ]
    s = workload.summarize(results, wall_s=4.0)
    assert s["output_tokens"] == 32 and s["failed"] == 1
    assert s["output_tokens_per_s"] == 8.0 and s["requests_per_s"] == 0.5
    assert s["tpot_p50_s"] == pytest.approx(0.1)
    report = {
        "model": "m",
        "quick": True,
        "started": "now",
        "levels": {"1": {"shardserve": s, "naive": {**s, "output_tokens_per_s": 4.0, "ttft_p50_s": 0.2}}},
        "ceiling": {"batch": 16, "raw_tokens_per_s": 100.0, "engine_tokens_per_s": 80.0, "ratio": 0.8},
        "prefill": {"prefill_p50_s": 0.05},
    }
    text = render(report)
    assert "| naive HF generate (Ray Serve) | 4.0 |" in text and "2.00x" in text
    assert "0.80x of the ceiling" in text


def test_ceiling_measurements_run() -> None:
    runner, info = load_runner("shardserve/tiny-llama", max_model_len=256)
    assert runner.on_model_thread(raw_decode_tokens_per_s, runner.model, 2, 8, 4) > 0
    assert engine_decode_tokens_per_s(runner, info, 2, 8, 4) > 0
    runner.shutdown()


def test_fleet_bench_reports_render() -> None:
    from bench import autoscaling, result_cache, routing

    lat = {"p50_ms": 2.0, "p99_ms": 4.0, "n": 10}
    text = result_cache.render(
        {"model": "m", "quick": True, "max_tokens": 8, "started": "now", "floor": lat,
         "memory": {"generation": {**lat, "p50_ms": 200.0}, "hit": {**lat, "p50_ms": 4.0}, "hit_stream": lat}}
    )  # fmt: skip
    assert "| memory | 200.0 ms | 4.00 ms |" in text and "| 50x | 2.00x |" in text
    run = {
        "prefix_hit_rate": 0.9, "followup_ttft_p50_s": 0.1, "followup_ttft_p95_s": 0.2,
        "first_turn_ttft_p50_s": 0.3, "wall_s": 5.0,
    }  # fmt: skip
    text = routing.render(
        {"model": "m", "quick": True, "started": "now", "conversations": 2, "turns": 3, "concurrency": 2,
         "prefix_affinity": run, "power_of_two": {**run, "prefix_hit_rate": 0.5, "followup_ttft_p50_s": 0.2}}
    )  # fmt: skip
    assert "| 90% |" in text and "| 50% |" in text and "2.00x" in text
    scaled = {
        "requests": 10, "failed": 0, "max_replicas_seen": 2, "to_second_replica_s": 12.0,
        "upscale_decision_to_running_s": 9.0, "back_to_min_after_load_s": 11.0, "ttft_p50_s": 0.05,
        "ttft_p95_s": 0.1, "new_replica_constructor_s": {"abc": {"load_model": 0.3}},
    }  # fmt: skip
    flat = {**scaled, "max_replicas_seen": 1, "to_second_replica_s": None, "back_to_min_after_load_s": None}
    flat["new_replica_constructor_s"] = {}
    text = autoscaling.render({"quick": True, "clients": 2, "load_s": 5, "started": "now", "default": flat, "engine": scaled})
    assert "| 1 | never | 0 / 10 |" in text and "stayed at 1" in text and "| 2 | 12.0 s |" in text and "load_model 0.30 s" in text
