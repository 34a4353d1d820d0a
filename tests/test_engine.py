"""The engine over the paged local runner, in one process (no Ray).

Batching, chunked prefill, prefix caching and preemption must never change the tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from deployments.errors import InvalidRequest, Overloaded
from parallel.checkpoints.loading import ModelLoadError, resolve_model_dir
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec
from parallel.runners.local_runner import LocalModelRunner

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
GREEDY = SamplingSpec()


@pytest.fixture(scope="module")
def loaded():
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=512))
    return runner, runner.load()


def prompts(count: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 500, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(count)]


async def collect(engine: LLMEngine, prompt: list[int], max_tokens: int, spec: SamplingSpec = GREEDY, seed: int = 0) -> list[int]:
    (seq,) = engine.add(prompt, [(spec, seed)], max_tokens, ignore_eos=True)
    return [t.token_id async for batch in engine.stream(seq) for t in batch]


async def alone_and_together(engine: LLMEngine, ps: list[list[int]], max_tokens: int, spec: SamplingSpec = GREEDY):
    alone = [await collect(engine, p, max_tokens, spec, i) for i, p in enumerate(ps)]
    together = await asyncio.gather(*(collect(engine, p, max_tokens, spec, i) for i, p in enumerate(ps)))
    return alone, list(together)


def test_paged_runner_matches_hf_generate(loaded) -> None:
    runner, info = loaded
    model = runner._paged.model
    ps = prompts(4)
    engine_out = asyncio.run(_collect_all(runner, info, ps))
    for p, got in zip(ps, engine_out, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(p) :].tolist()


async def _collect_all(runner, info, ps):
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    return [await collect(engine, p, 12) for p in ps]


async def test_concurrent_requests_match_running_alone(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig(max_num_seqs=5, max_waiting_requests=32).scheduler_spec())
    alone, together = await alone_and_together(engine, prompts(), 10)
    assert together == alone
    seeded = SamplingSpec(temperature=1.0, top_p=0.95)
    alone, together = await alone_and_together(engine, prompts(), 10, seeded)
    assert together == alone


async def test_output_penalties_reach_the_sampler(loaded) -> None:
    """The engine sends each sequence's output to the runner when it samples with a presence or
    frequency penalty: a huge frequency penalty makes greedy output never repeat a token, and
    the sequence next to it in the batch is untouched."""
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    p = prompts(1)[0]
    plain = await collect(engine, p, 40)
    assert len(set(plain)) < len(plain)  # this random model repeats itself when greedy
    penalized, neighbour = await asyncio.gather(
        collect(engine, p, 40, SamplingSpec(frequency_penalty=1000.0)), collect(engine, p, 40)
    )
    assert len(set(penalized)) == len(penalized) and penalized[0] == plain[0]
    assert neighbour == plain


async def test_stop_token_ids_end_and_min_tokens_hold_them_back(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    p = prompts(1)[0]
    plain = await collect(engine, p, 30)
    stop = plain[3]
    first = plain.index(stop)
    (seq,) = engine.add(p, [(GREEDY, 0)], 30, ignore_eos=True, stop_token_ids=[stop])
    got = [t.token_id async for batch in engine.stream(seq) for t in batch]
    assert got == plain[: first + 1] and seq.finish_reason == "stop"
    (late,) = engine.add(p, [(GREEDY, 0)], 30, ignore_eos=True, stop_token_ids=[stop], min_tokens=first + 2)
    held = [t.token_id async for batch in engine.stream(late) for t in batch]
    assert held[:first] == plain[:first] and stop not in held[: first + 2] and len(held) >= first + 2


async def test_chunked_prefill_gives_same_tokens(loaded) -> None:
    runner, info = loaded
    long_prompts = [p * 4 for p in prompts(4)]
    whole = LLMEngine(runner, info, EngineConfig(max_num_batched_tokens=512).scheduler_spec())
    chunked = LLMEngine(runner, info, EngineConfig(max_num_batched_tokens=7).scheduler_spec())
    a = await asyncio.gather(*(collect(whole, p, 8) for p in long_prompts))
    b = await asyncio.gather(*(collect(chunked, p, 8) for p in long_prompts))
    assert a == b
    assert chunked.counters().num_steps > whole.counters().num_steps


async def test_preemption_when_pool_runs_out_keeps_tokens(loaded) -> None:
    runner, info = loaded
    ps = prompts(8)
    roomy = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    expected = [await collect(roomy, p, 24) for p in ps]
    # The engine may use fewer blocks than the runner's pool holds: 30 forces preemption.
    small = LLMEngine(runner, dataclasses.replace(info, num_kv_blocks=30), EngineConfig().scheduler_spec())
    seeded = await asyncio.gather(*(collect(small, p, 24) for p in ps))
    assert list(seeded) == expected
    counters = small.counters()
    assert counters.num_preemptions > 0
    assert counters.num_running == 0 and counters.kv_cache_usage < 1.0


async def test_prefix_caching_on_off_identical_and_hits(loaded) -> None:
    runner, info = loaded
    system = prompts(1)[0] * 3  # a shared prefix of several blocks
    questions = [system + q for q in prompts(6)]
    on = LLMEngine(runner, info, EngineConfig(enable_prefix_caching=True).scheduler_spec())
    off = LLMEngine(runner, info, EngineConfig(enable_prefix_caching=False).scheduler_spec())
    a = [await collect(on, q, 8) for q in questions]
    b = [await collect(off, q, 8) for q in questions]
    assert a == b
    c = on.counters()
    assert c.prefix_cache_hits >= 5 * (len(system) // 4) * 4
    assert off.counters().prefix_cache_hits == 0


async def test_length_limit_and_context_window(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    assert len(await collect(engine, [5, 6, 7], 5)) == 5
    near_end = [5] * (info.max_model_len - 3)
    assert len(await collect(engine, near_end, 3)) == 3


async def test_queue_full_is_refused_at_once(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig(max_num_seqs=1, max_waiting_requests=1).scheduler_spec())
    first = engine.add([5, 6], [(GREEDY, 0)], 50, ignore_eos=True)
    second = engine.add([5, 6], [(GREEDY, 0)], 50, ignore_eos=True)
    with pytest.raises(Overloaded) as info_:
        engine.add([5, 6], [(GREEDY, 0)], 50, ignore_eos=True)
    assert info_.value.status_code == 503 and info_.value.retry_after_s
    for seq in first + second:
        engine.abort(seq)


async def test_request_larger_than_pool_is_refused(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, dataclasses.replace(info, num_kv_blocks=4), EngineConfig().scheduler_spec())
    with pytest.raises(InvalidRequest):
        engine.add([5] * 10, [(GREEDY, 0)], 10, ignore_eos=True)


async def test_abort_leaves_batch_and_frees_blocks(loaded) -> None:
    runner, info = loaded
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    (seq,) = engine.add([5, 6, 7], [(GREEDY, 0)], 200, ignore_eos=True)
    got = 0
    async for _ in engine.stream(seq):
        got += 1
        if got == 3:
            break
    for _ in range(500):
        if engine.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.num_running == 0
    assert engine.counters().kv_cache_usage == 0.0


def test_pickle_weights_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve_model_dir(str(tmp_path))


def test_missing_local_dir_is_clear() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("./no/such/model")


def test_local_directory_loads_like_builtin(loaded) -> None:
    _runner, info = loaded
    directory = str(resolve_model_dir("shardserve/tiny-llama"))
    other = LocalModelRunner(ModelSpec(directory, None, "float32", False, 256, "cpu"), KVCacheSpec.fixed(4, 64))
    assert other.load().num_parameters == info.num_parameters


def test_unsupported_architecture_is_refused_at_load(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path), None, "float32", False, None, "cpu")
    with pytest.raises(ModelLoadError, match=r"architecture \['GPT2LMHeadModel'\] is not supported"):
        LocalModelRunner(spec, KVCacheSpec.fixed(4, 8)).load()


class _FailingRunner:
    """A runner whose device fails on the third step (fault injection around the real runner)."""

    def __init__(self, inner: LocalModelRunner) -> None:
        self.inner, self.steps = inner, 0

    def step(self, step_input):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("device lost")
        return self.inner.step(step_input)

    def health(self) -> None:
        self.inner.health()


async def test_runner_fault_fails_in_flight_requests_and_health(loaded) -> None:
    from deployments.errors import EngineFault, Overloaded

    runner, info = loaded
    faults: list[BaseException] = []
    engine = LLMEngine(_FailingRunner(runner), info, EngineConfig().scheduler_spec(), on_fault=faults.append)
    seqs = [engine.add([5, 6, 7], [(GREEDY, 0)], 50, ignore_eos=True)[0] for _ in range(3)]
    for seq in seqs:
        with pytest.raises(EngineFault):
            async with asyncio.timeout(10):
                async for _ in engine.stream(seq):
                    pass
    with pytest.raises(RuntimeError, match="device lost"):
        engine.health()
    assert [str(f) for f in faults] == ["device lost"]  # told once, for all three
    with pytest.raises(Overloaded) as refused:  # 503: another replica can take it
        engine.add([5], [(GREEDY, 0)], 5, ignore_eos=True)
    assert refused.value.code == "replica_failed" and refused.value.status_code == 503


def test_engine_runner_and_model_code_import_without_ray() -> None:
    """A GPU machine may have torch and no Ray: the engine, the local runner, the model code and
    the config they take must import (and a generation run) where Ray is not installed."""
    import subprocess
    import sys

    script = """
import sys, asyncio
sys.modules["ray"] = None  # any import of ray (or ray.serve) now raises ImportError
from deployments.config import ShardserveArgs
from deployments.engine.engine import LLMEngine
from parallel.runners.local_runner import LocalModelRunner
from parallel.runner import SamplingSpec
args = ShardserveArgs(model="shardserve/tiny-llama", max_model_len=64)
runner = LocalModelRunner(args.model_spec(), args.kv_cache_spec())
info = runner.load()
async def main():
    engine = LLMEngine(runner, info, args.engine.scheduler_spec())
    (seq,) = engine.add([1, 2, 3], [(SamplingSpec(), 0)], 4, ignore_eos=True)
    return [t.token_id async for batch in engine.stream(seq) for t in batch]
print(len(asyncio.run(main())))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "4", out.stderr[-2000:]


def test_a_widened_stream_interval_merges_chunks_and_keeps_every_token(loaded) -> None:
    """The LLM server widens each output's chunk interval with load (`stream_chunks_per_s`):
    fewer chunks, the same tokens and text, the first and the last still sent at once."""
    from transformers import AutoTokenizer

    from deployments.replica.output_stream import output_chunks
    from deployments.types import GenerateRequest

    runner, info = loaded
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("shardserve/tiny-llama"))
    request = GenerateRequest(prompt="x", max_tokens=16, temperature=0, ignore_eos=True)

    async def run(interval_s: float) -> list[list]:
        engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
        streams = []
        for p in prompts(6):
            (seq,) = engine.add(p, [(GREEDY, 0)], 16, ignore_eos=True)
            streams.append(output_chunks(engine, seq, tokenizer, request, "r", 0, len(p), lambda: interval_s, lambda _: None))
        async def chunks(stream) -> list:
            return [c async for c in stream]

        return list(await asyncio.gather(*(chunks(s) for s in streams)))

    every_token, widened = asyncio.run(run(0.0)), asyncio.run(run(3600.0))
    for each, merged in zip(every_token, widened, strict=True):
        assert len(each) > 2  # a chunk whenever the engine hands over tokens
        assert len(merged) == 2 and merged[0].finish_reason is None  # the first at once, the rest at the end
        assert [t for c in merged for t in c.token_ids] == [t for c in each for t in c.token_ids]
        assert "".join(c.text for c in merged) == "".join(c.text for c in each)
        assert merged[-1].finish_reason == each[-1].finish_reason == "length"
