"""ModelRunner for tensor_parallel_size = pipeline_parallel_size = 1, in the replica process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PretrainedConfig

from parallel.checkpoints.loading import (
    DTYPES,
    ModelSpec,
    context_window,
    count_weights,
    eos_token_ids,
    generation_config,
    load_hf_model,
)
from parallel.checkpoints.validation import weight_bytes
from parallel.kv_tier.chunk_files import apply_copies
from parallel.model.architectures import architecture_of
from parallel.model.cpu_attention import attention_backend
from parallel.model.fused_layers import fuse_projections, fused_layer_ops
from parallel.model.host_memory import retain_freed_memory
from parallel.model.packed_linear import pack_linears
from parallel.model.paged_model import PagedCausalLM, PagedKVCache, kv_shape
from parallel.model.sampling import sample_step
from parallel.runner import KVCacheSpec, ModelInfo, SamplingSpec, SequenceStep, StepInput, StepOutput
from parallel.runners.kv_sizing import cuda_free_bytes_after, host_free_bytes, plan_host_blocks, plan_pool, served_context

logger = logging.getLogger(__name__)

T = TypeVar("T")

ModelLoader = Callable[[ModelSpec], tuple[torch.nn.Module, PretrainedConfig, Path]]
"""Makes the model a spec names: (model on the spec's device, its config, its directory)."""


class LocalModelRunner:
    """Holds the whole model and the paged KV pool.

    Every torch call (load and steps) runs on one thread that the runner owns. OpenMP keeps a
    spinning thread team per calling thread; a model loaded on one thread and stepped on
    another has two teams fighting over the cores, which made steps twice as slow on 2 cores.
    """

    def __init__(
        self, spec: ModelSpec, kv: KVCacheSpec, threads: int | None = None, load_model: ModelLoader = load_hf_model
    ) -> None:
        """`threads`: torch threads of the model (None: the process's default). `load_model`:
        how the model is made; a benchmark passes one that builds random weights on the device
        in seconds instead of reading gigabytes of a checkpoint written for the purpose."""
        self._spec = spec
        self._kv = kv
        self._threads = threads
        self._load_model = load_model
        self._paged: PagedCausalLM | None = None
        self._host: PagedKVCache | None = None  # the host tier behind the pool
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-model")
        self._thread_id = self._thread.submit(threading.get_ident).result()

    def load(self) -> ModelInfo:
        return self._thread.submit(self._load).result()

    def step(self, step_input: StepInput) -> StepOutput:
        return self.on_model_thread(self._step, step_input)

    def logits(self, step_input: StepInput) -> torch.Tensor:
        """Logits rows a step would sample from (tests compare sharded runners against these)."""
        return self.on_model_thread(lambda: self._paged.forward(self._paged.prepare(step_input)))

    def on_model_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn on the model thread (benchmarks time raw forwards there, like the steps); at
        once when called there already, so that fn may itself call `step` (a profiler opened
        on the model thread around several steps)."""
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._thread.submit(fn, *args).result()

    @property
    def model(self) -> torch.nn.Module:
        assert self._paged is not None, "load() first"
        return self._paged.model

    @property
    def paged(self) -> PagedCausalLM:
        """The paged forward, for benchmarks that time it apart from the step (on_model_thread)."""
        assert self._paged is not None, "load() first"
        return self._paged

    def _load(self) -> ModelInfo:
        start = time.monotonic()
        spec, kv = self._spec, self._kv
        if self._threads is not None:
            torch.set_num_threads(self._threads)  # on the model thread: OpenMP counts per thread
        retain_freed_memory()
        model, hf_config, path = self._load_model(spec)
        window = context_window(hf_config, spec.max_model_len)
        layers, kv_heads, head_dim = kv_shape(model)
        num_parameters, held_bytes = count_weights(model), weight_bytes(model)
        fused = fused_layer_ops(model, architecture_of(hf_config), spec.fused_ops)
        if fused is not None:
            fuse_projections(model)
        if spec.device == "cpu":
            pack_linears(model)  # before sizing the pool: a tied LM head's packed copy is memory too
        dtype = DTYPES[spec.dtype]
        per_block = PagedKVCache.bytes_per_block(layers, kv.block_size, kv_heads, head_dim, dtype)
        plan = plan_pool(kv, per_block, window, lambda: self._free_bytes(model))
        cache = PagedKVCache(layers, plan.num_blocks, kv.block_size, kv_heads, head_dim, dtype, spec.device)
        host_blocks = plan_host_blocks(kv, per_block, host_free_bytes)
        if host_blocks:
            self._host = PagedKVCache(layers, host_blocks, kv.block_size, kv_heads, head_dim, dtype, "cpu", zeroed=False)
        backend, attention = attention_backend(spec.attention_backend, spec.device, dtype)
        self._paged = PagedCausalLM(model, cache, attention, fused)
        info = ModelInfo(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            max_model_len=served_context(window, spec.max_model_len is not None, plan, kv.block_size),
            eos_token_ids=eos_token_ids(hf_config, generation_config(path)),
            num_parameters=num_parameters,
            dtype=spec.dtype,
            num_kv_blocks=plan.num_blocks,
            block_size=kv.block_size,
            model_window=window,
            kv_cache_bytes=plan.num_blocks * per_block,
            kv_sizing=plan.reason,
            weight_bytes=held_bytes,
            attention_backend=backend,
            fused_ops=fused is not None,
            num_host_blocks=host_blocks,
        )
        logger.info("loaded %s: %d parameters, %s, %.2fs", spec.model, info.num_parameters, spec.dtype, time.monotonic() - start)
        return info

    def _free_bytes(self, model: torch.nn.Module) -> int:
        """Memory the pool may take: host RAM now, or on cuda what a profiling forward of the
        largest step leaves (run over a pool just large enough for it, then released)."""
        if self._spec.device != "cuda":
            return host_free_bytes()
        kv, dtype = self._kv, DTYPES[self._spec.dtype]
        tokens = max(1, kv.max_num_batched_tokens)
        blocks = -(-tokens // kv.block_size)
        layers, kv_heads, head_dim = kv_shape(model)

        def profile() -> None:
            scratch = PagedKVCache(layers, blocks, kv.block_size, kv_heads, head_dim, dtype, self._spec.device)
            step = StepInput([SequenceStep(0, [0] * tokens, 0, list(range(blocks)), SamplingSpec())])
            paged = PagedCausalLM(model, scratch)
            paged.forward(paged.prepare(step))

        return cuda_free_bytes_after(profile)

    def _step(self, step_input: StepInput) -> StepOutput:
        assert self._paged is not None, "load() first"
        written, loaded = apply_copies(self._paged.cache, self._host, step_input)
        saved = tuple(None if w is None else (w,) for w in written)  # one rank's file per chunk
        if not step_input.seqs:
            return StepOutput([], saved=saved, loaded=tuple(loaded))
        batch = self._paged.prepare(step_input)
        out = self._paged.forward_outputs(batch)
        result = sample_step(out.values, step_input, out.pooled)
        if saved or loaded:
            result = replace(result, saved=saved, loaded=tuple(loaded))
        return result

    def health(self) -> None:
        if self._paged is None:
            raise RuntimeError("model not loaded")

    def shutdown(self) -> None:
        self._paged = self._host = None
        self._thread.shutdown(wait=False)
