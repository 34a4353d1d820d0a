"""Small random-weight checkpoints shaped like the ones people deploy.

No hub is reachable where shardserve is built and tested, so each entry keeps a real
checkpoint's config.json fields as that checkpoint ships them (rotary scaling, windows, tied
embeddings, biases, head_dim, EOS lists, generation_config.json, chat template, special tokens)
and shrinks only width, depth and vocabulary. The directory written is an ordinary Hugging Face
checkpoint, config.json in the legacy field names real checkpoints carry, so it loads through
exactly the code a real one does. Tests check the paged forward against transformers on these;
the GPU bench builds larger ones the same way.

Special tokens are named in the field tables (`"<|eot_id|>"`) and become the ids of the small
tokenizer written beside the weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallel.checkpoints.builtin_models import spread_weights, train_byte_bpe
from parallel.checkpoints.chat_templates import (
    GEMMA3_TEMPLATE,
    LLAMA2_TEMPLATE,
    LLAMA3_TEMPLATE,
    LLAMA32_TEMPLATE,
    MISTRAL_V3_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
)

VOCAB_SIZE = 512

@dataclass(frozen=True)
class TokenizerStyle:
    """A family's special tokens and how its tokenizer uses them."""

    special_tokens: list[str]
    bos: str | None
    eos: str
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    """The tokenizer prepends `bos` when encoding plain text (sentencepiece Llama/Mistral, Llama 3, Gemma)."""
    chat_template: str | None = None
    """None: a base checkpoint without one."""
    plain: tuple[str, ...] = ()
    """Added tokens (among `special_tokens`) that decode as text, as Qwen's <tool_call> does."""


LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
LLAMA31 = [*LLAMA3, "<|python_tag|>"]
SENTENCEPIECE = ["<unk>", "<s>", "</s>"]
MISTRAL_V3 = [*SENTENCEPIECE, "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
              "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]  # fmt: skip
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
QWEN_PLAIN = ("<tool_call>", "</tool_call>", "<think>", "</think>")
GEMMA = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@dataclass(frozen=True)
class Shape:
    real: str
    """The hub id whose config.json fields these are."""
    tokenizer: TokenizerStyle
    config: dict[str, Any]
    """config.json as the checkpoint ships it, width/depth/vocab shrunk; token fields by name."""
    generation_config: dict[str, Any] | None = None
    shrunk: list[str] = field(default_factory=list)
    """Which fields differ from the real checkpoint (the rest are its own)."""


_LLAMA_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
                 "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1, "torch_dtype": "bfloat16", "use_cache": True}
_WIDTH = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"]

SHAPES: dict[str, Shape] = {
    "llama-3.2-1b-instruct": Shape(
        "meta-llama/Llama-3.2-1B-Instruct",
        TokenizerStyle(LLAMA31, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, chat_template=LLAMA32_TEMPLATE),
        {**_LLAMA_COMMON, "architectures": ["LlamaForCausalLM"], "bos_token_id": "<|begin_of_text|>",
         "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "head_dim": 16, "hidden_size": 64,
         "intermediate_size": 256, "max_position_embeddings": 131072, "num_attention_heads": 4, "num_hidden_layers": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
        {"bos_token_id": "<|begin_of_text|>", "do_sample": True, "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
         "temperature": 0.6, "top_p": 0.9},
        [*_WIDTH, "head_dim"],
    ),
    # The first Llama 3 release: config.json names one EOS, generation_config.json the turn end too.
    "llama-3-8b-instruct": Shape(
        "meta-llama/Meta-Llama-3-8B-Instruct",
        TokenizerStyle(LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, chat_template=LLAMA3_TEMPLATE),
        {**_LLAMA_COMMON, "architectures": ["LlamaForCausalLM"], "bos_token_id": "<|begin_of_text|>",
         "eos_token_id": "<|end_of_text|>", "hidden_size": 64, "intermediate_size": 224, "max_position_embeddings": 8192,
         "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
         "rope_theta": 500000.0, "tie_word_embeddings": False},
        {"bos_token_id": "<|begin_of_text|>", "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"], "do_sample": True,
         "temperature": 0.6, "max_length": 4096, "top_p": 0.9},
        _WIDTH,
    ),
    "llama-2-7b-chat": Shape(
        "meta-llama/Llama-2-7b-chat-hf",
        TokenizerStyle(SENTENCEPIECE, bos="<s>", eos="</s>", unk="<unk>", add_bos=True, chat_template=LLAMA2_TEMPLATE),
        {**_LLAMA_COMMON, "architectures": ["LlamaForCausalLM"], "bos_token_id": "<s>", "eos_token_id": "</s>",
         "hidden_size": 64, "intermediate_size": 172, "max_position_embeddings": 4096, "num_attention_heads": 4,
         "num_hidden_layers": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
         "tie_word_embeddings": False},
        {"bos_token_id": "<s>", "do_sample": True, "eos_token_id": "</s>", "max_length": 4096, "pad_token_id": "<unk>",
         "temperature": 0.6, "top_p": 0.9},
        _WIDTH,
    ),
    # A base checkpoint: no chat template.
    "mistral-7b-v0.1": Shape(
        "mistralai/Mistral-7B-v0.1",
        TokenizerStyle(SENTENCEPIECE, bos="<s>", eos="</s>", unk="<unk>", add_bos=True),
        {"architectures": ["MistralForCausalLM"], "bos_token_id": "<s>", "eos_token_id": "</s>", "hidden_act": "silu",
         "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 224, "max_position_embeddings": 32768,
         "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 32, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "use_cache": True},
        {"bos_token_id": "<s>", "eos_token_id": "</s>"},
        [*_WIDTH, "sliding_window"],
    ),
    # The instruct release with function calling: control tokens for tools, no window.
    "mistral-7b-instruct-v0.3": Shape(
        "mistralai/Mistral-7B-Instruct-v0.3",
        TokenizerStyle(MISTRAL_V3, bos="<s>", eos="</s>", unk="<unk>", add_bos=True, chat_template=MISTRAL_V3_TEMPLATE),
        {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": "<s>", "eos_token_id": "</s>",
         "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 224,
         "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True},
        {"bos_token_id": "<s>", "eos_token_id": "</s>"},
        _WIDTH,
    ),
    "qwen2.5-7b-instruct": Shape(
        "Qwen/Qwen2.5-7B-Instruct",
        TokenizerStyle(QWEN, bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN25_TEMPLATE,
                       plain=QWEN_PLAIN),
        {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": "<|endoftext|>",
         "eos_token_id": "<|im_end|>", "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
         "intermediate_size": 336, "max_position_embeddings": 32768, "max_window_layers": 4, "model_type": "qwen2",
         "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
         "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "use_cache": True, "use_sliding_window": False},
        {"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "do_sample": True,
         "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8,
         "top_k": 20},
        [*_WIDTH, "max_window_layers"],
    ),
    "qwen3-0.6b": Shape(
        "Qwen/Qwen3-0.6B",
        TokenizerStyle(QWEN, bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN3_TEMPLATE,
                       plain=QWEN_PLAIN),
        {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "head_dim": 32, "hidden_act": "silu",
         "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192, "max_position_embeddings": 40960,
         "max_window_layers": 4, "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
         "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
         "use_sliding_window": False},
        {"bos_token_id": "<|endoftext|>", "do_sample": True, "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
         "pad_token_id": "<|endoftext|>", "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        [*_WIDTH, "head_dim", "max_window_layers"],
    ),
    "gemma-3-1b-it": Shape(
        "google/gemma-3-1b-it",
        TokenizerStyle(GEMMA, bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>", add_bos=True,
                       chat_template=GEMMA3_TEMPLATE),
        {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": None, "bos_token_id": "<bos>", "cache_implementation": "hybrid",
         "eos_token_id": ["<eos>", "<end_of_turn>"], "final_logit_softcapping": None, "head_dim": 32,
         "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 384,
         "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 6,
         "num_key_value_heads": 1, "pad_token_id": "<pad>", "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-06,
         "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 32,
         "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True},
        {"bos_token_id": "<bos>", "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": ["<eos>", "<end_of_turn>"],
         "pad_token_id": "<pad>", "top_k": 64, "top_p": 0.95},
        [*_WIDTH, "head_dim", "query_pre_attn_scalar", "sliding_window"],
    ),
    # The text tower of the 27B: two KV heads per four (tp=2 needs them), linear rope scaling on global layers.
    "gemma-3-27b-it-text": Shape(
        "google/gemma-3-27b-it (text_config)",
        TokenizerStyle(GEMMA, bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>", add_bos=True,
                       chat_template=GEMMA3_TEMPLATE),
        {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": None, "bos_token_id": "<bos>", "eos_token_id": ["<eos>", "<end_of_turn>"],
         "final_logit_softcapping": None, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64,
         "initializer_range": 0.02, "intermediate_size": 256, "max_position_embeddings": 131072,
         "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 6, "num_key_value_heads": 2,
         "pad_token_id": "<pad>", "query_pre_attn_scalar": 21, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
         "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "sliding_window": 32,
         "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True},
        {"bos_token_id": "<bos>", "do_sample": True, "eos_token_id": ["<eos>", "<end_of_turn>"], "pad_token_id": "<pad>",
         "top_k": 64, "top_p": 0.95},
        [*_WIDTH, "head_dim", "query_pre_attn_scalar", "sliding_window"],
    ),
}


def write_shaped_checkpoint(name: str, out: Path | None = None, seed: int = 0, **overrides: Any) -> Path:
    """Write the shape `name` as a checkpoint directory (a new temporary one unless `out`);
    `overrides` replace config.json fields (e.g. a longer window)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[name]
    out = Path(out or tempfile.mkdtemp(prefix=f"{name}-"))
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(shape.tokenizer, out, seed)
    raw = _with_ids({**shape.config, "vocab_size": VOCAB_SIZE, **overrides}, ids)
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = AutoConfig.for_model(raw["model_type"], **fields)
    config.architectures = raw["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spread_weights(model, vectors_too=True)
    model.save_pretrained(out, safe_serialization=True)
    # The checkpoint's own config.json (legacy field names), not transformers' normalised rewrite.
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    generation = out / "generation_config.json"
    if shape.generation_config is None:
        generation.unlink(missing_ok=True)
    else:
        generation.write_text(json.dumps(_with_ids(shape.generation_config, ids), indent=2))
    return out


def _with_ids(fields: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    def convert(key: str, value: Any) -> Any:
        if not key.endswith("token_id"):
            return value
        if isinstance(value, list):
            return [ids[v] for v in value]
        return ids[value] if isinstance(value, str) else value

    return {k: convert(k, v) for k, v in fields.items()}


def _write_tokenizer(style: TokenizerStyle, out: Path, seed: int) -> dict[str, int]:
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_bpe(VOCAB_SIZE, style.special_tokens, seed, unk_token=style.unk)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in style.plain])  # re-flags, same ids
    ids = {t: tok.token_to_id(t) for t in style.special_tokens}
    if style.add_bos and style.bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A {style.bos} $B", special_tokens=[(style.bos, ids[style.bos])]
        )
    named = {style.bos, style.eos, style.pad, style.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        unk_token=style.unk,
        additional_special_tokens=[t for t in style.special_tokens if t not in named and t not in style.plain],
    )
    if style.chat_template is not None:
        fast.chat_template = style.chat_template
    fast.save_pretrained(out)
    return ids
