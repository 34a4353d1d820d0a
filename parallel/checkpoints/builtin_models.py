"""Built-in models that the project generates itself, so that everything runs offline.

No weights can be downloaded on the machines shardserve is developed and tested on, so the
embedded default is a small Llama-architecture model with random weights, created from a fixed
seed together with its own byte-level BPE tokenizer and chat template. It is written as an
ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files) and loaded
through exactly the same code as a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from parallel.cache_dir import cache_root

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "shardserve/"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A Jinja chat template in the style of Zephyr/Phi: each turn is `<|role|>\n{content}<|end|>\n`.
# Tools are offered in a system turn and calls written as Hermes/Qwen do (<tool_call>{...}</tool_call>),
# so that the built-in models exercise the same parsing as real checkpoints.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\\nYou may call these functions; to call one, answer with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\\n' + (tools | tojson) + '<|end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|assistant|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}{{ '<|end|>\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be are "
    "model server request token batch cache layer shard tensor pipeline replica cluster ray "
    "serve deploy scale query answer prompt system user assistant hello world data time "
    "first second next last small large fast slow good new old one two three four five "
    "what how why when where who can will would should could may might must do does did "
    "water light river mountain city market window garden music story paper number letter"
).split()


@dataclass(frozen=True)
class BuiltinModelSpec:
    """Shape of a generated Llama model; every field changes the weights, so all go in the hash."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + CHAT_TEMPLATE + "v2"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    # The embedded default and the test model: tiny, fast on 2 CPU cores.
    "shardserve/tiny-llama": BuiltinModelSpec(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
    # Large enough that compute matters in benchmarks (~30M parameters).
    "shardserve/bench-llama": BuiltinModelSpec(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        vocab_size=8192,
        max_position_embeddings=2048,
    ),
}


# Built-in models whose weights ship in the repository: trained, not generated.
# `shardserve/doc-llama` is a small Llama of the Python documentation (tools/train_default_model.py).
SHIPPED_MODELS: dict[str, Path] = {"shardserve/doc-llama": Path(__file__).resolve().parent / "doc_llama"}


def is_builtin(model: str) -> bool:
    return model in BUILTIN_MODELS or model in SHIPPED_MODELS


def default_cache_dir() -> Path:
    """Where generated models live."""
    return cache_root() / "models"


def ensure_builtin_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of a built-in model, generating it first if it is missing.

    Generation writes to a temporary directory and renames it into place, so concurrent replicas
    (or a crash half-way) never see a partial model.
    """
    if name in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[name]
        if not (shipped / "model.safetensors").exists():
            hint = "python -m tools.train_default_model makes them"
            raise FileNotFoundError(f"{name}'s weights are missing from {shipped}: {hint}")
        return shipped
    spec = BUILTIN_MODELS[name]
    target = (cache_dir or default_cache_dir()) / f"{name.split('/', 1)[1]}-{spec.fingerprint()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("generating built-in model %s into %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=target.parent))
    try:
        _write_tokenizer(spec, tmp)
        _write_model(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built-in model %s ready", name)
    return target


def _training_corpus(seed: int, vocab_size: int) -> list[str]:
    """English-like lines with enough distinct pseudo-words that BPE fills the whole vocabulary
    (a model must never emit ids its tokenizer cannot decode)."""
    import random

    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(26)]
    coined = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(vocab_size * 2)]
    out = []
    for _ in range(max(2000, vocab_size)):
        words = [rng.choice(_WORDS) if rng.random() < 0.5 else rng.choice(coined) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return out


def train_byte_bpe(
    vocab_size: int,
    special_tokens: list[str],
    seed: int = 0,
    unk_token: str | None = None,
    texts: Iterable[str] | None = None,
) -> Tokenizer:
    """A byte-level BPE of exactly vocab_size tokens, the special ones first (ids 0..), trained
    on `texts` (default: seeded English-like lines that fill any vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed, vocab_size) if texts is None else texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, the model {vocab_size}")
    return tok


def _write_tokenizer(spec: BuiltinModelSpec, out: Path) -> None:
    tokenizer = train_byte_bpe(spec.vocab_size, SPECIAL_TOKENS, spec.seed, unk_token="<unk>")
    save_tokenizer(tokenizer, out, spec.max_position_embeddings)


def save_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int) -> None:
    """The tokenizer files of a built-in model: its BPE, the special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = model_max_length
    fast.save_pretrained(out)


def _write_model(spec: BuiltinModelSpec, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    spread_weights(model)
    model.save_pretrained(out, safe_serialization=True)


def spread_weights(model: torch.nn.Module, vectors_too: bool = False) -> None:
    """Random init gives near-uniform logits; a larger scale makes greedy choices well separated,
    so that sharded runs and reference forwards compare exact tokens without ties decided by
    rounding. `vectors_too` also perturbs norms and biases, so that a forward that skipped or
    misapplied one (a q/k norm, Gemma's `1 + weight`) could not still agree."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif vectors_too:
                p.add_(torch.randn_like(p) * 0.1)
