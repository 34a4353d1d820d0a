"""The benchmark's own pieces run (no timing is asserted: machine noise must not fail CI)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bench import workload
from bench.ceiling import engine_decode_tokens_per_s, forward_decode_tokens_per_s, forward_prefill_seconds, load_runner
from bench.serving import render
from parallel.checkpoints.builtin_models import ensure_builtin_model


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


def test_report_puts_vllm_first_with_its_prefix_ttft_and_memory() -> None:
    ours = workload.summarize([workload.RequestResult(True, 0.1, 1.1, 11)], wall_s=2.0)
    peer = {**ours, "output_tokens_per_s": 11.0, "ttft_p50_s": 0.05, "ttft_p99_s": 0.05}
    report = {
        "model": "m",
        "quick": False,
        "started": "now",
        "levels": {"8": {"vllm_cpu": peer, "shardserve": ours}},
        "prefix": {"vllm_cpu": peer, "on": ours, "off": {**ours, "ttft_p50_s": 0.4}},
        "rss_mb": {"vllm_cpu": 2048.0, "shardserve": 1024.0},
        "ceiling": {"batch": 16, "raw_tokens_per_s": 100.0, "engine_tokens_per_s": 80.0, "ratio": 0.8},
    }
    text = render(report)
    rows = [line for line in text.splitlines() if line.startswith("| vLLM CPU") or line.startswith("| shardserve")]
    assert rows[0].startswith("| vLLM CPU (vllm-cpu 0.32.0) | 11.0 |") and rows[0].endswith("| 0.50x | 0.50x | n/a | n/a |"), rows
    assert "| vLLM/ours (on) | 0.50x |" in text
    assert "vLLM CPU (vllm-cpu 0.32.0) 2048 MiB, shardserve 1024 MiB" in text


def test_ceiling_measurements_run() -> None:
    runner, info = load_runner("shardserve/tiny-llama", max_model_len=256)
    assert info.fused_ops  # the ceiling runs the engine's own model code, fused layers included
    assert runner.on_model_thread(forward_decode_tokens_per_s, runner, 2, 8, 4) > 0
    assert runner.on_model_thread(forward_prefill_seconds, runner, list(range(10, 30))) > 0
    assert engine_decode_tokens_per_s(runner, info, 2, 8, 4) > 0
    runner.shutdown()


def test_step_profile_runs() -> None:
    from bench.ceiling import decode_step, prefill_step
    from bench.step_profile import profile

    runner, _ = load_runner("shardserve/tiny-llama", max_model_len=256)
    try:
        for step in (decode_step(2, 20), prefill_step(list(range(10, 34)))):
            timings = profile(runner, "smoke", step, repeats=1, top=3)
            assert set(timings) == {"prepare_ms", "forward_ms", "sample_ms", "step_ms"}
            assert all(v > 0 for v in timings.values())
    finally:
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


def test_overload_summary_and_report() -> None:
    from bench import overload

    outcomes = [
        overload.Outcome(200, 0.1, 0.2, 1.2, 11),
        overload.Outcome(200, 0.1, 0.2, 9.0, 11),  # correct but past the SLO
        overload.Outcome(200, 0.1, 0.2, 1.0, 5),  # cut short: not goodput
        overload.Outcome(503, 0.01, 0.01, 0.01, 0, "overloaded_error"),
        overload.Outcome(500, 0.3, 0.3, 0.3, 0, "no JSON error body"),
    ]
    s = overload.summarize(outcomes, wall_s=2.0, max_tokens=11, slo_s=4.0)
    assert (s["offered"], s["accepted"], s["refused"], s["failed_other"]) == (5, 3, 1, 1)
    assert s["within_slo"] == 1 and s["goodput_rps"] == 0.5 and s["wrong_token_count"] == 1
    assert s["failures"] == ["500 no JSON error body"] and s["refusal_p99_ms"] == 10.0
    half = {**s, "goodput_rps": 0.25}
    report = {
        "model": "m", "quick": True, "started": "now", "max_tokens": 11, "prompt_tokens": [32, 64], "concurrency": 16,
        "window_s": 6.0, "slo_s": 4.0,
        "shardserve": {"sustainable_rps": 2.0, "saturated": s, "rates": {"1x": s, "2x": s}, "peak_goodput_rps": 0.5},
        "serve_batch": {"sustainable_rps": 3.0, "saturated": s, "rates": {"1x": s, "2x": half}, "peak_goodput_rps": 0.5},
    }  # fmt: skip
    text = overload.render(report)
    assert "| shardserve (bounded queues) | 2x = 4.0 req/s | 5 | 3 | 1 (10 / 10) | 1 |" in text
    assert "| shardserve (bounded queues) | closed loop, 16 clients | 5 | 3 |" in text
    assert "| 0.25 req/s | 50% |" in text and "shardserve / @serve.batch: 2.00x" in text


def test_refusal_cost_report() -> None:
    from bench import refusal_cost

    phase = {"rate": 33.0, "probes": 100, "refused": 100, "other": 0, "p50_ms": 15.0, "p99_ms": 30.0,
             "cpu_ms": {"proxy": 5.0, "ingress": 5.0, "client": 2.5}}  # fmt: skip
    report = {"model": "m", "quick": True, "started": "now", "engine": refusal_cost.ENGINE,
              "shardserve": [phase], "minimal": [{**phase, "cpu_ms": {"proxy": 5.0, "ingress": 2.5, "client": 2.5}}]}  # fmt: skip
    text = refusal_cost.render(report)
    assert "| shardserve | 33 | 100 / 100 | 15 / 30 ms | 5.0 / 5.0 / 2.5 | 100 |" in text
    assert "| 5.0 / 2.5 / 2.5 | 133 |" in text and "shardserve / minimal FastAPI ingress: 2.00x" in text


def test_chaos_report() -> None:
    from bench import chaos

    event = {"kind": "rank", "at_s": 5.0, "recovery_s": 7.5, "placement_groups_match_replicas": True,
             "placement_groups": 2, "replicas": 2, "failed": 2, "failed_unclean": [], "failed_statuses": [500, 503],
             "last_failure_after_s": 4.2}  # fmt: skip
    report = {"model": "m", "quick": True, "period_s": 10.0, "seed": 0, "started": "now", "requests": 100, "failed": 2,
              "events": [event, {**event, "kind": "replica", "recovery_s": None}], "all_cleared_after_delete": True}  # fmt: skip
    text = chaos.render(report)
    assert "| rank | 7.5 s | 2 (500, 503) | 0 | 4.2 s | yes (2/2) |" in text
    assert "| replica | not within 180 s |" in text and "- rank: recovery p50 7.5 s" in text
    assert chaos.clean(chaos.Outcome(0, 1, 503, '{"error": {"message": "busy", "type": "overloaded_error"}}'))
    assert not chaos.clean(chaos.Outcome(0, 1, 500, "Internal Server Error"))
    assert not chaos.clean(chaos.Outcome(0, 1, 0, "ReadError()"))


def test_side_by_side_alternates_blocks_and_merges_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks A B then B A; each round its own prompts; each system's row sums its rounds; a
    contender with `stop` is down during the other's blocks; the idle one's CPU is counted only
    while the other is measured."""
    from bench import side_by_side

    calls: list[tuple[str, int, str]] = []
    events: list[str] = []
    speed = {"http://a": 10.0, "http://b": 20.0}
    cpu = {"a": 0.0, "b": 0.0}

    same_work: list[str] = []

    async def fake_run_load(
        url: str, model: str, reqs: list, concurrency: int, stream: bool, progress: str = "", ignore_eos: bool = False,
        fresh_connections: bool = False,
    ) -> tuple[list[workload.RequestResult], float]:  # fmt: skip
        calls.append((url, concurrency, reqs[0] if reqs else ""))
        assert ignore_eos or reqs == ["warm"]  # measured loads do the same work on every system
        assert fresh_connections == (url == "http://b")
        cpu["a" if url == "http://b" else "b"] += 0.5  # the idle one burns 0.5 s over a 2 s turn
        return [workload.RequestResult(True, 0.1, 2.0, int(speed[url] * 2))], 2.0

    def start(name: str, url: str) -> tuple[str, str]:
        events.append(f"start {name}")
        return url, "bench"

    monkeypatch.setattr(side_by_side.workload, "run_load", fake_run_load)
    monkeypatch.setattr(side_by_side.workload, "check_same_work", lambda name, reqs, results: same_work.append(name))
    contenders = {
        "vllm_cpu": side_by_side.Contender(lambda: start("a", "http://a"), cpu_seconds=lambda: cpu["a"]),
        "shardserve": side_by_side.Contender(
            lambda: start("b", "http://b"), stop=lambda: events.append("stop b"), fresh_connections=True
        ),
    }
    loads = {1: [["r0 c1"], ["r1 c1"]], 8: [["r0 c8"], ["r1 c8"]]}
    out = side_by_side.measure(contenders, loads, [["r0 p"], ["r1 p"]], ["warm"], log=lambda _: None)
    measured = [(u, c, r) for u, c, r in calls if r != "warm"]
    block = lambda url, r: [(url, 1, f"r{r} c1"), (url, 8, f"r{r} c8"), (url, 1, f"r{r} p")]  # noqa: E731
    assert measured == block("http://a", 0) + block("http://b", 0) + block("http://b", 1) + block("http://a", 1)
    assert events == ["start a", "start b", "stop b"]  # vLLM stays up; shardserve is down for vLLM's second block
    assert out["levels"]["8"]["shardserve"]["output_tokens"] == 80 and out["levels"]["8"]["shardserve"]["wall_s"] == 4.0
    assert out["rounds"]["1"] == [{"vllm_cpu": 10.0, "shardserve": 20.0}, {"shardserve": 20.0, "vllm_cpu": 10.0}]
    assert out["prefix"]["vllm_cpu"]["output_tokens_per_s"] == 10.0
    assert out["idle_cores"] == {"vllm_cpu": 0.25}  # shardserve was never up while vLLM was measured
    assert len(same_work) == len(measured)  # every measured load was checked for the same work


def test_report_shows_each_rounds_ratio_the_machine_and_the_idle_peer() -> None:
    ours = workload.summarize([workload.RequestResult(True, 0.1, 1.1, 11)] * 4, wall_s=8.0)  # 2 requests, 2 rounds
    peer = {**ours, "output_tokens_per_s": 11.0}
    report = {
        "model": "m",
        "quick": False,
        "started": "now",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "isa": ["avx2"]},
        "alternating_rounds": 2,
        "levels": {"8": {"vllm_cpu": peer, "shardserve": ours}},
        "rounds": {"8": [{"vllm_cpu": 11.0, "shardserve": 5.5}, {"shardserve": 6.6, "vllm_cpu": 11.0}]},
        "idle_cores": {"vllm_cpu": 0.02, "shardserve": 0.05},
        "ceiling": {"batch": 16, "raw_tokens_per_s": 100.0, "engine_tokens_per_s": 80.0, "ratio": 0.8},
    }
    text = render(report)
    assert "started now on AMD EPYC (2 cores; avx2)." in text
    assert "Output tok/s ours/vLLM in each round: 0.50x, 0.60x." in text
    assert "(mean cores while the other was measured): vLLM CPU (vllm-cpu 0.32.0) 0.02, shardserve 0.05." in text
    assert "**Concurrency 8** (2 requests x 2 rounds;" in text


def test_a_system_that_did_other_work_is_not_compared() -> None:
    asked = [workload.BenchRequest("a", 3, 6), workload.BenchRequest("b", 2, 5)]
    answered = lambda *tokens: [workload.RequestResult(True, 0.1, 1.0, n) for n in tokens]  # noqa: E731
    workload.check_same_work("x", asked, answered(6, 5))
    with pytest.raises(RuntimeError, match="x: 1 of 2 answers were not max_tokens long"):
        workload.check_same_work("x", asked, answered(6, 4))


def test_a_streamed_load_records_the_gaps_between_chunks(server: str) -> None:
    """Against the session's shardserve, as bench.serving measures every system: ignore_eos gives
    every request its max_tokens, and the gaps between text chunks are kept for the percentiles."""
    import asyncio

    requests = [workload.BenchRequest("Hello there", 3, 12), workload.BenchRequest("Hi", 2, 9)]
    results, wall = asyncio.run(
        workload.run_load(server, "tiny-llama", requests, 2, stream=True, ignore_eos=True, fresh_connections=True)
    )
    workload.check_same_work("shardserve", requests, results)
    assert all(r.chunk_gaps_s and min(r.chunk_gaps_s) >= 0 for r in results)
    summary = workload.summarize(results, wall)
    assert 0 <= summary["chunk_gap_p50_s"] <= summary["chunk_gap_p99_s"] <= wall
