"""The model in a process of its own (`engine.model_process`, the default for one rank): the same
tokens as in the replica's process, its faults as step errors, nothing left behind. No Ray: the
runner is started the way a replica starts it, as a `python -m parallel.runners.model_process` child."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
import torch

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from parallel.checkpoints.loading import ModelLoadError
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec, SequenceStep, StepInput
from parallel.runners.local_runner import LocalModelRunner
from parallel.runners.model_process import ModelProcessDied, ProcessModelRunner
from tests.conftest import wait_until

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
KV = KVCacheSpec.fixed(block_size=4, num_blocks=256)
ONE_STEP = StepInput([SequenceStep(0, [11, 12, 13], 0, [0], SamplingSpec())])
PROMPTS = [[10 + 7 * i + j for j in range(3 + 9 * i)] for i in range(4)]


async def generate(runner, info, samplings) -> list[list[int]]:
    engine = LLMEngine(runner, info, EngineConfig(max_num_batched_tokens=16).scheduler_spec())  # chunked prefills too
    seqs = [s for p, sampling in zip(PROMPTS, samplings, strict=True) for s in engine.add(p, [sampling], 12, ignore_eos=True)]

    async def drain(seq) -> list[int]:
        return [t.token_id async for chunk in engine.stream(seq) for t in chunk]

    return await asyncio.gather(*(drain(s) for s in seqs))


def children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "parallel.runners.model_process" in " ".join(p.cmdline())]


@pytest.fixture
def process_runner():
    runner = ProcessModelRunner(SPEC, KV, threads=1)
    yield runner, runner.load()
    runner.shutdown()


async def test_the_model_process_generates_what_the_replica_process_does(process_runner) -> None:
    runner, info = process_runner
    local = LocalModelRunner(SPEC, KV)
    assert local.load() == info
    seeded = SamplingSpec(temperature=0.8, top_p=0.9)
    samplings = [(SamplingSpec(), 0), (seeded, 5), (SamplingSpec(), 0), (SamplingSpec(temperature=1.0), 9)]
    got = await generate(runner, info, samplings)
    assert got == await generate(local, info, samplings)
    assert all(len(tokens) == 12 for tokens in got)
    local.shutdown()


def test_tensors_in_a_step_reach_the_model_process(process_runner) -> None:
    """A constrained step carries its allowed tokens as a tensor (copied, not shared memory)."""
    runner, info = process_runner
    mask = torch.zeros(-(-info.vocab_size // 32), dtype=torch.int32)
    mask[42 // 32] = 1 << (42 % 32)
    step = StepInput([SequenceStep(0, [11, 12, 13], 0, [0], SamplingSpec(), allowed_tokens=mask)])
    assert [t.token_id for t in runner.step(step).tokens] == [42]


def test_a_killed_model_process_fails_the_step_and_the_health_check(process_runner) -> None:
    runner, _ = process_runner
    (child,) = children()
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(ModelProcessDied, match=r"died during step \(exit code -9\)"):
        runner.step(ONE_STEP)
    with pytest.raises(ModelProcessDied, match="exited with code -9"):
        runner.health()


def test_a_load_error_comes_back_whole_and_leaves_no_process() -> None:
    runner = ProcessModelRunner(ModelSpec("/nonexistent/model", None, "float32", False, None, "cpu"), KV, threads=1)
    with pytest.raises(ModelLoadError, match="/nonexistent/model"):
        runner.load()
    assert children() == []


def test_shutdown_ends_the_model_process(process_runner) -> None:
    runner, _ = process_runner
    (child,) = children()
    runner.shutdown()
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout_s=10)
    with pytest.raises(RuntimeError, match="not loaded"):
        runner.health()
