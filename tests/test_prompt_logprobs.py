"""Prompt logprobs: what lm-eval's loglikelihood requests read (`echo` with `logprobs` on
completions) and vLLM's `prompt_logprobs`, checked against transformers' own forward, whatever
the chunking, the prefix cache or the route."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from parallel.checkpoints.loading import resolve_model_dir
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec
from parallel.runners.local_runner import LocalModelRunner

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
PROMPT = "The quick brown fox jumps over the lazy dog, twice."


@pytest.fixture(scope="module")
def reference():
    path = resolve_model_dir(SPEC.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def logprobs(ids: list[int]) -> torch.Tensor:
        """Row i: log-probabilities of the token after position i."""
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return tokenizer, logprobs


async def scored(engine: LLMEngine, prompt: list[int], top: int = 3):
    (seq,) = engine.add(prompt, [(SamplingSpec(), 0)], 2, ignore_eos=True, prompt_top_logprobs=top)
    [t async for batch in engine.stream(seq) for t in batch]
    return seq.prompt_scores


async def test_engine_scores_every_prompt_token_like_transformers(reference) -> None:
    """Chunked prefill, a prompt whose blocks sit in the prefix cache, and a batch neighbour
    change nothing: the scores are transformers' log-softmax of the previous position."""
    _, logprobs = reference
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=256))
    info = runner.load()
    prompt = list(range(20, 61))
    ref = logprobs(prompt)
    for config in (EngineConfig(), EngineConfig(max_num_batched_tokens=9)):
        engine = LLMEngine(runner, info, config.scheduler_spec())
        first = await scored(engine, prompt)
        again, other = await asyncio.gather(scored(engine, prompt), scored(engine, [*prompt[:17], 5, 6, 7]))
        for scores in (first, again):  # again: its blocks are in the prefix cache, its scores still computed
            assert [s.token_id for s in scores] == prompt[1:]
            got = torch.tensor([s.logprob for s in scores])
            want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert torch.allclose(got, want, atol=1e-4)
            ranks = [int((ref[i] > ref[i, t]).sum()) + 1 for i, t in enumerate(prompt[1:])]
            assert [s.rank for s in scores] == ranks
            assert [s.top_logprobs[0][0] for s in scores] == ref[:-1].argmax(-1).tolist()
            assert all(len(s.top_logprobs) == 3 for s in scores)
        assert len(other) == 19
    (plain,) = engine.add(prompt, [(SamplingSpec(), 0)], 1, ignore_eos=True)  # no scores: reuses the blocks scored ones indexed
    [t async for batch in engine.stream(plain) for t in batch]
    assert engine.counters().prefix_cache_hits >= 36


def test_completions_echo_logprobs_as_lm_eval_reads_them(openai_client, reference) -> None:
    tokenizer, logprobs = reference
    ids = tokenizer.encode(PROMPT)
    res = openai_client.completions.create(model="tiny-llama", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and res.usage.prompt_tokens == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = logprobs(ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), want, atol=1e-4)
    # lm-eval's is_greedy: the continuation's token is its position's top alternative
    greedy = logprobs(ids)[:-1].argmax(-1)
    for i in range(1, len(ids)):
        assert (max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-5)) == (greedy[i - 1] == ids[i])
    assert res.choices[0].text.startswith(tokenizer.decode(ids))
    assert lp.text_offset[0] == 0


def test_vllm_prompt_logprobs_on_completions_and_chat(http, reference) -> None:
    tokenizer, logprobs = reference
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2, "cache": False}
    res = http.post("/v1/completions", json=body)
    assert res.status_code == 200, res.text
    ids = tokenizer.encode(PROMPT)
    plp = res.json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    ref = logprobs(ids)
    for i, entry in enumerate(plp[1:], start=1):
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert own["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        top = sorted(entry.values(), key=lambda e: e["rank"])[0]
        assert top["rank"] == 1 and top["logprob"] == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
        assert 2 <= len(entry) <= 3
    streamed = http.post("/v1/completions", json={**body, "stream": True, "echo": True}).text
    first = json.loads(streamed.split("data: ", 2)[1])["choices"][0]  # the prompt comes first, with its logprobs
    assert first["text"] == PROMPT and first["prompt_logprobs"] == plp
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    res = http.post("/v1/chat/completions", json=chat)
    assert res.status_code == 200 and res.json()["prompt_logprobs"][0] is None and len(res.json()["prompt_logprobs"]) > 3
    res = http.post("/v1/chat/completions", json={**chat, "stream": True})
    assert res.status_code == 400 and "prompt_logprobs" in res.json()["error"]["message"], res.text
    res = http.post("/v1/completions", json={**body, "prompt_logprobs": 21})
    assert res.status_code == 400 and res.json()["error"]["param"] == "prompt_logprobs", res.text


def test_echo_logprobs_streamed_and_cached(openai_client) -> None:
    """The echoed prompt comes first in the stream with its logprobs; the whole answer and a
    result-cache replay carry the same."""
    kwargs = dict(model="tiny-llama", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    whole = openai_client.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.completions.create(**kwargs, stream=True, extra_body={"cache": False}))  # a replay is one chunk
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    streamed = [lp for c in chunks for lp in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed == whole.logprobs.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    again = openai_client.completions.with_raw_response.create(**kwargs)
    assert again.headers["x-shardserve-cache"] == "hit"
    assert again.parse().choices[0].logprobs.token_logprobs == whole.logprobs.token_logprobs
