"""Loading one pipeline stage of a checkpoint: only its layers, straight from safetensors.

The model skeleton is built on the meta device (no memory), cut down to the stage's decoder
layers (plus embeddings on the first stage, final norm and LM head on the last), and only the
tensors those modules own are read from the safetensors files. A rank never holds the whole
model, which is the point of pipeline parallelism. Int8 versions are read as dequantized float
weights plus their scales, for `parallel.checkpoints.int8_shards` to quantize again once sharded.
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

from parallel.checkpoints.compression import QUANT_KEY, dequantize
from parallel.checkpoints.loading import ModelLoadError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load_stage(
    path: Path,
    hf_config: PretrainedConfig,
    layers: tuple[int, int],
    first_stage: bool,
    last_stage: bool,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The stage's model, and the int8 scales of its quantized linears by local module name
    (empty for a float checkpoint)."""
    first, last = layers
    quantized = {f"{m}.weight" for m in (getattr(hf_config, QUANT_KEY, None) or {}).get("modules", [])}
    scales: dict[str, torch.Tensor] = {}
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
                    value = fh.get_tensor(key)
                    if key in quantized:
                        scale = _tensor(path, f"{key}_scale", fh).to(dtype)
                        value = dequantize(value, scale, dtype)
                        scales[local.removesuffix(".weight")] = scale
                    set_module_tensor_to_device(model, local, "cpu", value=value, dtype=dtype)
                    loaded.add(local)
                if key == embed_key and last_stage and "lm_head.weight" in wanted and "lm_head.weight" not in loaded:
                    tied = getattr(hf_config, "tie_word_embeddings", False)
                    if tied:  # tied embeddings: the head reuses the embedding matrix
                        set_module_tensor_to_device(model, "lm_head.weight", "cpu", value=fh.get_tensor(key), dtype=dtype)
                        loaded.add("lm_head.weight")
    missing = sorted(wanted - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint {path} lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}")
    return model.eval(), scales


def _tensor(path: Path, key: str, open_file: object) -> torch.Tensor:
    """A tensor by name: from the open file when it is there, else from the file that has it."""
    if key in open_file.keys():  # type: ignore[attr-defined]
        return open_file.get_tensor(key)  # type: ignore[attr-defined]
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as fh:
            if key in fh.keys():
                return fh.get_tensor(key)
    raise ModelLoadError(f"checkpoint {path} lacks {key}, the scale of an int8 weight")


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
