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

import pytest

from parallel.checkpoints.builtin_models import ensure_builtin_model


class _Payload:
    """Unpickling this creates the marker file: the proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pickle-only checkpoint and safetensors with a pickle beside them, each with its own
    payload marker (created if the payload ever runs)."""
    root = tmp_path_factory.mktemp("weights")
    source = ensure_builtin_model("shardserve/tiny-llama")
    evil = root / "evil"
    evil.mkdir()
    shutil.copy(source / "config.json", evil / "config.json")
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(root / "evil-pwned")))
    mixed = root / "mixed"
    shutil.copytree(source, mixed)
    (mixed / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(root / "mixed-pwned")))
    return {"evil": evil, "mixed": mixed}


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path]) -> dict[str, str]:
    """What loading each checkpoint printed, in one fresh Python under PYTHONOPTIMIZE=1."""
    script = (
        "import sys\n"
        "from parallel.checkpoints.compress_cli import cpu_spec\n"
        "from parallel.checkpoints.loading import load_hf_model\n"
        "from parallel.checkpoints.loading import ModelLoadError\n"
        "for name, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    try:\n"
        "        load_hf_model(cpu_spec(path, 'float32'))\n"
        "        print(name, 'LOADED')\n"
        "    except ModelLoadError as exc:\n"
        "        print(name, 'REFUSED', str(exc).replace(chr(10), ' '))\n"
    )
    argv = [str(x) for name, path in checkpoints.items() for x in (name, path)]
    env = {**os.environ, "PYTHONOPTIMIZE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, env=env)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0] in checkpoints)
    assert set(lines) == set(checkpoints), result.stdout + result.stderr
    return lines


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(checkpoints: dict[str, Path], loaded: dict[str, str]) -> None:
    live = checkpoints["evil"].parent / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: unpickling it runs code
    assert live.exists()
    assert loaded["evil"].startswith("REFUSED") and "pytorch_model.bin" in loaded["evil"], loaded
    assert not (checkpoints["evil"].parent / "evil-pwned").exists()


def test_pickle_next_to_safetensors_is_ignored(checkpoints: dict[str, Path], loaded: dict[str, str]) -> None:
    assert loaded["mixed"] == "LOADED", loaded
    assert not (checkpoints["mixed"].parent / "mixed-pwned").exists()
    assert json.loads((checkpoints["mixed"] / "config.json").read_text())["model_type"] == "llama"
