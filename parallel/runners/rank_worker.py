"""One rank of a sharded model replica, run as a Ray actor inside the replica's placement group.

A rank holds one pipeline stage's layers (its share of their heads when tensor-parallel, via
DeepSpeed AutoTP) and the matching slice of the KV pool. Every step it gets the same StepInput
as its peers: the first stage embeds the tokens, later stages receive the previous stage's
hidden states over torch.distributed, and the last stage samples. Tensor-parallel peers
all-reduce inside their stage's process group (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.checkpoints.int8_shards import requantize_shards
from parallel.checkpoints.loading import DTYPES, load_model_config
from parallel.kv_tier.chunk_files import apply_copies
from parallel.model.architectures import architecture_of
from parallel.model.cpu_attention import attention_backend
from parallel.model.fused_layers import fused_layer_ops
from parallel.model.host_memory import retain_freed_memory
from parallel.model.packed_linear import pack_linears
from parallel.model.paged_model import PagedCausalLM, PagedKVCache, StageOutput, kv_shape
from parallel.model.sampling import sample_step
from parallel.runner import ChunkWritten, LoadOutcome, ModelSpec, SamplingSpec, SequenceStep, StepInput, StepOutput
from parallel.runners.kv_sizing import cuda_free_bytes_after, host_free_bytes
from parallel.runners.placement import ParallelLayout, RankPlacement


@dataclass(frozen=True)
class RankReport:
    """What a rank loaded, for ModelInfo and for the memory figures in BENCHMARKS.md."""

    rank: int
    stage: int
    layers: tuple[int, int]
    kv_heads: int
    kv_bytes_per_block: int
    node_id: str
    parameter_bytes: int
    peak_rss_bytes: int
    load_seconds: float
    attention_backend: str
    fused_ops: bool


class _StageMPU:
    """The model-parallel-unit object DeepSpeed asks for: this stage's tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self._group = group

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self._group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._group)


class RankWorker:
    def __init__(self) -> None:
        self._paged: PagedCausalLM | None = None
        self._host: PagedKVCache | None = None  # the host tier behind the pool
        self._placement: RankPlacement | None = None
        self._listener: socket.socket | None = None

    def address(self) -> str:
        """Rank 0 opens the group's rendezvous store on this node's address (never 0.0.0.0)."""
        import ray

        host = ray.util.get_node_ip_address()
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.bind((host, 0))
        listener.listen(128)
        self._listener = listener  # the store serves on this socket; keep it open with the actor
        return f"{host}:{listener.getsockname()[1]}"

    def setup(
        self,
        rank: int,
        layout: ParallelLayout,
        rendezvous: str,
        spec: ModelSpec,
        block_size: int,
        timeout_s: float,
    ) -> RankReport:
        """Join the group and load this rank's weights; the KV pool comes after, once the
        driver has chosen a size every rank can hold (`free_bytes`, then `allocate_kv`)."""
        start = time.monotonic()
        retain_freed_memory()
        placement = layout.rank(rank)
        self._placement, self._layout, self._block_size, self._device = placement, layout, block_size, spec.device
        backend = "nccl" if spec.device == "cuda" else "gloo"
        _bind_collectives_to(rendezvous.rsplit(":", 1)[0].strip("[]"))
        if spec.device == "cuda":
            torch.cuda.set_device(0)  # Ray gives each rank actor its own GPU as device 0
        dist.init_process_group(
            backend,
            store=_rendezvous_store(rendezvous, rank, layout.world_size, timeout_s, self._listener),
            rank=rank,
            world_size=layout.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        # Every rank creates every stage's group, in the same order (a collective requirement).
        groups = [dist.new_group(layout.stage_ranks(s)) for s in range(layout.pipeline_parallel_size)]
        tp_group = groups[placement.stage]

        from parallel.runners.stage_loading import load_stage

        path, hf_config = load_model_config(spec)
        dtype = DTYPES[spec.dtype]
        model, int8_scales = load_stage(
            path,
            hf_config,
            placement.layers,
            placement.is_first_stage,
            layout.is_last_stage(placement.stage),
            dtype,
            spec.trust_remote_code,
        )
        if layout.tensor_parallel_size > 1:
            model = _shard_with_autotp(model, tp_group, layout.tensor_parallel_size, dtype, spec.device)
        if int8_scales:
            requantize_shards(model, int8_scales, tp_group)
        self._model = model.to(spec.device)
        self._kv_shape = kv_shape(self._model)
        self._hidden_size = hf_config.hidden_size
        self._dtype = dtype
        self._attention_name, self._attention = attention_backend(spec.attention_backend, spec.device, dtype)
        self._fused = fused_layer_ops(self._model, architecture_of(hf_config), spec.fused_ops)
        layers, kv_heads, head_dim = self._kv_shape
        import ray

        report = RankReport(
            rank=rank,
            stage=placement.stage,
            layers=placement.layers,
            kv_heads=kv_heads,
            kv_bytes_per_block=PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, dtype),
            node_id=ray.get_runtime_context().get_node_id(),
            parameter_bytes=sum(p.numel() * p.element_size() for p in self._model.parameters()),
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            load_seconds=time.monotonic() - start,
            attention_backend=self._attention_name,
            fused_ops=self._fused is not None,
        )
        if spec.device == "cpu":
            pack_linears(self._model)  # after counting: a packed weight is no parameter (parallel.model.packed_linear)
        return report

    def free_bytes(self, max_num_batched_tokens: int) -> int:
        """Memory this rank's pool may take: host RAM now; on cuda what a profiling forward of
        the largest step leaves. Called on every rank at once, like a step (the profile passes
        activations between stages and all-reduces within them)."""
        if self._device != "cuda":
            return host_free_bytes()
        blocks = -(-max_num_batched_tokens // self._block_size)
        self._paged = PagedCausalLM(self._model, self._pool(blocks), self._attention, self._fused)
        step = StepInput([SequenceStep(0, [0] * max_num_batched_tokens, 0, list(range(blocks)), SamplingSpec())])
        try:
            return cuda_free_bytes_after(lambda: self._run_stage(step))
        finally:
            self._paged = None

    def allocate_kv(self, num_blocks: int, host_blocks: int = 0) -> None:
        """The pool, and the host tier behind it (this rank's shard of both)."""
        self._paged = PagedCausalLM(self._model, self._pool(num_blocks), self._attention, self._fused)
        self._host = self._pool(host_blocks, "cpu", zeroed=False) if host_blocks else None

    def _pool(self, num_blocks: int, device: str | None = None, zeroed: bool = True) -> PagedKVCache:
        layers, kv_heads, head_dim = self._kv_shape
        dev = device or self._device
        return PagedKVCache(layers, num_blocks, self._block_size, kv_heads, head_dim, self._dtype, dev, zeroed)

    def step(self, step_input: StepInput) -> StepOutput | None:
        """Run this rank's part of one (micro-)batch; the last stage's first rank returns tokens."""
        out = self._run_stage(step_input)
        if out is None or self._placement.tp_rank != 0:  # type: ignore[union-attr]
            return None
        return sample_step(out.values, step_input, out.pooled)

    def copy_kv(self, step_input: StepInput) -> tuple[list[ChunkWritten | None], list[LoadOutcome]]:
        """This rank's shard of a step's copies between the pool and the tiers (its own files:
        `{rank}` is its rank)."""
        assert self._paged is not None and self._placement is not None, "setup() first"
        return apply_copies(self._paged.cache, self._host, step_input, self._placement.rank)

    def logits(self, step_input: StepInput) -> torch.Tensor | None:
        """The last stage's logits rows for a step (tests compare sharded against whole)."""
        out = self._run_stage(step_input)
        return None if out is None else out.values.float().cpu()

    def ping(self) -> int:
        return os.getpid()

    def listening_sockets(self) -> list[tuple[str, int]]:
        """(address, port) of every socket this rank's process listens on (the safety test)."""
        import psutil

        conns = psutil.Process().net_connections("inet")
        return sorted({(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN})

    def _run_stage(self, step_input: StepInput) -> StageOutput | None:
        """Receive from the previous stage, run this stage, send on; logits on the last stage."""
        assert self._paged is not None and self._placement is not None, "setup() first"
        placement, tp = self._placement, self._layout.tensor_parallel_size
        batch = self._paged.prepare(step_input)
        hidden = None
        if not placement.is_first_stage:
            hidden = torch.empty((batch.input_ids.numel(), self._hidden_size), dtype=self._dtype, device=self._device)
            dist.recv(hidden, src=placement.rank - tp)
        out = self._paged.forward_outputs(batch, hidden)
        if not self._layout.is_last_stage(placement.stage):
            dist.send(out.values.contiguous(), dst=placement.rank + tp)
            return None
        return out


def _rendezvous_store(
    address: str, rank: int, world_size: int, timeout_s: float, listener: socket.socket | None
) -> dist.TCPStore:
    """The group's key-value store. torch's own server would listen on every interface; rank 0
    hands it the socket `address()` bound to the node's address instead."""
    host, port = address.rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        if listener is None:
            raise RuntimeError("rank 0 serves the rendezvous: call address() before setup()")
        return dist.TCPStore(host, int(port), world_size, True, timeout, master_listen_fd=listener.fileno(), use_libuv=True)
    return dist.TCPStore(host, int(port), world_size, False, timeout)


def _bind_collectives_to(host: str) -> None:
    """gloo and nccl listen on the interface named in these variables (else whatever the
    hostname resolves to): name the one carrying the node's Ray address."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == host for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            os.environ["NCCL_SOCKET_IFNAME"] = name
            return
    raise RuntimeError(f"no network interface carries this node's address {host}")


def _shard_with_autotp(
    model: torch.nn.Module, group: dist.ProcessGroup, tp: int, dtype: torch.dtype, device: str
) -> torch.nn.Module:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU shared-memory all-reduce reduces over the whole world, not the stage's
    # group, and needs a JIT compile: use torch.distributed's all-reduce on the group instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": tp, "tp_group": group, "mpu": _StageMPU(group), "tp_grain_size": 8},
        dtype=dtype,
        replace_with_kernel_inject=False,
    )
    return engine.module
