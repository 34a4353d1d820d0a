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
