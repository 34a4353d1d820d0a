"""Weights load from safetensors only: a pickle checkpoint whose unpickling would run code is
refused, or ignored next to safetensors, and its payload never runs; also under
PYTHONOPTIMIZE=1 (no check relies on assert)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

from parallel.builtin_models import ensure_builtin_model


class _Payload:
    """Unpickling this creates the marker file: the proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _load_in_fresh_python(model_dir: Path) -> subprocess.CompletedProcess[str]:
    script = (
        "import sys\n"
        "from parallel.compress_cli import cpu_spec\n"
        "from parallel.local_runner import load_hf_model\n"
        "from parallel.loading import ModelLoadError\n"
        "try:\n"
        f"    load_hf_model(cpu_spec({str(model_dir)!r}, 'float32'))\n"
        "    print('LOADED')\n"
        "except ModelLoadError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {**os.environ, "PYTHONOPTIMIZE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    source = ensure_builtin_model("shardserve/tiny-llama")
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    shutil.copy(source / "config.json", model_dir / "config.json")
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: unpickling it runs code
    assert live.exists()
    result = _load_in_fresh_python(model_dir)
    assert "REFUSED" in result.stdout and "pytorch_model.bin" in result.stdout, result.stdout + result.stderr
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(tmp_path: Path) -> None:
    source = ensure_builtin_model("shardserve/tiny-llama")
    model_dir = tmp_path / "mixed"
    shutil.copytree(source, model_dir)
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    result = _load_in_fresh_python(model_dir)
    assert "LOADED" in result.stdout, result.stdout + result.stderr
    assert not marker.exists()
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
