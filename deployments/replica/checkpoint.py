"""What a replica knows about the checkpoint it serves, beyond the weights: its tokenizer and
chat template, every id that ends a generation, its generation_config.json sampling defaults,
and an identity that changes when the weights do.

Checkpoints ship these in several files that disagree: Llama 3 Instruct's config.json named one
EOS while generation_config.json and the tokenizer named the turn end too; Qwen2.5 sets its
sampling defaults only in generation_config.json; a base checkpoint has no chat template. The
replica takes the union of the EOS ids, applies the defaults where a request leaves a field out
(as vLLM does), and refuses a chat request it cannot render with a 400 that says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from deployments.config import ShardserveArgs
from deployments.errors import InvalidRequest
from deployments.tools import Tool
from deployments.types import ChatMessage, SamplingDefaults
from parallel.checkpoints.loading import checkpoint_fingerprint, generation_config
from parallel.runner import ModelInfo


@dataclass(frozen=True)
class ServedCheckpoint:
    tokenizer: PreTrainedTokenizerBase
    sampling_defaults: SamplingDefaults
    fingerprint: str
    generation: dict[str, Any]
    """generation_config.json as shipped ({} without one)."""
    quality: dict[str, Any] | None = None
    """What the model's training.json reports about it (the built-in doc-llama ships one): the
    held-out loss and perplexity, the corpus and the steps. None for other checkpoints."""

    @classmethod
    def open(cls, model_dir: Path, args: ShardserveArgs) -> ServedCheckpoint:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        generation = generation_config(model_dir)
        use = args.generation_config == "auto"
        defaults = SamplingDefaults.from_generation_config(generation) if use else SamplingDefaults()
        # The directory's name is the commit of a hub snapshot; the files' digest covers the rest
        # (an absolute path would keep replicas with different cache roots from sharing entries).
        parts = [args.model, args.revision, model_dir.name, args.dtype, args.generation_config, checkpoint_fingerprint(model_dir)]
        identity = "\0".join(str(p) for p in parts)
        fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return cls(tokenizer, defaults, fingerprint, generation, training_quality(model_dir))

    def with_stop_ids(self, info: ModelInfo) -> ModelInfo:
        """The runner's ModelInfo with the tokenizer's EOS added to the checkpoint's."""
        ids = list(info.eos_token_ids)
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int) and eos not in ids:
            ids.append(eos)
        return dataclasses.replace(info, eos_token_ids=tuple(ids))

    def render_chat(self, messages: list[ChatMessage], tools: list[Tool] | None = None) -> str:
        """The prompt text the model's own chat template makes of the turns, with the assistant's
        turn opened. InvalidRequest (400) when the checkpoint has no template, or when the
        template refuses the turns (Mistral and Gemma templates raise on a misplaced role), or
        when tools are offered to a template that never shows them to the model, or when there
        are no turns at all (transformers raises a bare ValueError on those)."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if not self.tokenizer.chat_template:
            raise InvalidRequest(
                "this model has no chat template (a base checkpoint?): use /v1/completions with a prompt, "
                "or serve a checkpoint whose tokenizer_config.json has a chat_template",
                param="messages",
                code="no_chat_template",
            )
        if tools and "tools" not in self.tokenizer.chat_template:
            raise InvalidRequest(
                "this model's chat template does not show tools to the model, so it cannot choose to call them: "
                "leave out tools, or serve a checkpoint whose template offers them (or describe the function in "
                "the messages and constrain the answer with response_format)",
                param="tools",
                code="tools_not_supported",
            )
        turns = [_turn(m) for m in messages]
        offered = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            return self.tokenizer.apply_chat_template(turns, tools=offered, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused the messages: {exc}", param="messages") from None


def _turn(message: ChatMessage) -> dict[str, Any]:
    """A turn as chat templates read it: an assistant's tool calls with their arguments as
    objects (templates render them with `tojson`), a tool result with the call it answers."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text()}
    extra = message.model_extra or {}
    if message.role == "assistant" and extra.get("tool_calls"):
        turn["tool_calls"] = [_call_for_template(c) for c in extra["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if extra.get(key) is not None:
            turn[key] = extra[key]
    return turn


def _call_for_template(call: Any) -> dict[str, Any]:
    function = dict(call.get("function", {})) if isinstance(call, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # left as the text it is: the template shows what the client sent
    return {"id": call.get("id") if isinstance(call, dict) else None, "type": "function", "function": function}


def training_quality(model_dir: Path) -> dict[str, Any] | None:
    """The held-out figures of training.json beside the weights, if the model has one."""
    path = model_dir / "training.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    keys = ("held_out_loss", "held_out_perplexity", "final_train_loss", "steps", "parameters")
    corpus = record.get("corpus", {})
    return {k: record[k] for k in keys if k in record} | {"corpus": corpus.get("source"), "corpus_sha256": corpus.get("sha256")}
