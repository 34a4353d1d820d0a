"""A decoder layer's element-wise steps as fused C kernels on CPU in float32 (kernels/layer_ops.c).

Eager torch runs a Llama layer's glue as some thirty operators (six per RMSNorm, a dozen for the
rotary embedding, two index_copy_ for the K/V write, the residual adds, SiLU and the gate's
product). At a decode step's few rows each one costs more in dispatch than in arithmetic: in
`python -m bench.step_profile` they were a fifth of a batch-1 forward. With these kernels a
layer is its linear layers, attention and four calls: add-and-norm twice, rotary-and-write once,
SiLU-and-multiply once (vLLM's CPU backend fuses the same steps in its C++ ops). In a model of
one rank, q/k/v and gate/up are also fused into one linear layer each (`fuse_projections`, as
vLLM's QKVParallelLinear and MergedColumnParallelLinear are): at a decode step's few rows each
oneDNN call has a fixed cost, and a layer makes three calls instead of six.

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

from parallel.model.architectures import Architecture
from parallel.model.cpu_kernels import KernelLibrary, KernelUnavailable

logger = logging.getLogger(__name__)

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
LAYER_OPS = KernelLibrary(
    "layer_ops",
    {
        "rms_norm_f32": ([_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32], None),
        "rope_kv_write_f32": ([_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64] + [_ptr] * 4, None),
        "silu_mul_f32": ([_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64], None),
    },
)

# transformers' RMSNorms that compute weight * (x * rsqrt(mean(x^2) + eps)) in float32.
WEIGHT_SCALED_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class ProjectionSlice(nn.Module):
    """Columns [lo, hi) of the fused projection that `owner` holds as `name`: what q_proj,
    k_proj and v_proj (gate_proj, up_proj) become once fused. The model's own forward
    (transformers', which tests and the bench's raw loop still call) computes the fused layer
    and keeps its columns; the paged forward calls the fused layer once for all of them."""

    def __init__(self, owner: nn.Module, name: str, lo: int, hi: int) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child: packing must meet the fused layer once
        self.name, self.lo, self.hi = name, lo, hi
        self.out_features = hi - lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._owner, self.name)(x)[..., self.lo : self.hi]

    def extra_repr(self) -> str:
        return f"{self.name}[{self.lo}:{self.hi}]"


def fuse_projections(model: nn.Module) -> int:
    """Give each layer's attention a `qkv_proj` and its MLP a `gate_up_proj` (plain nn.Linear,
    for pack_linears to pack next), their parts becoming ProjectionSlices; returns how many
    fused layers were made. Only plain nn.Linear parts are fused (DeepSpeed's sharded layers
    split q, k and v by name; int8 layers keep theirs)."""
    made = 0
    for layer in model.model.layers:
        made += _fuse(layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        made += _fuse(layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"))
    return made


def _fuse(owner: nn.Module, name: str, parts: tuple[str, ...]) -> bool:
    linears = [getattr(owner, part) for part in parts]
    if not all(type(linear) is nn.Linear for linear in linears):
        return False
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.utils.skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=any(linear.bias is not None for linear in linears),
        device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        biases = [linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features) for linear in linears]
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    setattr(owner, name, fused)
    lo = 0
    for part, linear in zip(parts, linears, strict=True):
        setattr(owner, part, ProjectionSlice(owner, name, lo, lo + linear.out_features))
        lo += linear.out_features
    return True


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

    @staticmethod
    def qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections of x: one call of the fused layer where there is one (column views)."""
        fused = getattr(attn, "qkv_proj", None)
        if fused is None:
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = fused(x).split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features], dim=1)
        return q, k, v

    def gated_mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)), the product in one pass."""
        fused = getattr(mlp, "gate_up_proj", None)
        if fused is None:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        else:
            gate, up = fused(x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=1)
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
    if reason is not None:  # not what the kernels compute: nothing is lost
        logger.info("layers run as eager torch ops: %s", reason)
        return None
    try:
        return FusedLayerOps(LAYER_OPS.load())
    except KernelUnavailable as exc:
        logger.warning(
            "CPU fused layer kernels unavailable (%s): layers run as eager torch ops, several times the element-wise "
            "passes a step (decode 5-15%% slower; install a C compiler with OpenMP, or set cpu_fused_ops: false "
            "to silence this)",
            exc,
        )
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
