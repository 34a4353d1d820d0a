"""Loading one pipeline stage of a checkpoint: only its layers, straight from safetensors.

The model skeleton is built on the meta device (no memory), cut down to the stage's decoder
layers (plus embeddings on the first stage, final norm and LM head on the last), and only the
tensors those modules own are read from the safetensors files. A rank never holds the whole
model, which is the point of pipeline parallelism.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

from parallel.loading import ModelLoadError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load_stage(
    path: Path,
    hf_config: PretrainedConfig,
    layers: tuple[int, int],
    first_stage: bool,
    last_stage: bool,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> torch.nn.Module:
    first, last = layers
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    inner = model.model
    inner.layers = torch.nn.ModuleList([inner.layers[i] for i in range(first, last)])
    if not first_stage:
        inner.embed_tokens = None
    if not last_stage:
        inner.norm = None
        model.lm_head = None
    wanted = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()
    embed_key = "model.embed_tokens.weight"
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                local = _local_name(key, first, last)
                if local in wanted:
                    set_module_tensor_to_device(model, local, "cpu", value=fh.get_tensor(key), dtype=dtype)
                    loaded.add(local)
                if key == embed_key and last_stage and "lm_head.weight" in wanted and "lm_head.weight" not in loaded:
                    tied = getattr(hf_config, "tie_word_embeddings", False)
                    if tied:  # tied embeddings: the head reuses the embedding matrix
                        set_module_tensor_to_device(model, "lm_head.weight", "cpu", value=fh.get_tensor(key), dtype=dtype)
                        loaded.add("lm_head.weight")
    missing = sorted(wanted - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint {path} lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}")
    return model.eval()


def _local_name(key: str, first: int, last: int) -> str:
    m = _LAYER.match(key)
    if m is None:
        return key
    index = int(m.group(1))
    return f"model.layers.{index - first}.{m.group(2)}" if first <= index < last else ""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))
