"""`python -m bench.gpu` runs on CPU at small sizes, as the GPU machine will run it: with only
what that machine has (its image and the carried wheels: no Ray, xgrammar or DeepSpeed), its
checks holding."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import table
from bench.gpu_speed import LLAMA_1B, LLAMA_8B, Roofs, call_counts, decode_roof_tokens_per_s, model_cost, prefill_roof_s

ROOT = Path(__file__).resolve().parents[1]

# Only what the GPU machine has can be imported (tests/gpu_image.py).
RUN = """
import sys
from tests.gpu_image import refuse_imports_off_the_image
refused = refuse_imports_off_the_image()
assert {"ray", "xgrammar", "deepspeed", "fastapi"} <= refused, sorted(refused)
from bench.gpu import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path_factory.mktemp("gpu") / "report.md"
    done = subprocess.run(
        [sys.executable, "-c", RUN, "--out", str(out), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done, out.read_text() if out.exists() else ""


def test_the_check_runs_on_cpu_with_what_the_gpu_machine_has_and_its_checks_hold(small_run) -> None:
    done, report = small_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert report in done.stdout  # what it prints is what it wrote
    for title in ("Correctness", "Decode", "Prefill", "Memory", "Host calls per decode step"):
        assert f"## {title}" in report
    assert "(not run)" not in report and "Result: all checks held" in report
    rows = [line for line in report.splitlines() if line.startswith("| shardserve/doc-llama |")]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), rows
    assert re.search(r"\| 4/4, \d+ tokens hit \| 4/4 \| yes \|", rows[0]), rows[0]  # prefix cache hit, seeds batch-invariant
    for size in ("small Llama A", "small Llama B"):
        decode = [line for line in report.splitlines() if line.startswith(f"| {size} | ") and "x |" in line]
        assert len(decode) == 2, report  # batches 1 and 4, each with its ratio against transformers
    assert "KV pool" in report and "blocks of 16" in report


def test_host_calls_are_counted_from_the_profilers_event_names() -> None:
    counts = {
        "cudaStreamSynchronize": 6,
        "cudaDeviceSynchronize": 2,
        "cudaLaunchKernel": 300,
        "cuLaunchKernelEx": 20,
        "Memcpy HtoD (Pageable -> Device)": 16,
        "Memcpy DtoH (Device -> Pageable)": 4,
        "aten::item": 4,
        "aten::_local_scalar_dense": 4,
    }
    got = call_counts(counts, steps=2)
    assert (got.syncs, got.launches, got.to_device, got.to_host) == (4, 160, 8, 2)


def test_rooflines_of_the_real_shapes() -> None:
    """Against hand arithmetic: Llama-3.1-8B reads 2 bytes of each of its ~7.5e9 weights besides the
    embedding per step; at 3 TB/s batch 1 is bandwidth-bound near 200 tok/s. Its 2k prefill is
    compute-bound."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    costs = {}
    for size in (LLAMA_1B, LLAMA_8B):
        fields = {k: v for k, v in size.config.items() if k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields), dtype=torch.bfloat16)
        costs[size.name] = model_cost(model)
    one, eight = costs["Llama-3.2-1B shape"], costs["Llama-3.1-8B shape"]
    assert 2.4e9 < one.weight_bytes < 2.6e9  # tied: the embedding is the LM head, read once
    assert 14.9e9 < eight.weight_bytes < 15.1e9  # 7.5e9 weights besides the input embedding
    assert eight.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    h100 = Roofs(bandwidth=3.0e12, matmul=800e12)
    assert 190 < decode_roof_tokens_per_s(eight, h100, 1, 160) < 205
    assert decode_roof_tokens_per_s(eight, h100, 128, 160) > 100 * decode_roof_tokens_per_s(eight, h100, 1, 160)
    assert prefill_roof_s(eight, h100, 2048) == pytest.approx(2 * 7e9 * 2048 / 800e12, rel=0.15)


def test_tables_take_the_union_of_the_rows_columns() -> None:
    text = table([{"a": "1", "b": "2"}, {"a": "3", "c": "4"}])
    assert text.splitlines() == ["| a | b | c |", "| --- | --- | --- |", "| 1 | 2 |  |", "| 3 |  | 4 |"]
