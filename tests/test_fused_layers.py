"""The fused layer kernels (parallel/model/fused_layers.py) against the transformers modules and the
eager code they stand in for: RMSNorm with and without the residual add, rotary embedding with
the K/V write, the SiLU-gated MLP; which models get them; what a machine without a compiler gets.
Whole models through the fused path against transformers' forward are in test_architectures.py.
No Ray: model side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from parallel.checkpoints.shaped_models import write_shaped_checkpoint
from parallel.model.architectures import architecture_of
from parallel.model.fused_layers import LAYER_OPS, FusedLayerOps, ProjectionSlice, fuse_projections, fused_layer_ops
from parallel.model.packed_linear import pack_linears
from parallel.model.paged_model import apply_rotary

from .conftest import needs_c_compiler as needs_kernels

CONFIG = LlamaConfig(
    hidden_size=96,
    intermediate_size=200,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)  # fmt: skip


@pytest.fixture(scope="module")
def ops() -> FusedLayerOps:
    return FusedLayerOps(LAYER_OPS.load())


def _norm(generator: torch.Generator) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(CONFIG.hidden_size, eps=CONFIG.rms_norm_eps)
    norm.weight.data = torch.randn(CONFIG.hidden_size, generator=generator)
    return norm


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 1024])  # a decode row, a batch, a prefill chunk (over the threads)
def test_rms_norm_is_transformers_with_and_without_the_residual_add(ops: FusedLayerOps, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    norm = _norm(g)
    x, residual = 3 * torch.randn(rows, CONFIG.hidden_size, generator=g), torch.randn(rows, CONFIG.hidden_size, generator=g)
    with torch.no_grad():
        assert torch.allclose(ops.rms_norm(norm, x), norm(x), atol=1e-5, rtol=1e-5)
        updated = residual.clone()
        got = ops.rms_norm(norm, x, updated)
        assert torch.equal(updated, residual + x)  # the layer's residual add, in place
        assert torch.allclose(got, norm(residual + x), atol=1e-5, rtol=1e-5)
        wide = torch.randn(rows, 3 * CONFIG.hidden_size, generator=g)
        view = wide[:, 40 : 40 + CONFIG.hidden_size]  # rows of a wider tensor: strided
        assert torch.allclose(ops.rms_norm(norm, view), norm(view), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fused_projection", [False, True])
def test_rotary_and_write_is_apply_rotary_then_index_copy(ops: FusedLayerOps, fused_projection: bool) -> None:
    """Every query and key rotated as the eager code rotates them, the keys and values written
    to their slots and nowhere else; q/k/v as separate tensors or column views of one."""
    g = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, d, num_blocks, block = 6, 8, 2, 32, 10, 4
    positions = torch.tensor([0, 1, 2, 37, 38, 200])
    cos, sin = LlamaRotaryEmbedding(CONFIG)(torch.zeros(1), positions[None, :])
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    widths = [heads * d, kv_heads * d, kv_heads * d]
    if fused_projection:
        q, k, v = torch.randn(tokens, sum(widths), generator=g).split(widths, dim=1)
    else:
        q, k, v = (torch.randn(tokens, w, generator=g) for w in widths)
    slots = torch.tensor([0, 1, 2, 17, 18, 39])
    k_pool = torch.full((num_blocks, block, kv_heads, d), 7.0)
    v_pool = torch.full((num_blocks, block, kv_heads, d), 7.0)
    q_rot, k_rot = ops.rotary_and_write(q, k, v, cos, sin, slots, k_pool, v_pool, d)

    expected_q, expected_k = apply_rotary(q.reshape(tokens, heads, d), k.reshape(tokens, kv_heads, d), cos, sin)
    assert torch.allclose(q_rot, expected_q, atol=1e-6) and torch.allclose(k_rot, expected_k, atol=1e-6)
    expected_k_pool = torch.full_like(k_pool, 7.0)
    expected_v_pool = torch.full_like(v_pool, 7.0)
    expected_k_pool.view(-1, kv_heads, d).index_copy_(0, slots, expected_k)
    expected_v_pool.view(-1, kv_heads, d).index_copy_(0, slots, v.reshape(tokens, kv_heads, d))
    assert torch.allclose(k_pool, expected_k_pool, atol=1e-6) and torch.equal(v_pool, expected_v_pool)


@needs_kernels
@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: exp(-x) far past float range on both sides
def test_gated_mlp_is_transformers(ops: FusedLayerOps, scale: float) -> None:
    g = torch.Generator().manual_seed(2)
    mlp = LlamaMLP(CONFIG)
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=g) / 10
    x = scale * torch.randn(9, CONFIG.hidden_size, generator=g)
    with torch.no_grad():
        expected = mlp(x)
        got = ops.gated_mlp(mlp, x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=1e-5), (got - expected).abs().max()


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory):
    def load(name: str, dtype: torch.dtype = torch.float32, **overrides):
        from transformers import AutoModelForCausalLM

        path = write_shaped_checkpoint(name, tmp_path_factory.mktemp(name), **overrides)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, architecture_of(model.config)

    return load


@needs_kernels
def test_which_models_get_the_fused_layers(shaped) -> None:
    for name in ("llama-3.2-1b-instruct", "mistral-7b-v0.1", "qwen2.5-7b-instruct", "qwen3-0.6b"):
        assert fused_layer_ops(*shaped(name)) is not None, name
    assert fused_layer_ops(*shaped("qwen3-0.6b"), enabled=False) is None  # cpu_fused_ops: false
    assert fused_layer_ops(*shaped("gemma-3-1b-it")) is None  # sandwich norms, GELU
    assert fused_layer_ops(*shaped("llama-3.2-1b-instruct", dtype=torch.bfloat16)) is None
    assert fused_layer_ops(*shaped("llama-3.2-1b-instruct", hidden_act="gelu")) is None


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "llama-3.2-1b-instruct"])  # q/k/v bias; a tied head
def test_fused_projections_keep_the_models_own_forward(shaped, name: str) -> None:
    """q/k/v and gate/up fused into one layer each: transformers' forward over the model is what
    it was (tests and the bench's raw loop call it), and packing meets each fused layer once."""
    model, _ = shaped(name)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        expected = model(ids).logits
    layers = len(model.model.layers)
    assert fuse_projections(model) == 2 * layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(isinstance(p, ProjectionSlice) for p in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
    assert attn.qkv_proj.out_features == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    assert pack_linears(model) == 4 * layers + 1  # qkv, o, gate_up, down; the LM head
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert fuse_projections(model) == 0  # packed layers are not fused again


def test_without_a_compiler_the_layers_run_eagerly(tmp_path: Path) -> None:
    model = write_shaped_checkpoint("llama-3.2-1b-instruct", tmp_path / "model")
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from deployments.config import ShardserveArgs\n"
        "from parallel.runners.local_runner import LocalModelRunner\n"
        f"args = ShardserveArgs(model={str(model)!r}, attention_backend='gather_sdpa')\n"
        "runner = LocalModelRunner(args.model_spec(), args.kv_cache_spec())\n"
        "print(runner.load().fused_ops)\n"
    )
    # An empty cache: no kernel built earlier is found.
    env = {**os.environ, "CC": "/nonexistent/cc", "SHARDSERVE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    warning = next(line for line in done.stderr.splitlines() if "CPU fused layer kernels unavailable" in line)
    assert warning.startswith("WARNING") and "/nonexistent/cc" in warning and "eager torch ops" in warning
