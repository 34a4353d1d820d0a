"""Int8 versions under tensor and pipeline parallelism.

DeepSpeed AutoTP shards `nn.Linear` layers only, so an int8 version is loaded into a rank as
float weights dequantized exactly as `Int8Linear` computes them (q * scale in the model's
dtype), sharded like any checkpoint, then quantized back with the checkpoint's own scales:
column-parallel shards take their rows' slice of the scale, row-parallel shards the whole of
it (the scale is per output channel, and the all-reduce sums before it would apply). Every
shard is checked to reproduce its dequantized weights bit for bit, so a rank computes what the
unsharded int8 model computes, and holds one byte per weight afterwards. The float copy lives
only while the stage loads (it is the stage's size, not the model's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from parallel.checkpoints.compression import dequantize, quantize_rows
from parallel.checkpoints.loading import ModelLoadError


class _Dequantize(nn.Module):
    """Parametrization of `weight`: int8 values held, float weights computed per forward
    (what `Int8Linear` does), so DeepSpeed's sharded layers run unchanged on top of it."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.scale, self.scale.dtype)


def requantize_shards(model: nn.Module, scales: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Turn the (possibly sharded) float linears named in `scales` back into int8 ones.

    `scales` maps a module name of this stage to the checkpoint's full per-output-channel scale.
    A column-parallel shard's rows start where the lower tensor-parallel ranks' rows end, which
    one all-gather of every layer's row count tells.
    """
    names = sorted(scales)
    rows = torch.tensor([model.get_submodule(n).weight.shape[0] for n in names], dtype=torch.int64)
    offsets = torch.zeros_like(rows)
    if group is not None and dist.get_world_size(group) > 1:
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, rows, group=group)
        offsets = sum(gathered[: dist.get_rank(group)], torch.zeros_like(rows))
    for name, n_rows, offset in zip(names, rows.tolist(), offsets.tolist(), strict=True):
        module = model.get_submodule(name)
        weight = module.weight.detach()
        full = scales[name]
        scale = full if n_rows == full.numel() else full[offset : offset + n_rows]
        q = quantize_rows(weight, scale)
        if scale.numel() != n_rows or not torch.equal(dequantize(q, scale, weight.dtype), weight):
            raise ModelLoadError(
                f"the int8 shard of {name} ({tuple(weight.shape)}) does not reproduce its checkpoint "
                "weights: the tensor-parallel split is not one this loader understands"
            )
        module.weight = nn.Parameter(q, requires_grad=False)
        parametrize.register_parametrization(module, "weight", _Dequantize(scale.to(weight.dtype).clone()), unsafe=True)
