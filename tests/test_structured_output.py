"""Structured output in the engine (no Ray): every output of a constrained sequence follows its
grammar, even on a random-weight model, and a constrained sequence leaves its batch neighbours'
tokens alone."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from deployments.config import EngineConfig
from deployments.engine.engine import LLMEngine
from deployments.errors import InvalidRequest
from deployments.replica.grammar import ConstraintCompiler
from deployments.types import StructuredOutput
from parallel.checkpoints.loading import resolve_model_dir
from parallel.model.sampling import sample_batch
from parallel.runner import KVCacheSpec, ModelSpec, SamplingSpec
from parallel.runners.local_runner import LocalModelRunner

SPEC = ModelSpec("shardserve/tiny-llama", None, "float32", False, 256, "cpu")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
SAMPLINGS = [SamplingSpec(), SamplingSpec(temperature=1.0), SamplingSpec(temperature=0.8, top_p=0.9, repetition_penalty=1.3)]


@pytest.fixture(scope="module")
def setup():
    runner = LocalModelRunner(SPEC, KVCacheSpec.fixed(block_size=4, num_blocks=512))
    info = runner.load()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(SPEC.model, None))
    return runner, info, tokenizer, ConstraintCompiler(tokenizer, info.vocab_size, info.eos_token_ids)


async def run(engine: LLMEngine, prompt: list[int], spec: SamplingSpec, seed: int, max_tokens: int, constraint=None):
    (seq,) = engine.add(prompt, [(spec, seed)], max_tokens, ignore_eos=constraint is None, constraint=constraint)
    ids = [t.token_id async for batch in engine.stream(seq) for t in batch]
    return ids, seq.finish_reason


async def test_every_output_follows_its_constraint(setup) -> None:
    runner, info, tokenizer, compiler = setup
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    prompt = tokenizer.encode("Describe a person:")
    cases = [
        (StructuredOutput(json_schema=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (StructuredOutput(regex=r"\d{3}-[a-z]{2}"), lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t) or pytest.fail(t)),
        (StructuredOutput(choice=["yes", "no", 'say "hi"\n']), lambda t: t in ("yes", "no", 'say "hi"\n') or pytest.fail(t)),
        (
            StructuredOutput(grammar='root ::= "(" [0-9] ("," [0-9])? ")"'),
            lambda t: re.fullmatch(r"\(\d(,\d)?\)", t) or pytest.fail(t),
        ),
    ]
    for structured, check in cases:
        constraint = compiler.compile(structured)
        for seed, spec in enumerate(SAMPLINGS):
            ids, reason = await run(engine, prompt, spec, seed, 96, constraint)
            assert reason == "stop", (structured, spec, tokenizer.decode(ids))
            assert ids[-1] in info.eos_token_ids  # the grammar ends by letting only EOS through
            check(tokenizer.decode(ids, skip_special_tokens=True))


async def test_any_json_object_and_ignore_eos(setup) -> None:
    """json_object gives an object that parses when it closes within max_tokens; with
    ignore_eos the output still ends where the grammar is complete."""
    runner, info, tokenizer, compiler = setup
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    constraint = compiler.compile(
        StructuredOutput(json_schema={"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]})
    )
    (seq,) = engine.add(tokenizer.encode("x"), [(SamplingSpec(), 0)], 64, ignore_eos=True, constraint=constraint)
    ids = [t.token_id async for batch in engine.stream(seq) for t in batch]
    assert seq.finish_reason == "stop"
    assert json.loads(tokenizer.decode(ids, skip_special_tokens=True))["x"] in (1, 2)
    constraint = compiler.compile(StructuredOutput(json_object=True))
    ids, reason = await run(engine, tokenizer.encode("x"), SamplingSpec(), 0, 24, constraint)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_constrained_and_free_sequences_share_a_step(setup) -> None:
    """A free sequence batched with constrained ones gets the tokens it gets alone."""
    runner, info, tokenizer, compiler = setup
    engine = LLMEngine(runner, info, EngineConfig().scheduler_spec())
    prompt = tokenizer.encode("hello there")
    constraint = compiler.compile(StructuredOutput(json_schema=PERSON))
    free_alone = await run(engine, prompt, SamplingSpec(temperature=1.0), 7, 30)
    constrained_alone = await run(engine, prompt, SamplingSpec(), 0, 96, constraint)
    together = await asyncio.gather(
        run(engine, prompt, SamplingSpec(temperature=1.0), 7, 30),
        run(engine, prompt, SamplingSpec(), 0, 96, constraint),
        run(engine, tokenizer.encode("another"), SamplingSpec(), 0, 96, compiler.compile(StructuredOutput(regex="[0-9]{4}"))),
    )
    assert together[0] == free_alone
    assert together[1] == constrained_alone


def test_bad_constraints_are_400s_with_the_compiler_reason(setup) -> None:
    *_, compiler = setup
    with pytest.raises(InvalidRequest, match=r"regex cannot be compiled: .*Unclosed") as bad_regex:
        compiler.compile(StructuredOutput(regex="[a-"))
    assert bad_regex.value.param == "structured_output" and "/project/" not in bad_regex.value.message
    with pytest.raises(InvalidRequest, match="grammar cannot be compiled"):
        compiler.compile(StructuredOutput(grammar='root ::= "a" | '))
    with pytest.raises(InvalidRequest, match="json_schema cannot be compiled"):
        compiler.compile(StructuredOutput(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="non-empty"):
        StructuredOutput(choice=[])


def test_sampler_reads_the_packed_mask_as_xgrammar_writes_it() -> None:
    """Bit j of word i is token 32i+j: the sampler's mask agrees with xgrammar's own kernel
    on every token, and greedy and seeded rows both pick inside it."""
    vocab = 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g)
    allowed = [torch.randperm(vocab, generator=g)[:5] for _ in range(2)]
    masks = []
    for ids in allowed:
        words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        for t in ids.tolist():
            words[t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
        masks.append(words)
    expected = logits[:2].clone()
    xgrammar.apply_token_bitmask_inplace(expected, torch.stack(masks))
    specs = [SamplingSpec(), SamplingSpec(temperature=1.0), SamplingSpec()]
    out = sample_batch(logits, specs, [1, 2, 3], [0, 1, 2], allowed_tokens=[masks[0], masks[1], None])
    assert out[0].token_id == int(expected[0].argmax())
    assert out[1].token_id in allowed[1].tolist()
    assert out[2].token_id == int(logits[2].argmax())  # the unconstrained row is untouched
    assert out[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[out[0].token_id]))  # the model's own
    assert set(torch.isfinite(expected[1]).nonzero().flatten().tolist()) == set(allowed[1].tolist())


def test_json_strings_admit_no_raw_control_characters(setup) -> None:
    """JSON forbids U+0000-U+001F unescaped inside strings; a length-bounded string property
    must not let them through either (xgrammar's own rule for those does, see grammar.py)."""
    _, _, tokenizer, compiler = setup
    controls = [i for i in range(len(tokenizer)) if any(ord(c) < 32 for c in tokenizer.decode([i]))]
    assert controls
    for schema in ({"type": "string", "maxLength": 5}, {"type": "string"}):
        state = compiler.compile(StructuredOutput(json_schema=schema)).start()
        assert state.accept(tokenizer.convert_tokens_to_ids('"'))
        words = state.allowed_tokens()
        allowed = {t for t in range(len(tokenizer)) if int(words[t // 32]) >> (t % 32) & 1}
        assert allowed and not allowed & set(controls), schema
