"""Attention over the paged KV pool: the one seam where a device's paged kernel plugs in.

`PagedAttention` is what the forward calls once per layer, after the step's K/V has been
written to the pool: the step's queries, its own new K/V (prefills that start a sequence attend
to these alone), the layer's K/V blocks, and the step's sequences as decode groups and prefill
chunks. `gather_sdpa`, the backend every device has, gathers each group's blocks into one
padded tensor and calls torch's scaled_dot_product_attention, which dispatches to its fused CPU
kernel (and on cuda to flash or memory-efficient attention). A paged kernel that reads the blocks
in place (vLLM's and FlashInfer's shape: block tables and context lengths) takes the same
arguments and skips the gather: `parallel.model.cpu_attention.cpu_paged` does so for CPU decode tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    """Decode sequences of similar context length, attended to in one padded call."""

    rows: torch.Tensor  # [D] flat rows of the sequences' tokens
    blocks: torch.Tensor  # [D, max_blocks] block tables, padded with block 0
    lengths: torch.Tensor  # [D] context length of each sequence (its new token included)
    block_size: int
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """[D, 1, 1, max_blocks * block_size]: True for the keys the new token attends to, the
        real context within the layer's window; made once per step for each window."""
        if window not in self._masks:
            keys = torch.arange(self.blocks.shape[1] * self.block_size, device=self.lengths.device)[None, :]
            allowed = keys < self.lengths[:, None]
            if window is not None:
                allowed &= keys >= (self.lengths - window)[:, None]
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


@dataclass
class Prefill:
    """A prompt (or a chunk of one) of n tokens starting at position `start`."""

    row: int  # first flat row of its tokens
    n: int
    start: int
    blocks: torch.Tensor  # the blocks holding positions [0, start + n)
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None, block_size: int) -> torch.Tensor | None:
        """[n, keys]: which keys each query sees, causal and within the window; None when the
        chunk starts the sequence and has no window (plain causal attention over its own K/V).
        Keys are the chunk's own when it starts at 0, else every position of its blocks."""
        if window not in self._masks:
            device = self.blocks.device
            queries = self.start + torch.arange(self.n, device=device)[:, None]
            if self.start == 0 and window is None:
                self._masks[window] = None
            else:
                num_keys = self.n if self.start == 0 else self.blocks.numel() * block_size
                keys = torch.arange(num_keys, device=device)[None, :]
                allowed = keys <= queries
                if window is not None:
                    allowed &= keys > queries - window
                self._masks[window] = allowed
        return self._masks[window]


def bucket_by_length(lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest wastes at most max_waste of
    the gathered K/V (gathering padded context dominates decode time on CPU)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is not None:
            total = sum(lengths[j] for j in group) + lengths[i]
            if lengths[i] * (len(group) + 1) <= (1 + max_waste) * total:
                group.append(i)
                continue
        groups.append([i])
    return groups


class PagedAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_blocks: torch.Tensor,
        v_blocks: torch.Tensor,
        decode_groups: list[DecodeGroup],
        prefills: list[Prefill],
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """[T, heads, head_dim] attention output for q [T, heads, head_dim]; k, v [T, kv_heads,
        head_dim] are the step's own (already in the pool too); blocks [num_blocks, block_size,
        kv_heads, head_dim]; `window` the layer's sliding window (None: full context)."""
        ...


def gather_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    decode_groups: list[DecodeGroup],
    prefills: list[Prefill],
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Each decode group's blocks gathered and attended to in one padded SDPA call; each
    prefill chunk in one causal call (over its own K/V, or its blocks when it continues a
    sequence). The gather is the cost a paged kernel saves (a quarter of a decode step at batch
    16 on CPU: bench/step_profile.py; parallel/model/cpu_attention.py reads the blocks in place)."""
    kv_heads, d = k_blocks.shape[2], k_blocks.shape[3]
    out = torch.empty_like(q)
    for group in decode_groups:
        rows = group.rows.numel()
        qd = q[group.rows].unsqueeze(2)  # [D, h, 1, d]
        flat_blocks = group.blocks.flatten()
        kd = k_blocks.index_select(0, flat_blocks).view(rows, -1, kv_heads, d).transpose(1, 2)  # [D, kvh, L, d]
        vd = v_blocks.index_select(0, flat_blocks).view(rows, -1, kv_heads, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask(window), scale=scale, enable_gqa=True)
        out[group.rows] = od.squeeze(2)
    attend_prefills(out, q, k, v, k_blocks, v_blocks, prefills, window, scale)
    return out


def attend_prefills(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    prefills: list[Prefill],
    window: int | None,
    scale: float,
) -> None:
    """Each prefill chunk's attention into its rows of out, in one causal SDPA call (over its
    own K/V, or its blocks when it continues a sequence)."""
    block_size, kv_heads, d = k_blocks.shape[1], k_blocks.shape[2], k_blocks.shape[3]
    for p in prefills:
        qp = q[p.row : p.row + p.n].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
        mask = p.mask(window, block_size)
        if p.start == 0:  # nothing cached before this chunk: attend to its own K/V
            kp = k[p.row : p.row + p.n].transpose(0, 1).unsqueeze(0)
            vp = v[p.row : p.row + p.n].transpose(0, 1).unsqueeze(0)
        else:
            kp = k_blocks.index_select(0, p.blocks).view(-1, kv_heads, d).transpose(0, 1).unsqueeze(0)  # [1, kvh, L, d]
            vp = v_blocks.index_select(0, p.blocks).view(-1, kv_heads, d).transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        out[p.row : p.row + p.n] = op[0].transpose(0, 1)
