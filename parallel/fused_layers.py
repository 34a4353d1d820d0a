"""A decoder layer's element-wise steps as fused C kernels on CPU in float32 (kernels/layer_ops.c).

Eager torch runs a Llama layer's glue as some thirty operators (six per RMSNorm, a dozen for the
rotary embedding, two index_copy_ for the K/V write, the residual adds, SiLU and the gate's
product). At a decode step's few rows each one costs more in dispatch than in arithmetic: in
`python -m bench.step_profile` they were a fifth of a batch-1 forward. With these kernels a
layer is its linear layers, attention and five calls: add-and-norm twice, rotary-and-write once,
SiLU-and-multiply once (vLLM's CPU backend fuses the same steps in its C++ ops).

They apply where the arithmetic is the one they implement: float32 on CPU, pre-norm layers whose
norms scale by their weight (Llama, Mistral, Qwen2, Qwen3), a SiLU-gated MLP and rotary over the
whole head. Anything else (Gemma 3's sandwich norms and GELU, bfloat16, cuda) keeps the eager
modules, and `cpu_fused_ops: false` keeps them everywhere.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from parallel.architectures import Architecture
from parallel.cpu_kernels import KernelLibrary, KernelUnavailable

logger = logging.getLogger(__name__)

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
LAYER_OPS = KernelLibrary(
    "layer_ops",
    {
        "rms_norm_f32": ([_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32, _f32], None),
        "rope_kv_write_f32": ([_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64] + [_ptr] * 4, None),
        "silu_mul_f32": ([_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64], None),
    },
)

# transformers' RMSNorms that compute weight * (x * rsqrt(mean(x^2) + eps)) in float32.
WEIGHT_SCALED_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class FusedLayerOps:
    """The kernels' calls on tensors; `fused_layer_ops` decides whether a model gets them."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library

    def rms_norm(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x) for rows x [R, H]; with `residual` [R, H] (contiguous), residual += x first,
        in place, and the norm is of the sum (the layer's residual add, in the same pass)."""
        rows, hidden = x.shape
        assert x.stride(1) == 1 and (residual is None or residual.is_contiguous())
        out = torch.empty((rows, hidden), dtype=x.dtype)
        self._lib.rms_norm_f32(
            x.data_ptr(),
            x.stride(0),
            None if residual is None else residual.data_ptr(),
            norm.weight.data_ptr(),
            out.data_ptr(),
            rows,
            hidden,
            norm.variance_epsilon,
            0.0,
        )
        return out

    def rotary_and_write(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_blocks: torch.Tensor,
        v_blocks: torch.Tensor,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries [T, heads, d] and keys [T, kv_heads, d] of q, k ([T, heads * d]
        rows); the keys and v written to the pools at `slots`."""
        tokens = q.shape[0]
        heads, kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
        assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
        q_out = torch.empty((tokens, heads, head_dim), dtype=q.dtype)
        k_out = torch.empty((tokens, kv_heads, head_dim), dtype=k.dtype)
        self._lib.rope_kv_write_f32(
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            tokens,
            heads,
            kv_heads,
            head_dim,
            q_out.data_ptr(),
            k_out.data_ptr(),
            k_blocks.data_ptr(),
            v_blocks.data_ptr(),
        )
        return q_out, k_out

    def gated_mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)), the product in one pass."""
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        rows, n = gate.shape
        assert gate.stride(1) == up.stride(1) == 1
        product = torch.empty((rows, n), dtype=gate.dtype)
        self._lib.silu_mul_f32(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), product.data_ptr(), rows, n)
        return mlp.down_proj(product)


def fused_layer_ops(model: nn.Module, arch: Architecture, enabled: bool = True) -> FusedLayerOps | None:
    """The fused ops for this model, or None (with the reason in the log) where its layers are
    not what the kernels compute or they cannot be built here."""
    if not enabled:
        return None
    reason = _unfusable(model, arch)
    if reason is None:
        try:
            return FusedLayerOps(LAYER_OPS.load())
        except KernelUnavailable as exc:
            reason = f"the kernels are unavailable ({exc})"
    logger.info("layers run as eager torch ops: %s", reason)
    return None


def _unfusable(model: nn.Module, arch: Architecture) -> str | None:
    config = model.config
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"the fused kernels are for float32 on cpu, not {weight.dtype} on {weight.device.type}"
    if arch.layer != "pre_norm":
        return f"{arch.name} wires its norms as {arch.layer!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"the MLP's activation is {getattr(config, 'hidden_act', None)!r}, not silu"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "the rotary embedding covers part of each head"
    layer = model.model.layers[0]
    norms = [layer.input_layernorm, layer.post_attention_layernorm, model.model.norm]
    if arch.qk_norm:
        norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    odd = {type(n).__name__ for n in norms if n is not None} - WEIGHT_SCALED_RMS_NORMS
    if odd:
        return f"norms {sorted(odd)} are not the weight-scaled RMSNorm the kernel computes"
    if not all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return "the MLP is not gate/up/down"
    return None
