"""`shardserve compress`: int8 and pruned versions of the default model, validated, published
(or refused) into a TF-Serving-style repository, and loaded back by the server's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel.checkpoints import model_repository
from parallel.checkpoints.compress_cli import cpu_spec, main
from parallel.checkpoints.compression import Int8Linear, target_linears
from parallel.checkpoints.loading import load_hf_model
from parallel.runner import KVCacheSpec, SamplingSpec, SequenceStep, StepInput
from parallel.runners.local_runner import LocalModelRunner

SOURCE = "shardserve/tiny-llama"


def compress(repo: Path, *flags: str) -> tuple[int, dict]:
    status = main(["compress", SOURCE, "--repo", str(repo), "--name", "tiny", *flags])
    latest = model_repository.latest(repo, "tiny")
    where = model_repository.version_dir(repo, "tiny", latest) if status == 0 else repo / "tiny"
    return status, json.loads((where / "report.json").read_text())


def test_int8_version_is_smaller_agrees_and_serves(tmp_path: Path) -> None:
    status, report = compress(tmp_path, "--int8")
    assert status == 0 and report["version"] == 1 and model_repository.versions(tmp_path, "tiny") == [1]
    source, new = report["source_measures"], report["new_measures"]
    assert new["weight_bytes"] < 0.6 * source["weight_bytes"]  # decoder linears at 1 byte a weight
    assert new["disk_bytes"] < 0.6 * source["disk_bytes"]
    assert report["top1_agreement"] >= 0.9 and report["perplexity_ratio"] < 1.05
    version = model_repository.version_dir(tmp_path, "tiny", 1)
    assert json.loads((version / "compression.json").read_text())["quantize"] == "int8"
    model, _, _ = load_hf_model(cpu_spec(version, "float32"))
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)

    runner = LocalModelRunner(cpu_spec(version, "float32"), KVCacheSpec.fixed(16, 32))
    runner.load()
    out = runner.step(StepInput([SequenceStep(0, [1, 5, 9, 13], 0, [0], SamplingSpec())]))
    assert len(out.tokens) == 1
    runner.shutdown()


def test_unstructured_pruning_has_the_requested_sparsity(tmp_path: Path) -> None:
    status, report = compress(tmp_path, "--prune", "0.3", "--min-agreement", "0", "--max-perplexity-ratio", "100")
    assert status == 0 and report["sparsity"] == pytest.approx(0.3, abs=0.001)
    model, _, _ = load_hf_model(cpu_spec(model_repository.version_dir(tmp_path, "tiny", 1), "float32"))
    for name, linear in target_linears(model).items():
        zeros = int((linear.weight == 0).sum())
        assert zeros == int(0.3 * linear.weight.numel()), name


def test_structured_pruning_shrinks_the_mlp(tmp_path: Path) -> None:
    lenient = ("--min-agreement", "0", "--max-perplexity-ratio", "100")
    status, report = compress(tmp_path, "--prune", "0.25", "--prune-structure", "mlp", *lenient)
    assert status == 0
    version = model_repository.version_dir(tmp_path, "tiny", 1)
    config = json.loads((version / "config.json").read_text())
    source_config = json.loads((Path(report["source"]) / "config.json").read_text())
    assert config["intermediate_size"] == source_config["intermediate_size"] - int(0.25 * source_config["intermediate_size"])
    model, _, _ = load_hf_model(cpu_spec(version, "float32"))
    assert model.model.layers[0].mlp.gate_proj.out_features == config["intermediate_size"]
    assert report["new_measures"]["weight_bytes"] < report["source_measures"]["weight_bytes"]


def test_a_version_beyond_tolerance_is_refused(tmp_path: Path) -> None:
    compress(tmp_path, "--int8")
    status, report = compress(tmp_path, "--prune", "0.6")
    assert status == 2 and report["version"] is None
    assert any("agreement" in r for r in report["refused"])
    assert model_repository.versions(tmp_path, "tiny") == [1]  # nothing published, nothing half-written
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".staging")]


def test_a_version_is_rebuilt_from_its_recorded_settings(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    compress(tmp_path, "--int8")
    settings = model_repository.version_dir(tmp_path, "tiny", 1) / "compression.json"
    status, report = compress(tmp_path, "--settings", str(settings))
    assert status == 0 and report["version"] == 2 and report["settings"]["quantize"] == "int8"
    first, second = (load_file(model_repository.version_dir(tmp_path, "tiny", v) / "model.safetensors") for v in (1, 2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
