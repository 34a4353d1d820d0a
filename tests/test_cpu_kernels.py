"""The CPU hot path's two process-level choices: oneDNN-packed linear layers and malloc settings
that keep a step's freed memory. No Ray: these are model-side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from parallel.model.packed_linear import PackedLinear, pack_linears
from parallel.model.paged_model import kv_shape

from .conftest import needs_c_compiler

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_dense(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    expected = dense(x).detach()
    packed = PackedLinear(dense)
    assert torch.allclose(packed(x), expected, atol=1e-5, rtol=1e-5)
    # Leading dimensions pass through, as for nn.Linear (the LM head is called on [1, S, H]).
    assert torch.allclose(packed(x[None]), expected[None], atol=1e-5, rtol=1e-5)


def small_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@needs_onednn
@pytest.mark.parametrize("tie", [False, True])
def test_packing_a_model_keeps_its_logits_shape_and_embeddings(tie: bool) -> None:
    model = small_llama(tie)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    shape = kv_shape(model)
    # 7 projections per layer and the LM head; a second call finds nothing left to pack.
    assert pack_linears(model) == 2 * 7 + 1
    assert pack_linears(model) == 0
    assert kv_shape(model) == shape == (2, 2, 16)
    assert isinstance(model.lm_head, PackedLinear)
    assert model.model.embed_tokens.weight.shape == (300, 64)  # a tied head's embedding stays dense
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_only_plain_float_linears_are_packed() -> None:
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(Custom(8, 8), nn.Linear(8, 8).to(torch.float16))
    assert pack_linears(model) == 0
    assert type(model[0]) is Custom and type(model[1]) is nn.Linear


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_retained_on_linux() -> None:
    """In a fresh process (the settings are process-wide): applied once, then a no-op."""
    code = "from parallel.model.host_memory import retain_freed_memory as r; print(r(), r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "True"]


@needs_c_compiler
def test_both_kernels_build_wherever_a_compiler_is() -> None:
    """The one check that must not skip on a machine with a compiler (nor in CI, which requires
    the kernels): a source or flag that stops compiling fails here with the compiler's error."""
    from parallel.model.cpu_attention import load_kernel
    from parallel.model.fused_layers import LAYER_OPS

    load_kernel()
    LAYER_OPS.load()


def _load_layer_ops(env: dict[str, str]) -> str:
    code = (
        "from parallel.model.cpu_kernels import KernelUnavailable, NoCompiler\n"
        "from parallel.model.fused_layers import LAYER_OPS\n"
        "try:\n"
        "    LAYER_OPS.load()\n"
        "    print('built')\n"
        "except NoCompiler as exc:\n"
        "    print('no compiler:', exc)\n"
        "except KernelUnavailable as exc:\n"
        "    print('failed:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_compiler_that_fails_is_an_error_with_its_message_not_a_missing_compiler(tmp_path: Path) -> None:
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: boom' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = {**os.environ, "CC": str(failing), "SHARDSERVE_CACHE": str(tmp_path / "cache")}
    assert _load_layer_ops(env) == "failed: " + f"{failing} failed: cc: error: boom"


def test_no_compiler_at_all_is_the_one_reason_to_go_without(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env |= {"PATH": str(tmp_path), "SHARDSERVE_CACHE": str(tmp_path / "cache")}  # no cc or gcc on it
    assert _load_layer_ops(env) == "no compiler: no C compiler (cc, gcc or $CC) on PATH"
