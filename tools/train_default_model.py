"""Train `shardserve/doc-llama`, a small Llama model of the Python documentation, from nothing but
the running interpreter: its pydoc topics and the standard library's docstrings (`tools.doc_corpus`).

    python -m tools.train_default_model                    # the recorded settings, into parallel/checkpoints/doc_llama
    python -m tools.train_default_model --out DIR --steps 50

Deterministic: one seed for the tokenizer, the initial weights and the data order; a fixed
number of torch threads; the corpus hash, every setting, the loss of every step and the
held-out loss go into `training.json` beside the weights. The weights are saved in bfloat16 (a
few MB in the repository) and are loaded as float32 on CPU like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from parallel.checkpoints.builtin_models import SPECIAL_TOKENS, save_tokenizer, train_byte_bpe
from tools.doc_corpus import Corpus, python_docs

OUT = Path(__file__).resolve().parents[1] / "parallel" / "checkpoints" / "doc_llama"
EOS_ID = SPECIAL_TOKENS.index("</s>")


@dataclass(frozen=True)
class TrainSettings:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1200
    peak_lr: float = 3e-3
    warmup_steps: int = 60
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    held_out_every: int = 20
    """Every n-th document of the corpus is held out (never trained on) for the held-out loss."""
    threads: int = 2
    seed: int = 0


def tokenize(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """The documents as one stream of ids, each ended by </s> (where a model learns to stop)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] non-overlapping windows (inputs and their next-token targets)."""
    n = (stream.numel() - 1) // seq_len
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def learning_rate(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.peak_lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.peak_lr * (s.final_lr_ratio + (1 - s.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(s: TrainSettings) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position_embeddings,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(config)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each window's next tokens."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def mean_loss(model: torch.nn.Module, data: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.shape[0], batch_size):
            batch = data[i : i + batch_size]
            total += next_token_loss(model, batch).item() * batch.shape[0]
            count += batch.shape[0]
    model.train()
    return total / max(1, count)


class Trainer:
    """Tokenizer, data and model for a run; `run(steps)` trains and returns the per-step losses."""

    def __init__(self, settings: TrainSettings, corpus: Corpus | None = None) -> None:
        torch.set_num_threads(settings.threads)
        self.settings = s = settings
        self.corpus = corpus or python_docs()
        train_docs, held_docs = self.corpus.split(s.held_out_every)
        self.tokenizer = train_byte_bpe(s.vocab_size, SPECIAL_TOKENS, s.seed, unk_token="<unk>", texts=train_docs)
        self.train = windows(tokenize(self.tokenizer, train_docs), s.seq_len)
        self.held = windows(tokenize(self.tokenizer, held_docs), s.seq_len)
        self.model = build_model(s)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=s.peak_lr, betas=(0.9, 0.95))
        self.order = torch.Generator().manual_seed(s.seed)
        self._queue: list[int] = []

    def _batch(self) -> torch.Tensor:
        """The next batch in a seeded order: a fresh permutation of the windows every epoch."""
        s = self.settings
        while len(self._queue) < s.batch_size:
            self._queue.extend(torch.randperm(self.train.shape[0], generator=self.order).tolist())
        picked, self._queue = self._queue[: s.batch_size], self._queue[s.batch_size :]
        return self.train[picked]

    def run(self, steps: int, progress: bool = False) -> list[float]:
        from tqdm import tqdm

        s, model = self.settings, self.model
        model.train()
        losses = []
        bar = tqdm(range(steps), desc="training doc-llama", disable=not progress, unit="step")
        for step in bar:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step, s)
            batch = self._batch()
            loss = next_token_loss(model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            self.optimizer.step()
            losses.append(round(loss.item(), 6))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return losses

    def save(self, out: Path, losses: list[float], wall_s: float) -> dict[str, Any]:
        s = self.settings
        out.mkdir(parents=True, exist_ok=True)
        self.model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        self.model.to(torch.float32)  # the shipped weights as a replica loads them: the loss is theirs
        held_loss = mean_loss(self.model, self.held, s.batch_size)
        save_tokenizer(self.tokenizer, out, s.max_position_embeddings)
        last = losses[-min(50, len(losses)) :]
        record = {
            "model": "shardserve/doc-llama",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "corpus": {
                "source": "pydoc_data topics + standard library docstrings (tools/doc_corpus.py)",
                "sha256": self.corpus.sha256,
                "documents": len(self.corpus.documents),
                "chars": sum(map(len, self.corpus.documents)),
                "train_tokens": int(self.train.numel()),
                "held_out_tokens": int(self.held.numel()),
            },
            "settings": asdict(s),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": len(losses),
            "wall_s": round(wall_s, 1),
            "final_train_loss": round(sum(last) / len(last), 4),
            "held_out_loss": round(held_loss, 4),
            "held_out_perplexity": round(math.exp(held_loss), 2),
            "losses": losses,
        }
        (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    for f in fields(TrainSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    start = time.monotonic()
    print(f"corpus and tokenizer (Python {platform.python_version()}) ...", file=sys.stderr, flush=True)
    trainer = Trainer(settings)
    print(
        f"{len(trainer.corpus.documents)} documents, {trainer.train.numel()} training tokens, "
        f"{trainer.held.numel()} held out; {sum(p.numel() for p in trainer.model.parameters())} parameters",
        file=sys.stderr,
        flush=True,
    )
    losses = trainer.run(settings.steps, progress=True)
    record = trainer.save(args.out, losses, time.monotonic() - start)
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
