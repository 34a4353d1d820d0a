"""The forward pass of the registered decoder architectures over a paged KV cache, a whole
step's batch at once.

The Hugging Face model supplies the weights and its modules (projections, norms, MLP, rotary
embedding); this file supplies what HF's own forward lacks for serving: tokens of many sequences
flattened into one batch (so every linear layer runs once per step), K/V written into fixed-size
blocks of a preallocated pool, and attention that reads each sequence's blocks through its block
table, masked to each layer's sliding window where it has one (`parallel.model.attention`, the seam a
device's paged kernel plugs into). What differs between families
(norm wiring, q/k norms, per-layer rotary tables) comes from `parallel.model.architectures`. The same
code runs under DeepSpeed AutoTP, which swaps the Linear modules for sharded ones: head counts
are read from the projections' output sizes, not from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.model.architectures import architecture_of, layer_type, layer_window
from parallel.model.attention import DecodeGroup, PagedAttention, Prefill, bucket_by_length, gather_sdpa
from parallel.model.fused_layers import FusedLayerOps
from parallel.runner import StepInput


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k [T, heads, d] by cos/sin [T, d], in the half-split layout of
    every registered architecture (transformers' `apply_rotary_pos_emb`; imported from there it
    pulled in the whole modeling stack, seconds of start in processes that never run a model)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedKVCache:
    """K and V for every layer: [num_layers, num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
        zeroed: bool = True,
    ) -> None:
        """`zeroed=False`: memory is taken only as blocks are written (a host tier, whose slots
        are read only after a copy wrote them, costs nothing until used)."""
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        make = torch.zeros if zeroed else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) held by this model: fewer layers on a pipeline stage,
    fewer heads when AutoTP has sharded the projections (read from the weights, not the config)."""
    attn = model.model.layers[0].self_attn
    weight = getattr(attn.k_proj, "weight", None)  # sharded layers' own; a PackedLinear keeps none
    k_rows = weight.shape[0] if weight is not None else attn.k_proj.out_features
    return len(model.model.layers), k_rows // attn.head_dim, attn.head_dim


@dataclass
class PreparedBatch:
    """Index tensors for one step, built once and shared by every layer.

    Attention reads K/V a whole block at a time (contiguous rows of block_size tokens), then
    masks the positions past each sequence's context.
    """

    input_ids: torch.Tensor  # [T] new tokens of all sequences, flattened
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each new token's K/V goes in the flat pool
    decode_groups: list[DecodeGroup]  # single-token sequences, bucketed by context length
    prefills: list[Prefill]
    logit_rows: torch.Tensor  # [S + P] flat rows whose logits are sampled, then those scoring prompt targets
    embed_rows: torch.Tensor  # [E] flat rows whose final hidden states are the step's embeddings


def prepare(step: StepInput, block_size: int, device: str | torch.device, one_decode_group: bool = False) -> PreparedBatch:
    """`one_decode_group`: every decode token in one group, for a backend that reads the blocks
    in place (no padding to bound, and its threads balance over all the sequences at once)."""
    ids: list[int] = []
    positions: list[int] = []
    slot_parts: list[torch.Tensor] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[Prefill] = []
    logit_rows: list[int] = []
    prompt_rows: list[int] = []
    embed_rows: list[int] = []
    for seq in step.seqs:
        row, n, start = len(ids), len(seq.token_ids), seq.start_pos
        ctx_len = start + n
        used = seq.block_table[: -(-ctx_len // block_size)]
        ids.extend(seq.token_ids)
        positions.extend(range(start, ctx_len))
        if n == 1:
            decode_rows.append(row)
            decode_tables.append(used)
            decode_lens.append(ctx_len)
            slot_parts.append(torch.tensor([used[start // block_size] * block_size + start % block_size]))
        else:
            blocks = torch.tensor(used)
            pos = torch.arange(start, ctx_len)
            slot_parts.append(blocks[pos // block_size] * block_size + pos % block_size)
            prefills.append(Prefill(row, n, start, blocks.to(device)))
        if seq.sample:
            logit_rows.append(row + n - 1)
        prompt_rows.extend(range(row, row + len(seq.prompt_targets)))
        if seq.embed:
            embed_rows.append(row + n - 1)
    groups = []
    buckets = [list(range(len(decode_lens)))] if one_decode_group and decode_lens else bucket_by_length(decode_lens)
    for members in buckets:
        width = max(len(decode_tables[i]) for i in members)
        tables = torch.zeros((len(members), width), dtype=torch.long)
        for k, i in enumerate(members):
            tables[k, : len(decode_tables[i])] = torch.tensor(decode_tables[i])
        groups.append(
            DecodeGroup(
                rows=torch.tensor([decode_rows[i] for i in members], dtype=torch.long, device=device),
                blocks=tables.to(device),
                lengths=torch.tensor([decode_lens[i] for i in members], dtype=torch.long, device=device),
                block_size=block_size,
            )
        )
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return PreparedBatch(
        input_ids=as_long(ids),
        positions=as_long(positions),
        slots=torch.cat(slot_parts).to(device),
        decode_groups=groups,
        prefills=prefills,
        logit_rows=as_long(logit_rows + prompt_rows),
        embed_rows=as_long(embed_rows),
    )


@dataclass(frozen=True)
class StageOutput:
    values: torch.Tensor
    """Logits rows on the last stage, hidden states [T, H] on the others."""
    pooled: torch.Tensor | None = None
    """[E, H] final hidden states at the batch's embed_rows (last stage only)."""


class PagedCausalLM:
    """Wraps a loaded HF causal LM of a registered architecture, whole or one pipeline stage.

    A stage model holds only its decoder layers; the first stage also has the embeddings, the
    last the final norm and LM head (absent modules are None). The KV pool covers the layers
    held here, and the heads held here when AutoTP has sharded the projections. Each layer's
    window and rotary table come from its index in the whole model (`self_attn.layer_idx`), so
    a stage of Gemma 3 knows which of its layers are local. With `fused` (parallel.model.fused_layers,
    for the models it applies to) the layers' norms, residual adds, rotary embedding, K/V write
    and SiLU gate run as C kernels, and q/k/v (gate/up) are one call where the runner fused them;
    attention is the same backend either way.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        attention: PagedAttention = gather_sdpa,
        fused: FusedLayerOps | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.attention = attention
        self.fused = fused
        self.one_decode_group: bool = getattr(attention, "reads_blocks_in_place", False)
        """What `prepare` is told for this backend."""
        config = model.config
        self.arch = architecture_of(config)
        self.layers = list(model.model.layers)
        self.head_dim = self.layers[0].self_attn.head_dim
        indices = [layer.self_attn.layer_idx for layer in self.layers]
        self.windows = [layer_window(config, i) for i in indices]
        self.rope_keys = [layer_type(config, i) if self.arch.rope_per_layer_type else None for i in indices]
        self.logit_softcap: float | None = getattr(config, "final_logit_softcapping", None)

    def prepare(self, step: StepInput) -> PreparedBatch:
        """The step's index tensors for this pool (its block size and device) and backend."""
        return prepare(step, self.cache.block_size, self.cache.k.device, self.one_decode_group)

    def forward(self, batch: PreparedBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits rows to sample from on the last stage; hidden states [T, H] otherwise."""
        return self.forward_outputs(batch, hidden).values

    @torch.inference_mode()
    def forward_outputs(self, batch: PreparedBatch, hidden: torch.Tensor | None = None) -> StageOutput:
        """The last stage's logits rows and pooled hidden states (embed_rows); a middle stage's
        hidden states [T, H] for the next.

        The first stage embeds the batch's token ids; a later stage continues from `hidden`,
        the previous stage's output.
        """
        inner = self.model.model
        if inner.embed_tokens is not None:
            hidden = inner.embed_tokens(batch.input_ids)  # [T, H]
        assert hidden is not None, "a stage without embeddings needs the previous stage's hidden states"
        rotary = {}
        for key in dict.fromkeys(self.rope_keys):
            args = (hidden, batch.positions[None, :]) if key is None else (hidden, batch.positions[None, :], key)
            cos, sin = inner.rotary_emb(*args)
            rotary[key] = (cos[0], sin[0])  # [T, d]
        if self.fused is not None:
            hidden = self._fused_layers(hidden if inner.embed_tokens is not None else hidden.clone(), rotary, batch)
        else:
            hidden = self._layers(hidden, rotary, batch)
        if self.model.lm_head is None:
            return StageOutput(hidden)
        last = self._final_norm(hidden[batch.logit_rows])
        logits = self.model.lm_head(last.unsqueeze(0))[0]  # 3-D in: AutoTP's sharded head slices dim 2
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        pooled = self._final_norm(hidden[batch.embed_rows]) if batch.embed_rows.numel() else None
        return StageOutput(logits, pooled)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.model.model.norm
        return norm(hidden) if self.fused is None else self.fused.rms_norm(norm, hidden)

    def _layers(self, hidden: torch.Tensor, rotary: dict, batch: PreparedBatch) -> torch.Tensor:
        sandwich = self.arch.layer == "sandwich"
        for layer_idx, layer in enumerate(self.layers):
            cos, sin = rotary[self.rope_keys[layer_idx]]
            x = layer.input_layernorm(hidden)
            attn_out = layer.self_attn.o_proj(self._attention(layer.self_attn, layer_idx, x, cos, sin, batch))
            if sandwich:
                hidden = hidden + layer.post_attention_layernorm(attn_out)
                hidden = hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
            else:
                hidden = hidden + attn_out
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _fused_layers(self, residual: torch.Tensor, rotary: dict, batch: PreparedBatch) -> torch.Tensor:
        """The pre-norm layers with each residual add folded into the next norm's pass: the
        residual stream is updated in place (`residual` must be this forward's own tensor)."""
        ops = self.fused
        assert ops is not None
        mlp_out: torch.Tensor | None = None
        for layer_idx, layer in enumerate(self.layers):
            cos, sin = rotary[self.rope_keys[layer_idx]]
            if mlp_out is None:
                x = ops.rms_norm(layer.input_layernorm, residual)
            else:
                x = ops.rms_norm(layer.input_layernorm, mlp_out, residual)
            attn_out = layer.self_attn.o_proj(self._attention(layer.self_attn, layer_idx, x, cos, sin, batch))
            x = ops.rms_norm(layer.post_attention_layernorm, attn_out, residual)
            mlp_out = ops.gated_mlp(layer.mlp, x)
        return residual if mlp_out is None else residual.add_(mlp_out)

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
        k_blocks, v_blocks = self.cache.k[layer_idx], self.cache.v[layer_idx]  # [NB, bs, kvh, d]
        if self.fused is not None:
            q, k, v = self.fused.qkv(attn, x)
            if self.arch.qk_norm:  # the rows of each head (columns of a fused projection: copied)
                q = self.fused.rms_norm(attn.q_norm, q.reshape(-1, d)).view(tokens, -1)
                k = self.fused.rms_norm(attn.k_norm, k.reshape(-1, d)).view(tokens, -1)
            q, k = self.fused.rotary_and_write(q, k, v, cos, sin, batch.slots, k_blocks, v_blocks, d)
            v = v.unflatten(1, (-1, d))  # a view, also of a fused projection's columns
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k, v = q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
            if self.arch.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary(q, k, cos, sin)
            kv_heads = k_blocks.shape[2]
            k_blocks.view(-1, kv_heads, d).index_copy_(0, batch.slots, k)
            v_blocks.view(-1, kv_heads, d).index_copy_(0, batch.slots, v)
        window = self.windows[layer_idx]
        out = self.attention(q, k, v, k_blocks, v_blocks, batch.decode_groups, batch.prefills, window, attn.scaling)
        return out.reshape(tokens, -1)
