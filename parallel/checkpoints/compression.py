"""Compressing a checkpoint into a new one: dtype conversion, int8 weight quantization, pruning.

Every transformation is a pure function of the model and its recorded settings
(`CompressionSpec`), so a version can be rebuilt from its `compression.json`. The output is a
normal Hugging Face directory (safetensors, config, tokenizer) that shardserve loads through
the same code as any checkpoint; int8 versions carry `shardserve_quantization` in config.json
and are rebuilt with `Int8Linear` layers on load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

QUANT_KEY = "shardserve_quantization"
# Linear layers of the decoder blocks; embeddings and the LM head stay in full precision.
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class CompressionSpec:
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Cast every floating-point weight to this dtype."""
    quantize: Literal["int8"] | None = None
    """int8: per-output-channel symmetric int8 weights for the decoder's linear layers."""
    prune: float = 0.0
    """Fraction of weights (unstructured) or MLP neurons (structured) removed, by magnitude."""
    prune_structure: Literal["unstructured", "mlp"] = "unstructured"
    """unstructured: zero the smallest weights of each linear layer (sparsity; no speed-up on
    dense kernels). mlp: remove the weakest intermediate neurons of every MLP, which shrinks
    intermediate_size and so the compute of the MLP."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune < 1.0:
            raise ValueError("prune must be in [0, 1)")

    def describe(self) -> str:
        parts = [f"dtype={self.dtype}" if self.dtype else "", f"quantize={self.quantize}" if self.quantize else ""]
        if self.prune:
            parts.append(f"prune={self.prune:g} ({self.prune_structure})")
        return ", ".join(p for p in parts if p) or "copy"


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _TARGETS}


def prune_unstructured(model: nn.Module, ratio: float) -> None:
    """Zero the `ratio` smallest-magnitude weights of each target linear layer."""
    with torch.no_grad():
        for linear in target_linears(model).values():
            w = linear.weight
            k = int(ratio * w.numel())
            if k == 0:
                continue
            threshold = w.abs().flatten().kthvalue(k).values
            mask = w.abs() > threshold
            # Ties at the threshold: zero exactly k weights.
            extra = int(mask.numel() - mask.sum().item()) - k
            if extra > 0:
                ties = ((w.abs() == threshold) & ~mask).nonzero()[:extra]
                mask[tuple(ties.T)] = True
            w.mul_(mask)


def prune_mlp_neurons(model: nn.Module, ratio: float) -> int:
    """Remove the weakest `ratio` of each Llama-style MLP's intermediate neurons (the same count
    in every layer, as the config has one intermediate_size). Returns the new size."""
    layers = [m for m in model.modules() if all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))]
    if not layers:
        raise ValueError("structured MLP pruning needs gate_proj/up_proj/down_proj MLPs (Llama-style)")
    size = layers[0].gate_proj.out_features
    keep = max(1, size - int(ratio * size))
    with torch.no_grad():
        for mlp in layers:
            score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
            kept = score.topk(keep).indices.sort().values
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                old: nn.Linear = getattr(mlp, name)
                weight = old.weight.index_select(dim, kept)
                new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None, dtype=weight.dtype)
                new.weight.copy_(weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias if dim == 1 else old.bias[kept])
                setattr(mlp, name, new)
    return keep


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Int8 values of `weight` at a per-output-channel `scale` (symmetric, round to nearest)."""
    return torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight an int8 layer computes with; loaders that dequantize use it too, so a
    sharded int8 model computes exactly what `Int8Linear` does."""
    return q.to(dtype) * scale.to(dtype)[:, None]


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and a float scale per output channel (weight-only
    quantization: 4x less weight memory than float32; activations stay in float)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (weight.abs().amax(dim=1).float() / 127.0).clamp(min=1e-12)
        return quantize_rows(weight, scale), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)


def install_int8_linears(model: nn.Module, names: list[str]) -> None:
    """Replace these linear layers by empty Int8Linear layers (to be filled by a state dict)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(old.in_features, old.out_features, old.bias is not None, old.weight.dtype))


def quantize_int8(model: nn.Module) -> list[str]:
    """Quantize the target linears in place; returns their names."""
    names = sorted(target_linears(model))
    with torch.no_grad():
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old: nn.Linear = getattr(parent, child)
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, old.weight.dtype)
            new.weight, scale = Int8Linear.quantize(old.weight)
            new.weight_scale = scale.to(old.weight.dtype)
            if old.bias is not None:
                new.bias.copy_(old.bias)
            setattr(parent, child, new)
    return names


def compress(model: nn.Module, spec: CompressionSpec) -> dict[str, object]:
    """Apply the spec in place (prune, then cast, then quantize); returns config.json changes."""
    changes: dict[str, object] = {}
    if spec.prune and spec.prune_structure == "unstructured":
        prune_unstructured(model, spec.prune)
    elif spec.prune:
        changes["intermediate_size"] = prune_mlp_neurons(model, spec.prune)
    if spec.dtype:
        model.to(getattr(torch, spec.dtype))
        changes["torch_dtype"] = spec.dtype
    if spec.quantize == "int8":
        changes[QUANT_KEY] = {"method": "int8_weight_only", "modules": quantize_int8(model)}
    return changes


def save_compressed(model: nn.Module, source_dir: Path, out_dir: Path, changes: dict[str, object], spec: CompressionSpec) -> None:
    """Write the model as a shardserve-loadable directory: safetensors weights, the source's
    config (with `changes`), tokenizer and chat template, and the recorded spec."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in source_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            shutil.copy2(f, out_dir / f.name)
    config = json.loads((source_dir / "config.json").read_text())
    config.update(changes)
    if "torch_dtype" in changes:
        config["dtype"] = changes["torch_dtype"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for tied in _tied_duplicates(model, state):
        state.pop(tied)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "compression.json").write_text(json.dumps(asdict(spec), indent=2))


def _tied_duplicates(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys that share storage with an earlier key (tied embeddings): safetensors refuses them."""
    seen: dict[int, str] = {}
    dupes = []
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            dupes.append(key)
        else:
            seen[ptr] = key
    return dupes
