"""`shardserve/doc-llama` and the tool that trains it (tools/train_default_model.py): the corpus
comes from the interpreter's files without importing the standard library, a run is the same
run every time (tokenizer, data order, losses), and the shipped weights are that run's."""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.config import EngineConfig, ShardserveArgs
from deployments.engine.engine import LLMEngine
from deployments.replica.checkpoint import ServedCheckpoint
from parallel.checkpoints.builtin_models import SHIPPED_MODELS
from parallel.runner import SamplingSpec
from parallel.runners.local_runner import LocalModelRunner
from tools.doc_corpus import Corpus, python_docs
from tools.train_default_model import Trainer, TrainSettings, mean_loss

SHIPPED = SHIPPED_MODELS["shardserve/doc-llama"]

SMALL = TrainSettings(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, seq_len=32, batch_size=4, steps=4, warmup_steps=1, threads=1)  # fmt: skip


def test_the_corpus_is_read_without_importing_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); from tools.doc_corpus import python_docs; c = python_docs(); "
        "new = set(sys.modules) - before; "
        "print(len(c.documents), sorted(m for m in new if m in ('antigravity', 'this', 'tkinter', 'turtle')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    count, imported = out.stdout.split(" ", 1)
    assert int(count) > 5000 and imported.strip() == "[]", out.stdout
    corpus = python_docs()
    assert corpus.sha256 == python_docs().sha256
    assert any("for" in d and "statement" in d for d in corpus.documents[:100])  # the pydoc topics come first
    train, held = corpus.split(20)
    assert len(held) == len(corpus.documents) // 20 and len(train) + len(held) == len(corpus.documents)


def test_a_run_is_the_same_run_every_time() -> None:
    corpus = Corpus(python_docs().documents[:400])
    runs = []
    for _ in range(2):
        trainer = Trainer(SMALL, corpus)
        runs.append((trainer.tokenizer.to_str(), trainer.run(SMALL.steps)))
    assert runs[0] == runs[1]
    tokenizer, losses = runs[0]
    assert len(losses) == 4 and losses[0] > losses[-1]  # it learns
    assert json.loads(tokenizer)["model"]["type"] == "BPE"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((SHIPPED / "training.json").read_text())


def test_the_shipped_weights_come_from_the_recorded_run(record: dict) -> None:
    """The recorded settings rebuild the shipped tokenizer and retrace the first recorded losses,
    and the shipped weights score the recorded held-out loss (not a full retrain in CI)."""
    corpus = python_docs()
    if corpus.sha256 != record["corpus"]["sha256"]:
        pytest.skip(f"Python {platform.python_version()} ships other documentation than the recorded {record['python']}")
    settings = TrainSettings(**record["settings"])
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(settings, corpus)
        shipped_vocab = json.loads((SHIPPED / "tokenizer.json").read_text())["model"]["vocab"]
        assert json.loads(trainer.tokenizer.to_str())["model"]["vocab"] == shipped_vocab
        assert trainer.run(3) == pytest.approx(record["losses"][:3], abs=1e-4)
        model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
        assert mean_loss(model, trainer.held, settings.batch_size) == pytest.approx(record["held_out_loss"], abs=1e-3)
    finally:
        torch.set_num_threads(threads)
    assert record["held_out_perplexity"] == pytest.approx(math.exp(record["held_out_loss"]), rel=1e-3)
    assert record["steps"] == settings.steps == len(record["losses"])


async def test_its_greedy_answers_are_words_of_the_python_docs(record: dict) -> None:
    """64 greedy tokens after documentation-like openings, through the engine as a replica runs
    it: nearly every word is one the corpus uses."""
    args = ShardserveArgs(model="shardserve/doc-llama")
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    vocabulary = {w for doc in python_docs().documents for w in re.findall(r"[A-Za-z]+", doc)}
    runner = LocalModelRunner(args.model_spec(), args.kv_cache_spec())
    engine = LLMEngine(runner, runner.load(), EngineConfig().scheduler_spec())
    words: list[str] = []
    for opening in ("The list type", "Return the number of", "The with statement"):
        (seq,) = engine.add(tokenizer.encode(opening), [(SamplingSpec(), 0)], 64, ignore_eos=True)
        ids = [t.token_id async for chunk in engine.stream(seq) for t in chunk]
        words += re.findall(r"[A-Za-z]+", tokenizer.decode(ids, skip_special_tokens=True))
    runner.shutdown()
    assert len(words) > 60
    assert sum(w in vocabulary for w in words) / len(words) > 0.9, words
    quality = ServedCheckpoint.open(SHIPPED, args).quality
    assert quality is not None and quality["held_out_perplexity"] == record["held_out_perplexity"] < 100
