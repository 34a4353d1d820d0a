"""A Llama-family forward pass over a paged KV cache, a whole step's batch at once.

The Hugging Face model supplies the weights and its modules (projections, norms, MLP, rotary
embedding); this file supplies what HF's own forward lacks for serving: tokens of many sequences
flattened into one batch (so every linear layer runs once per step), K/V written into fixed-size
blocks of a preallocated pool, and attention that reads each sequence's blocks through its block
table. The same code runs under DeepSpeed AutoTP, which swaps the Linear modules for sharded
ones: head counts are read from the projections' output sizes, not from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from parallel.runner import StepInput

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class PagedKVCache:
    """K and V for every layer: [num_layers, num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class PreparedBatch:
    """Index tensors for one step, built once and shared by every layer."""

    input_ids: torch.Tensor  # [T] new tokens of all sequences, flattened
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each new token's K/V goes in the flat pool
    decode_rows: torch.Tensor  # [D] flat rows of single-token (decode) sequences
    decode_ctx: torch.Tensor  # [D, Lmax] pool slots of each decode sequence's context (padded)
    decode_mask: torch.Tensor  # [D, 1, 1, Lmax] True where the context is real
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (row start, n, first position, ctx slots)
    logit_rows: torch.Tensor  # [S] flat rows whose logits are sampled


def prepare(step: StepInput, block_size: int, device: str) -> PreparedBatch:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode_rows: list[int] = []
    decode_ctx: list[list[int]] = []
    prefills: list[tuple[int, int, int, torch.Tensor]] = []
    logit_rows: list[int] = []
    for seq in step.seqs:
        row, n, start = len(ids), len(seq.token_ids), seq.start_pos
        table = seq.block_table
        ctx_slots = [table[p // block_size] * block_size + p % block_size for p in range(start + n)]
        ids.extend(seq.token_ids)
        positions.extend(range(start, start + n))
        slots.extend(ctx_slots[start:])
        if n == 1:
            decode_rows.append(row)
            decode_ctx.append(ctx_slots)
        else:
            prefills.append((row, n, start, torch.tensor(ctx_slots, device=device)))
        if seq.sample:
            logit_rows.append(row + n - 1)
    longest = max((len(c) for c in decode_ctx), default=0)
    ctx = torch.zeros((len(decode_ctx), longest), dtype=torch.long)
    mask = torch.zeros((len(decode_ctx), longest), dtype=torch.bool)
    for i, c in enumerate(decode_ctx):
        ctx[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return PreparedBatch(
        input_ids=as_long(ids),
        positions=as_long(positions),
        slots=as_long(slots),
        decode_rows=as_long(decode_rows),
        decode_ctx=ctx.to(device),
        decode_mask=mask[:, None, None, :].to(device),
        prefills=prefills,
        logit_rows=as_long(logit_rows),
    )


class PagedCausalLM:
    """Wraps a loaded HF causal LM; `forward` returns the logits rows to sample from."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache) -> None:
        arch = type(model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        self.model = model
        self.cache = cache
        self.layers = list(model.model.layers)
        self.head_dim = self.layers[0].self_attn.head_dim

    @torch.inference_mode()
    def forward(self, batch: PreparedBatch) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(batch.input_ids)  # [T, H]
        cos, sin = inner.rotary_emb(hidden, batch.positions[None, :])
        cos, sin = cos[0], sin[0]  # [T, d]
        for layer_idx, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn_out = self._attention(layer.self_attn, layer_idx, x, cos, sin, batch)
            hidden = residual + layer.self_attn.o_proj(attn_out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = inner.norm(hidden[batch.logit_rows])
        return self.model.lm_head(last)

    def _attention(
        self,
        attn: torch.nn.Module,
        layer_idx: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: PreparedBatch,
    ) -> torch.Tensor:
        d = self.head_dim
        tokens = x.shape[0]
        q = attn.q_proj(x).view(tokens, -1, d)
        k = attn.k_proj(x).view(tokens, -1, d)
        v = attn.v_proj(x).view(tokens, -1, d)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_pool[batch.slots] = k
        v_pool[batch.slots] = v
        out = torch.empty_like(q)
        scale = attn.scaling
        if batch.decode_rows.numel():
            qd = q[batch.decode_rows].unsqueeze(2)  # [D, h, 1, d]
            kd = k_pool[batch.decode_ctx].transpose(1, 2)  # [D, kvh, L, d]
            vd = v_pool[batch.decode_ctx].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=scale, enable_gqa=True)
            out[batch.decode_rows] = od.squeeze(2)
        for row, n, start, ctx in batch.prefills:
            qp = q[row : row + n].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            kp = k_pool[ctx].transpose(0, 1).unsqueeze(0)  # [1, kvh, ctx, d]
            vp = v_pool[ctx].transpose(0, 1).unsqueeze(0)
            causal = (
                torch.arange(ctx.numel(), device=x.device)[None, :]
                <= (start + torch.arange(n, device=x.device))[:, None]
            )
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal, scale=scale, enable_gqa=True)
            out[row : row + n] = op[0].transpose(0, 1)
        return out.reshape(tokens, -1)
