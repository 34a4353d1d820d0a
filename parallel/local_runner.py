"""ModelRunner for tensor_parallel_size = pipeline_parallel_size = 1, in the replica process."""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from parallel.loading import ModelLoadError, ModelSpec, resolve_model_dir
from parallel.runner import ModelInfo, SampledToken, StepInput, StepOutput
from parallel.sampling import make_generator, sample_token

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LocalModelRunner:
    """Holds the whole model and, per running sequence, its KV cache and sampling generator."""

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._model: torch.nn.Module | None = None
        self._caches: dict[int, DynamicCache] = {}
        self._generators: dict[int, torch.Generator] = {}

    def load(self) -> ModelInfo:
        spec = self._spec
        path = resolve_model_dir(spec.model, spec.revision)
        start = time.monotonic()
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=_DTYPES[spec.dtype],
                use_safetensors=True,
                trust_remote_code=spec.trust_remote_code,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {spec.model!r} from {path}: {exc}") from exc
        self._model = model.to(spec.device).eval()
        limit = getattr(hf_config, "max_position_embeddings", None) or spec.max_model_len
        if spec.max_model_len is not None and limit is not None and spec.max_model_len > limit:
            raise ModelLoadError(f"max_model_len {spec.max_model_len} exceeds the model's context window {limit}")
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        info = ModelInfo(
            vocab_size=hf_config.vocab_size,
            max_model_len=spec.max_model_len or limit,
            eos_token_ids=eos_ids,
            num_parameters=sum(p.numel() for p in model.parameters()),
            dtype=spec.dtype,
        )
        logger.info(
            "loaded %s (%d parameters, %s) in %.2fs",
            spec.model,
            info.num_parameters,
            spec.dtype,
            time.monotonic() - start,
        )
        return info

    @torch.inference_mode()
    def step(self, step_input: StepInput) -> StepOutput:
        assert self._model is not None, "load() first"
        out: list[SampledToken] = []
        for seq in step_input.seqs:
            cache = self._caches.get(seq.seq_id)
            if cache is None:
                cache = self._caches[seq.seq_id] = DynamicCache()
                self._generators[seq.seq_id] = make_generator(seq.sampling.seed)
            ids = torch.tensor([seq.token_ids], device=self._spec.device)
            positions = torch.arange(seq.start_pos, seq.start_pos + len(seq.token_ids), device=self._spec.device)
            logits = self._model(
                input_ids=ids,
                position_ids=positions.unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
            out.append(sample_token(logits[0, -1], seq.sampling, self._generators[seq.seq_id], seq.seq_id))
        return StepOutput(tokens=out)

    def free(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._caches.pop(seq_id, None)
            self._generators.pop(seq_id, None)

    def health(self) -> None:
        if self._model is None:
            raise RuntimeError("model not loaded")

    def shutdown(self) -> None:
        self._model = None
        self._caches.clear()
        self._generators.clear()
