"""The engine over the local runner, in one process (no Ray): batching must not change tokens."""

from __future__ import annotations

import asyncio

import pytest

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from deployments.errors import Overloaded
from parallel.loading import ModelLoadError, ModelSpec, resolve_model_dir
from parallel.local_runner import LocalModelRunner
from parallel.runner import SamplingSpec

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")


@pytest.fixture(scope="module")
def runner():
    r = LocalModelRunner(SPEC)
    info = r.load()
    return r, info


async def collect(engine: LLMEngine, prompt: list[int], spec: SamplingSpec, max_tokens: int) -> list[int]:
    seq = engine.add(prompt, spec, max_tokens, ignore_eos=True)
    return [t.token_id async for t in engine.stream(seq)]


async def test_concurrent_requests_match_running_alone(runner) -> None:
    r, info = runner
    prompts = [[5 + i, 40 + 3 * i, 90, 17 + i][: 2 + i % 3] for i in range(12)]
    greedy = SamplingSpec()
    engine = LLMEngine(r, info, EngineConfig(max_num_seqs=4, max_waiting_requests=16))
    alone = [await collect(engine, p, greedy, 8) for p in prompts]
    together = await asyncio.gather(*(collect(engine, p, greedy, 8) for p in prompts))
    assert list(together) == alone
    seeded = [SamplingSpec(temperature=1.0, seed=i) for i in range(len(prompts))]
    alone_s = [await collect(engine, p, s, 8) for p, s in zip(prompts, seeded, strict=True)]
    together_s = await asyncio.gather(*(collect(engine, p, s, 8) for p, s in zip(prompts, seeded, strict=True)))
    assert list(together_s) == alone_s


async def test_length_limit_and_context_window(runner) -> None:
    r, info = runner
    engine = LLMEngine(r, info, EngineConfig())
    assert len(await collect(engine, [5, 6, 7], SamplingSpec(), 5)) == 5
    near_end = [5] * (info.max_model_len - 3)
    assert len(await collect(engine, near_end, SamplingSpec(), 100)) == 3


async def test_queue_full_is_refused_at_once(runner) -> None:
    r, info = runner
    engine = LLMEngine(r, info, EngineConfig(max_num_seqs=1, max_waiting_requests=1))
    first = engine.add([5, 6], SamplingSpec(), 50, ignore_eos=True)
    second = engine.add([5, 6], SamplingSpec(), 50, ignore_eos=True)
    with pytest.raises(Overloaded) as info_:
        engine.add([5, 6], SamplingSpec(), 50, ignore_eos=True)
    assert info_.value.status_code == 503 and info_.value.retry_after_s
    engine.abort(first)
    engine.abort(second)


async def test_abort_leaves_batch_and_frees_kv(runner) -> None:
    r, info = runner
    engine = LLMEngine(r, info, EngineConfig())
    seq = engine.add([5, 6, 7], SamplingSpec(), 200, ignore_eos=True)
    got = 0
    async for _ in engine.stream(seq):
        got += 1
        if got == 3:
            break
    engine.abort(seq)
    for _ in range(200):
        if engine.num_running == 0 and seq.seq_id not in r._caches:
            break
        await asyncio.sleep(0.01)
    assert engine.num_running == 0
    assert seq.seq_id not in r._caches


def test_pickle_weights_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve_model_dir(str(tmp_path))


def test_missing_local_dir_is_clear() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("./no/such/model")
