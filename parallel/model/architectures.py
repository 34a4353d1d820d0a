"""The architectures the paged forward runs, and what each needs from it: one registry.

Every entry is verified against transformers' own forward (eager attention) on small
random-weight models built from the real checkpoints' config fields (tests/test_architectures.py):
logits, greedy tokens, chunked prefill, prefix-cache hits, tp=2 and pp=2. A checkpoint whose
`architectures` names none of them is refused at load, naming the supported ones, rather than
run through code that was never checked against it.

What differs between the families is small and declared here, not discovered by probing
modules: how a decoder layer wires its norms around attention and the MLP, whether queries and
keys are normalised per head, whether rotary tables differ by layer type, and which layers
attend through a sliding window (read from the config the way transformers reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig

# Rotary types whose tables depend on the longest position in the batch (transformers updates
# them in `dynamic_rope_update`): in a batch of many sequences one request's length would change
# another's answer, so they are refused instead of served wrong.
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture, or a feature of its config, is not one the forward runs."""


@dataclass(frozen=True)
class Architecture:
    name: str
    """The `architectures` entry of config.json."""

    family: str
    """Which checkpoints it covers, for the README's table."""

    checked_with: str
    """The real checkpoints whose config fields the tests build their small models from."""

    layer: Literal["pre_norm", "sandwich"] = "pre_norm"
    """pre_norm: `h + attn(norm(h))`, then `h + mlp(norm(h))` (Llama). sandwich: each block's
    output is normalised too before the residual add (Gemma 3's four norms per layer)."""

    qk_norm: bool = False
    """Queries and keys go through a per-head RMSNorm before the rotary embedding (Qwen3, Gemma 3)."""

    rope_per_layer_type: bool = False
    """Sliding and full-attention layers use different rotary tables (Gemma 3: local base 10k,
    global 1M with scaling); the HF rotary module takes the layer type."""


REGISTRY: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(
            "LlamaForCausalLM",
            "Llama 2, Llama 3.x (rope scaling `llama3`, tied or untied embeddings, GQA)",
            "Llama-2-7b-chat, Llama-3.1-8B-Instruct, Llama-3.2-1B-Instruct",
        ),
        Architecture(
            "MistralForCausalLM",
            "Mistral 7B v0.1-v0.3 (sliding window)",
            "Mistral-7B-Instruct-v0.1",
        ),
        Architecture(
            "Qwen2ForCausalLM",
            "Qwen2, Qwen2.5 (q/k/v bias; sliding layers when `use_sliding_window`)",
            "Qwen2.5-7B-Instruct",
        ),
        Architecture(
            "Qwen3ForCausalLM",
            "Qwen3 dense (q/k norms, `head_dim` independent of hidden size)",
            "Qwen3-0.6B, Qwen3-8B",
            qk_norm=True,
        ),
        Architecture(
            "Gemma3ForCausalLM",
            "Gemma 3 text (interleaved local/global attention, per-layer rotary, sandwich norms, q/k norms)",
            "gemma-3-1b-it, gemma-3-27b-it (text tower)",
            layer="sandwich",
            qk_norm=True,
            rope_per_layer_type=True,
        ),
    ]
}


def supported_names() -> list[str]:
    return sorted(REGISTRY)


def architecture_of(hf_config: PretrainedConfig) -> Architecture:
    """The registry entry for a checkpoint's config, or UnsupportedArchitecture saying why."""
    names = list(getattr(hf_config, "architectures", None) or [])
    found = [REGISTRY[n] for n in names if n in REGISTRY]
    if not found:
        named = names or "(none in config.json)"
        raise UnsupportedArchitecture(f"architecture {named} is not supported; supported: {supported_names()}")
    arch = found[0]
    _check_features(arch, hf_config)
    return arch


def _check_features(arch: Architecture, hf_config: PretrainedConfig) -> None:
    """Config features the forward does not implement: refused, never ignored."""
    refused: list[str] = []
    for params in _rope_parameter_sets(hf_config):
        if params.get("rope_type") in LENGTH_DEPENDENT_ROPE:
            refused.append(f"rope_type {params['rope_type']!r} (its tables depend on the batch's longest sequence)")
    if getattr(hf_config, "attn_logit_softcapping", None) is not None:
        refused.append("attn_logit_softcapping")
    if getattr(hf_config, "use_bidirectional_attention", False):
        refused.append("use_bidirectional_attention (an embedding model, not a causal LM)")
    if refused:
        raise UnsupportedArchitecture(f"{arch.name} with {', '.join(refused)} is not supported")


def _rope_parameter_sets(hf_config: PretrainedConfig) -> list[dict]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        return list(params.values())
    return [params] if params else []


def layer_type(hf_config: PretrainedConfig, layer_idx: int) -> str:
    types = getattr(hf_config, "layer_types", None)
    return types[layer_idx] if types else "full_attention"


def layer_window(hf_config: PretrainedConfig, layer_idx: int) -> int | None:
    """Keys a query of this layer sees (itself included), or None for full attention, read as
    transformers reads it: per `layer_types` where the config has them (Qwen2, Qwen3, Gemma 3),
    else `sliding_window` for every layer (Mistral)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    if getattr(hf_config, "layer_types", None):
        return window if layer_type(hf_config, layer_idx) == "sliding_attention" else None
    return window
