"""Finding and loading checkpoints: built-in generated models, local directories, hub ids.

Weights load only from safetensors. A pickle checkpoint (`*.bin`, `*.pt`) can run arbitrary code
when unpickled, so a directory that has no safetensors is refused rather than falling back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from parallel.checkpoints.builtin_models import ensure_builtin_model, is_builtin
from parallel.checkpoints.compression import QUANT_KEY, Int8Linear, install_int8_linears
from parallel.model.architectures import UnsupportedArchitecture, architecture_of
from parallel.runner import ModelSpec

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says why and what to do."""


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """Turn `model:` from the config into a local directory holding safetensors weights."""
    if is_builtin(model):
        try:
            return ensure_builtin_model(model)
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {model!r} is not a directory")
        _require_safetensors(path)
        return path
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {model!r} does not exist")
    return _download_from_hub(model, revision)


def _require_safetensors(path: Path) -> None:
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found pickle weights {pickles}; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"{path} has no *.safetensors weights{hint}; only safetensors are loaded")


def _download_from_hub(model_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown id, gated repo: all end the load the same way
        raise ModelLoadError(
            f"model {model_id!r} is neither a built-in model, nor a local directory, nor "
            f"downloadable from the Hugging Face hub ({type(exc).__name__}: {exc})"
        ) from exc
    path = Path(local)
    _require_safetensors(path)
    return path


def load_model_config(spec: ModelSpec) -> tuple[Path, PretrainedConfig]:
    """The checkpoint's directory and config, refusing architectures we cannot run."""
    path = resolve_model_dir(spec.model, spec.revision)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    try:
        architecture_of(hf_config)
    except UnsupportedArchitecture as exc:
        raise ModelLoadError(str(exc)) from None
    return path, hf_config


def context_window(hf_config: PretrainedConfig, requested: int | None) -> int:
    """The context window: the config's `max_model_len`, bounded by the model's own."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is not None and limit is not None and requested > limit:
        raise ModelLoadError(f"max_model_len {requested} exceeds the model's context window {limit}")
    window = requested or limit
    if window is None:
        raise ModelLoadError("the model config has no max_position_embeddings; set max_model_len")
    return window


def generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json, as it ships ({} when it has none). Its EOS list
    and sampling defaults are often not in config.json (Llama 3 Instruct's turn end, Qwen's
    repetition penalty)."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    try:
        fields = json.loads(file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return fields


def eos_token_ids(hf_config: PretrainedConfig, generation: dict[str, Any]) -> tuple[int, ...]:
    """Every id that ends a generation: config.json's and generation_config.json's, in order."""
    ids: list[int] = []
    for eos in (hf_config.eos_token_id, generation.get("eos_token_id")):
        for token in eos if isinstance(eos, list) else [eos]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


def checkpoint_fingerprint(path: Path, samples: int = 16, sample_bytes: int = 65536) -> str:
    """A digest of what in the checkpoint changes an answer: every config, tokenizer and
    template file (`*.json`, `*.jinja`, `*.model`) whole, and of each weight file its name, size,
    safetensors header and `samples` evenly spaced slices of its data. Reading a few MiB instead
    of every byte keeps a 100 GB checkpoint's start fast; another fine-tune or quantization
    differs in all of these."""
    digest = hashlib.sha256()
    for file in sorted(p for pattern in ("*.json", "*.jinja", "*.model") for p in path.glob(pattern)):
        digest.update(f"{file.name}:".encode() + file.read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
            digest.update(fh.read(min(header_len, size)))
            for i in range(samples):
                fh.seek(size * i // samples)
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()


def load_hf_model(spec: ModelSpec) -> tuple[torch.nn.Module, PretrainedConfig, Path]:
    """Load the whole model (safetensors only); int8 versions made by `shardserve compress`
    are rebuilt with Int8Linear layers. Returns the model, its config and its directory."""
    path, hf_config = load_model_config(spec)
    try:
        if getattr(hf_config, QUANT_KEY, None):
            model = load_int8_model(path, hf_config, DTYPES[spec.dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[spec.dtype], use_safetensors=True, trust_remote_code=spec.trust_remote_code
            )
    except Exception as exc:  # corrupt files, missing tensors, bad configs: one clear error
        raise ModelLoadError(f"cannot load {spec.model!r} from {path}: {type(exc).__name__}: {exc}") from exc
    return model.to(spec.device).eval(), hf_config, path


def count_weights(model: torch.nn.Module) -> int:
    """Parameters, counting int8 weights (held as buffers) but not their scales."""
    int8 = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return sum(p.numel() for p in model.parameters()) + int8


def load_int8_model(path: Path, hf_config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    install_int8_linears(model, getattr(hf_config, QUANT_KEY)["modules"])
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if untied or unexpected:
        raise ValueError(f"int8 checkpoint does not match the model: missing {untied[:3]}, unexpected {unexpected[:3]}")
    return model
