"""A non-editable install, what `pip install .` and cluster/Dockerfile make, carries everything
the CPU kernels need: the wheel is built from the package sources, installed into a fresh
folder, and a separate Python (away from the checkout, with an empty kernel cache) loads a
built-in model from that install with both kernels built and chosen. No Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import needs_c_compiler

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, parallel
from deployments.config import ShardserveArgs
from parallel.runners.local_runner import LocalModelRunner
args = ShardserveArgs(model="shardserve/tiny-llama", max_model_len=64)
info = LocalModelRunner(args.model_spec(), args.kv_cache_spec()).load()
print(json.dumps({"from": parallel.__file__, "attention": info.attention_backend, "fused_ops": info.fused_ops}))
"""


@needs_c_compiler
def test_a_wheel_install_builds_and_chooses_both_cpu_kernels(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: no build/ left over from an earlier build slips into the wheel
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    for package in ("deployments", "parallel"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("shardserve-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "SHARDSERVE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", LOAD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["from"].startswith(str(site)), report  # the installed copy, not the checkout
    assert report["attention"] == "cpu_paged" and report["fused_ops"] is True, (report, done.stderr[-3000:])
