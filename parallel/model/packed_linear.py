"""Linear layers on CPU through oneDNN, each weight reordered once at load for it.

`F.linear` on CPU calls MKL's sgemm, which reads the weight in its plain layout on every call.
At the row counts of a decode step (one to a few dozen tokens) that is the step's largest cost,
and oneDNN's matmul over a weight reordered once into its own blocked layout is faster: on this
project's 2-core AMD machine, for `shardserve/bench-llama`'s shapes, 1.5-1.8x at 8 rows for the
layers' projections and 3-4x for the LM head (bench.step_profile shows the step). This is what
torch's Inductor does for a frozen CPU model and what vLLM's CPU backend does through its own
oneDNN extension. The ops called here are the ones Inductor's freezing pass emits
(`torch.ops.mkldnn`); torch has no public Python wrapper with a prepacked weight
(`torch.utils.mkldnn.MkldnnLinear` converts the activations on every call and measured slower
than plain sgemm at decode sizes).

Only exact `nn.Linear` modules are packed: DeepSpeed's sharded layers, int8 layers and anything
else keep their own forward. A weight oneDNN cannot reorder on this CPU (bf16 needs AVX-512 or
AVX-NE-CONVERT) stays as it is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

BATCH_HINT = 32  # rows oneDNN picks the layout for; decode batches and prefill chunks both run well


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's layout; the dense weight is released."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        # Not a parameter or buffer: an opaque mkldnn tensor has no storage to count or share.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of a CPU model by a PackedLinear; returns how many.

    Call it last, after sharding and weight counting: a packed weight is no parameter any more.
    A tied LM head keeps its embedding's dense weight and gets a packed copy (vocab x hidden
    more memory, as vLLM's CPU backend spends; the LM head is the step's largest matmul)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    targets = [
        (parent, name, child) for parent in model.modules() for name, child in parent.named_children() if type(child) is nn.Linear
    ]
    packed = 0
    for parent, name, linear in targets:
        if linear.weight.device.type != "cpu" or linear.weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        try:
            setattr(parent, name, PackedLinear(linear))
        except RuntimeError as exc:  # this CPU's ISA lacks the reorder for the dtype: all stay dense
            logger.info("linear layers stay on sgemm: %s", exc)
            break
        packed += 1
    return packed
