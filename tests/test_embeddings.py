"""Embeddings: the last prompt token's final hidden state, L2-normalised, computed by the engine
(batched with whatever else runs) and checked against transformers' own forward; the route
through the official openai client (base64 by default) and in floats."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from parallel.checkpoints.loading import resolve_model_dir
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec
from parallel.runners.local_runner import LocalModelRunner

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
TEXTS = ["The quick brown fox", "jumps over the lazy dog", "The quick brown fox"]


@pytest.fixture(scope="module")
def reference():
    path = resolve_model_dir(SPEC.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def embedding(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            last = model.model(torch.tensor([ids])).last_hidden_state[0, -1]  # after the final norm
        return last / last.norm()

    return tokenizer, embedding


async def drain(engine: LLMEngine, seq) -> None:
    async for _ in engine.stream(seq):
        pass


async def test_engine_embeds_like_transformers_batched_and_chunked(reference) -> None:
    tokenizer, embedding = reference
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=256))
    info = runner.load()
    prompts = [tokenizer.encode(t) for t in TEXTS] + [list(range(20, 70))]
    for config in (EngineConfig(), EngineConfig(max_num_batched_tokens=8)):  # one step, or chunked prefills
        engine = LLMEngine(runner, info, config.scheduler_spec())
        (generating,) = engine.add(prompts[0], [(SamplingSpec(), 0)], 6, ignore_eos=True)  # shares the steps
        seqs = engine.embed(prompts)
        await asyncio.gather(*(drain(engine, s) for s in [*seqs, generating]))
        for seq, ids in zip(seqs, prompts, strict=True):
            got = torch.tensor(seq.embedding)
            assert seq.finish_reason == "stop" and got.shape == (info.hidden_size,)
            assert torch.allclose(got / got.norm(), embedding(ids), atol=1e-5)
        assert len(generating.output_ids) == 6
    assert engine.counters().prefix_cache_hits > 0  # the repeated text's blocks came from the cache


def test_embeddings_route_with_the_openai_client(openai_client, http, reference) -> None:
    tokenizer, embedding = reference
    res = openai_client.embeddings.create(model="tiny-llama", input=TEXTS)  # the SDK asks for base64
    assert [d.index for d in res.data] == [0, 1, 2]
    for d, text in zip(res.data, TEXTS, strict=True):
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-5)
        assert torch.allclose(torch.tensor(d.embedding), embedding(tokenizer.encode(text)), atol=1e-5)
    assert res.data[0].embedding == res.data[2].embedding
    assert res.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS) == res.usage.total_tokens
    floats = http.post("/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "float"}).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    assert torch.allclose(torch.tensor(floats["data"][0]["embedding"]), torch.tensor(res.data[1].embedding), atol=1e-6)
    short = openai_client.embeddings.create(model="tiny-llama", input=[tokenizer.encode(TEXTS[0])], dimensions=16)
    vector = torch.tensor(short.data[0].embedding)
    assert vector.shape == (16,) and math.isclose(float(vector.norm()), 1.0, rel_tol=1e-5)
    full = embedding(tokenizer.encode(TEXTS[0]))[:16]
    assert torch.allclose(vector, full / full.norm(), atol=1e-5)  # truncated, then normalised


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a"] * 100}, "input"),
        ({"input": "x", "dimensions": 100000}, "dimensions"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": [[1, 2, 999999]]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x " * 3000}, "input"),
    ],
)
def test_bad_embedding_requests_are_400_naming_the_field(http, body, param) -> None:
    res = http.post("/v1/embeddings", json=body)
    assert res.status_code == 400, res.text
    assert (res.json()["error"]["param"] or "").startswith(param), res.text


def test_unknown_model_is_404(openai_client) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client.embeddings.create(model="nope", input="x")
