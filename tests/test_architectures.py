"""Every registered architecture against transformers' own forward (eager attention).

The models are small random-weight checkpoints built from real checkpoints' config.json fields
(parallel/checkpoints/shaped_models.py): Llama 2 / 3 / 3.2 (rope scaling `llama3`, tied embeddings, GQA, MHA),
Mistral (sliding window 32), Qwen2.5 (q/k/v bias), Qwen3 (q/k norms, head_dim 32 with hidden 64),
Gemma 3 (local/global layers, per-layer rotary, sandwich norms). Prompts are longer than every
window and generation runs past it; each is checked with whole and chunked prefill and again with
its blocks from the prefix cache, unsharded (with each CPU attention backend, and with the layers'
fused kernels and without) and sharded (tp=2 or pp=2; Gemma 3 both) over real rank actors.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deployments.config import EngineConfig, ShardserveArgs
from deployments.engine.engine import LLMEngine
from parallel.checkpoints.loading import ModelLoadError, load_model_config
from parallel.checkpoints.shaped_models import write_shaped_checkpoint
from parallel.model.architectures import supported_names
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec, SequenceStep, StepInput
from parallel.runners.distributed_runner import DistributedModelRunner
from parallel.runners.local_runner import LocalModelRunner

from .conftest import kernels_expected, wait_until

SHAPES = [
    "llama-3.2-1b-instruct",
    "llama-3-8b-instruct",
    "llama-2-7b-chat",
    "mistral-7b-v0.1",
    "qwen2.5-7b-instruct",
    "qwen3-0.6b",
    "gemma-3-1b-it",
    "gemma-3-27b-it-text",
]
# Each sharded at the layout where it differs most: tp=2 splits heads (Mistral's and Qwen2.5's
# GQA, Qwen2.5's q/k/v bias, Qwen3's per-head q/k norms); pp=2 splits layers (Llama 3.2's tied
# embedding lives on both ends; Gemma 3's local/global layers fall on both stages). Gemma 3, whose
# forward differs most from Llama's, runs at both.
SHARDED = [
    ("llama-3.2-1b-instruct", 1, 2),
    ("mistral-7b-v0.1", 2, 1),
    ("qwen2.5-7b-instruct", 2, 1),
    ("qwen3-0.6b", 2, 1),
    ("gemma-3-27b-it-text", 2, 1),
    ("gemma-3-27b-it-text", 1, 2),
]
WINDOW = 32  # the shrunk sliding window of Mistral and Gemma 3
SHARED = [11 + (5 * j) % 300 for j in range(2 * 16)]  # two full blocks every prompt starts with
PROMPTS = [SHARED + [20 + (7 * i + 3 * j) % 400 for j in range(9 + 11 * i)] for i in range(4)]  # 41..74 tokens
NEW_TOKENS = 16
KV = KVCacheSpec.fixed(block_size=16, num_blocks=256)
assert min(map(len, PROMPTS)) > WINDOW


@cache
def checkpoints_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="shardserve-shapes-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_checkpoints() -> Iterator[None]:
    yield
    if checkpoints_dir.cache_info().currsize:
        shutil.rmtree(checkpoints_dir(), ignore_errors=True)


@cache
def checkpoint(name: str) -> Path:
    return write_shaped_checkpoint(name, checkpoints_dir() / name)


@cache
def reference(name: str) -> tuple[torch.Tensor, list[list[int]]]:
    """transformers' eager forward: next-token logits after each prompt, and greedy tokens made
    by a whole forward per step (no cache, so nothing of HF's cache classes is relied on)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint(name), attn_implementation="eager", dtype=torch.float32).eval()
    logits, tokens = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            for step in range(NEW_TOKENS):
                last = model(input_ids=torch.tensor([ids])).logits[0, -1]
                if step == 0:
                    logits.append(last)
                ids.append(int(last.argmax()))
            tokens.append(ids[len(prompt) :])
    return torch.stack(logits), tokens


def prefill_step() -> StepInput:
    return StepInput([SequenceStep(i, p, 0, list(range(8 * i, 8 * i + 8)), SamplingSpec()) for i, p in enumerate(PROMPTS)])


def engine_tokens(runner, info, max_num_batched_tokens: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Greedy tokens of every prompt, all at once, then all again in the same engine (their
    blocks now come from the prefix cache); and how many prompt tokens were cache hits."""
    engine_config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens)

    async def run() -> tuple[list[list[int]], list[list[int]], int]:
        engine = LLMEngine(runner, info, engine_config.scheduler_spec())

        async def one(prompt: list[int]) -> list[int]:
            (seq,) = engine.add(prompt, [(SamplingSpec(), 0)], NEW_TOKENS, ignore_eos=True)
            return [t.token_id async for batch in engine.stream(seq) for t in batch]

        first = list(await asyncio.gather(*(one(p) for p in PROMPTS)))
        hits_before = engine.counters().prefix_cache_hits
        second = list(await asyncio.gather(*(one(p) for p in PROMPTS)))
        return first, second, engine.counters().prefix_cache_hits - hits_before

    return asyncio.run(run())


def spec_for(name: str, attention_backend: str = "auto", fused_ops: bool = True) -> ModelSpec:
    return ModelSpec(str(checkpoint(name)), None, "float32", False, None, "cpu", attention_backend, fused_ops)


def fusable(name: str) -> bool:
    """Whether parallel.model.fused_layers applies to the shape (all but Gemma 3's sandwich layers)."""
    return not name.startswith("gemma")


def check_matches_transformers(
    runner, name: str, budgets: tuple[int, ...], attention_backend: str | None = None, fused_ops: bool = True
) -> None:
    """The runner's prefill logits and greedy tokens are transformers', for each step token
    budget (512: whole prompts; less: chunked prefill), fresh and from the prefix cache."""
    ref_logits, ref_tokens = reference(name)
    try:
        info = runner.load()
        assert attention_backend is None or info.attention_backend == attention_backend
        assert info.fused_ops == (fused_ops and fusable(name) and kernels_expected())
        logits = runner.logits(prefill_step())
        assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max()
        for budget in budgets:
            fresh, cached, hits = engine_tokens(runner, info, max_num_batched_tokens=budget)
            assert fresh == ref_tokens, budget
            assert cached == ref_tokens and hits >= len(PROMPTS) * len(SHARED), budget
    finally:
        runner.shutdown()


@pytest.mark.parametrize(
    ("attention", "fused_ops"),
    [("cpu_paged", True), ("gather_sdpa", True), ("cpu_paged", False)],
    ids=["kernels", "sdpa", "eager-layers"],
)
@pytest.mark.parametrize("name", SHAPES)
def test_unsharded_forward_matches_transformers(name: str, attention: str, fused_ops: bool) -> None:
    if attention == "cpu_paged" and not kernels_expected():
        pytest.skip("no C compiler on this machine: the CPU kernels cannot be built")
    if not fused_ops and not fusable(name):
        pytest.skip("eager either way: the fused layers do not apply to this shape")
    runner = LocalModelRunner(spec_for(name, attention, fused_ops), KV)
    check_matches_transformers(runner, name, budgets=(512, 16), attention_backend=attention, fused_ops=fused_ops)


@pytest.mark.parametrize(("name", "tp", "pp"), SHARDED)
def test_sharded_forward_matches_transformers(ray_cluster, name: str, tp: int, pp: int) -> None:
    from .test_parallel import alive_ranks

    args = ShardserveArgs(
        model=str(checkpoint(name)),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        parallel={"load_timeout_s": 120, "step_timeout_s": 30},
    )
    check_matches_transformers(DistributedModelRunner(args.model_spec(), KV, args.parallel_spec()), name, budgets=(32,))
    wait_until(lambda: not alive_ranks(), timeout_s=30)


def test_unregistered_architecture_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    model = tmp_path / "phi"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}))
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_model_config(ModelSpec(str(model), None, "float32", False, None, "cpu"))
    message = str(info.value)
    assert "Phi3ForCausalLM" in message and all(name in message for name in supported_names()), message


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ],
)
def test_config_features_the_forward_lacks_are_refused(override: dict, refused: str, tmp_path: Path) -> None:
    name = "llama-3-8b-instruct" if "rope_scaling" in override else "gemma-3-1b-it"
    path = write_shaped_checkpoint(name, tmp_path, **override)
    with pytest.raises(ModelLoadError, match=refused):
        load_model_config(ModelSpec(str(path), None, "float32", False, None, "cpu"))
