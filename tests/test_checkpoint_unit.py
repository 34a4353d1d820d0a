"""What a replica reads off a checkpoint, without Ray: EOS ids, sampling defaults, the KV pool's
size and the context it allows, the fingerprint, and GPU placement of an unsharded replica."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from deployments.app import llm_server_options, nested, replica_demand
from deployments.config import ShardserveArgs
from deployments.types import GenerateRequest, SamplingDefaults
from parallel.checkpoints.loading import ModelLoadError, checkpoint_fingerprint, eos_token_ids, generation_config
from parallel.checkpoints.shaped_models import write_shaped_checkpoint
from parallel.model.sampling import sample_batch
from parallel.runner import KVCacheSpec, SamplingSpec
from parallel.runners.kv_sizing import PoolPlan, plan_pool, served_context

GIB = 2**30


def kv(**fields) -> KVCacheSpec:
    base = {"block_size": 16, "num_blocks": None, "memory_bytes": None, "memory_fraction": 0.5, "max_num_seqs": 4,
            "max_num_batched_tokens": 512}  # fmt: skip
    return KVCacheSpec(**{**base, **fields})


def test_the_pool_takes_a_share_of_free_memory_never_more_than_the_batch_can_use() -> None:
    per_block = 2**20  # 1 MiB a block of 16 tokens
    # 0.5 of 8 GiB = 4096 blocks; 4 sequences of a 131072 window could use 32768: the share binds
    share = plan_pool(kv(), per_block, 131072, lambda: 8 * GIB)
    assert share.num_blocks == 4096 and "0.5 of the 8192 MiB free" in share.reason
    # a 1024-token window: 4 sequences use 256 blocks at most
    useful = plan_pool(kv(), per_block, 1024, lambda: 8 * GIB)
    assert useful.num_blocks == 256 and "max_num_seqs=4" in useful.reason
    # explicit sizes win and free memory is never measured for them
    assert plan_pool(kv(num_blocks=7), per_block, 1024, lambda: 1 / 0).num_blocks == 7
    assert plan_pool(kv(memory_bytes=64 * 2**20), per_block, 1024, lambda: 1 / 0).num_blocks == 64


def test_the_context_served_is_the_window_or_what_the_pool_holds() -> None:
    assert served_context(131072, False, PoolPlan(10000, "x"), 16) == 131072
    assert served_context(131072, False, PoolPlan(4096, "x"), 16) == 65536  # one sequence fills the pool
    with pytest.raises(ModelLoadError, match=r"max_model_len 131072 needs 8192 KV-cache blocks.*has 4096"):
        served_context(131072, True, PoolPlan(4096, "share"), 16)  # asked for explicitly: refused, not cut
    with pytest.raises(ModelLoadError, match="holds only 0 tokens"):
        served_context(131072, False, PoolPlan(0, "no memory left"), 16)


def test_kv_cache_spec_defaults_follow_the_device() -> None:
    assert ShardserveArgs().kv_cache_spec().memory_fraction == 0.5
    cuda = ShardserveArgs(device="cuda", dtype="bfloat16")
    assert cuda.kv_cache_spec().memory_fraction == 0.9
    fixed = ShardserveArgs(engine={"kv_cache_memory_mb": 64, "kv_cache_memory_fraction": 0.3}).kv_cache_spec()
    assert fixed.memory_bytes == 64 * 2**20 and fixed.memory_fraction == 0.3


def test_every_eos_id_of_config_and_generation_config(tmp_path: Path) -> None:
    path = write_shaped_checkpoint("llama-3-8b-instruct", tmp_path)
    config = AutoConfig.from_pretrained(path)
    generation = generation_config(path)
    assert isinstance(config.eos_token_id, int) and generation["eos_token_id"] == [config.eos_token_id, 4]
    assert eos_token_ids(config, generation) == (config.eos_token_id, 4)
    assert eos_token_ids(config, {}) == (config.eos_token_id,)
    (path / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json is not valid JSON"):
        generation_config(path)


def test_sampling_defaults_fill_only_what_a_request_leaves_out() -> None:
    qwen = SamplingDefaults.from_generation_config(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512}
    )
    assert (qwen.temperature, qwen.top_p, qwen.top_k, qwen.repetition_penalty, qwen.max_tokens) == (0.7, 0.8, 20, 1.05, 512)
    assert qwen.min_p == 0.0
    filled = GenerateRequest(prompt="x", top_p=0.5).with_defaults(qwen)
    assert (filled.temperature, filled.top_p, filled.top_k) == (0.7, 0.5, 20)
    assert not filled.reproducible and filled.model_copy(update={"seed": 1}).reproducible
    greedy = GenerateRequest(prompt="x", temperature=0).with_defaults(qwen)
    assert greedy.reproducible and greedy.repetition_penalty == 1.05
    assert GenerateRequest(prompt="x").with_defaults(SamplingDefaults()).temperature == 1.0  # OpenAI's


def test_repetition_penalty_is_transformers_and_min_p_drops_the_unlikely() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 3
    seen = (3, 7, 7, 11, 40)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([list(seen)]), logits.clone())
    spec = SamplingSpec(repetition_penalty=1.3)
    (token,) = sample_batch(logits, [spec], [0], [0], [seen])
    assert token.token_id == int(expected.argmax())
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, token.token_id]))  # the model's own
    # penalize the greedy winner hard enough and another token wins
    winner = int(logits.argmax())
    (other,) = sample_batch(logits, [SamplingSpec(repetition_penalty=2.0)], [0], [0], [(winner,)])
    assert other.token_id == int(RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[winner]]), logits.clone()).argmax())
    # min_p: only tokens at least min_p times as likely as the best can be drawn
    probs = torch.softmax(logits[0], -1)
    allowed = {int(i) for i in torch.nonzero(probs >= 0.2 * probs.max())}
    drawn = {sample_batch(logits, [SamplingSpec(temperature=1.0, min_p=0.2)], [s], [0])[0].token_id for s in range(200)}
    assert drawn <= allowed and len(allowed) < 64


def test_the_fingerprint_follows_weights_and_tokenizer_files(tmp_path: Path) -> None:
    path = write_shaped_checkpoint("qwen3-0.6b", tmp_path / "a")
    first = checkpoint_fingerprint(path)
    assert checkpoint_fingerprint(path) == first
    other = write_shaped_checkpoint("qwen3-0.6b", tmp_path / "b", seed=1)
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    swapped = checkpoint_fingerprint(path)
    assert swapped != first
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    assert checkpoint_fingerprint(path) != swapped


def test_an_unsharded_cuda_replica_reserves_a_gpu() -> None:
    options = llm_server_options(ShardserveArgs(device="cuda", dtype="bfloat16"))
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert replica_demand(options) == ([{"CPU": 1.0, "GPU": 1.0}], "STRICT_PACK")
    assert replica_demand(llm_server_options(ShardserveArgs())) == ([{"CPU": 1.0}], "STRICT_PACK")


def test_dotted_builder_arguments_are_nested_fields() -> None:
    assert nested({"model": "m", "engine.max_num_seqs": "8", "engine.block_size": "32"}) == {
        "model": "m",
        "engine": {"max_num_seqs": "8", "block_size": "32"},
    }
    with pytest.raises(ValueError, match="sets a field inside 'engine'"):
        nested({"engine": "x", "engine.max_num_seqs": "8"})
