"""ModelRunner over tensor_parallel_size x pipeline_parallel_size rank actors.

The replica process drives; the ranks compute. Rank actors live in the replica's placement
group (Ray Serve reserves it from `placement_group_bundles`, one bundle per rank after the
replica's own), so a replica and its ranks are scheduled, and released, together. Each step is
split into micro-batches: stage s works on micro-batch m+1 while stage s+1 works on m, because
Ray runs each actor's calls in submission order and the stages hand activations to each other
directly over torch.distributed.

Every wait is bounded: placement, rendezvous and load by `load_timeout_s`, a step by
`step_timeout_s`. A rank that dies or hangs fails the step with an error, never a hang; the
runner then kills its ranks so that none is left blocked in a collective.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from safetensors import safe_open

from parallel.checkpoints.loading import ModelLoadError, context_window, eos_token_ids, generation_config, load_model_config
from parallel.runner import KVCacheSpec, ModelInfo, ModelSpec, SampledToken, StepInput, StepOutput
from parallel.runners.kv_sizing import PoolPlan, host_free_bytes, plan_host_blocks, plan_pool, served_context
from parallel.runners.placement import ParallelLayout, ParallelSpec, check_heads, replica_bundles
from parallel.runners.rank_worker import RankReport, RankWorker

logger = logging.getLogger(__name__)


class RunnerFault(RuntimeError):
    """A rank died, a collective timed out or a step overran: the runner cannot continue."""


class DistributedModelRunner:
    def __init__(self, spec: ModelSpec, kv: KVCacheSpec, parallel: ParallelSpec) -> None:
        self._spec = spec
        self._kv = kv
        self._parallel = parallel
        self._workers: list[ray.actor.ActorHandle] = []
        self._own_pg: PlacementGroup | None = None
        self._layout: ParallelLayout | None = None
        self.reports: list[RankReport] = []
        self._fault: str | None = None

    def load(self) -> ModelInfo:
        spec, par = self._spec, self._parallel
        path, hf_config = load_model_config(spec)
        try:
            layout = ParallelLayout(par.tensor_parallel_size, par.pipeline_parallel_size, hf_config.num_hidden_layers)
            check_heads(hf_config.num_attention_heads, hf_config.num_key_value_heads, par.tensor_parallel_size)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        self._layout = layout
        window = context_window(hf_config, spec.max_model_len)
        start = time.monotonic()
        pg, offset = self._placement_group(layout.world_size)
        self._workers = [
            ray.remote(RankWorker)
            .options(
                num_cpus=par.cpus_per_rank,
                num_gpus=par.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=offset + r),
                max_restarts=0,
            )
            .remote()
            for r in range(layout.world_size)
        ]
        try:
            rendezvous = ray.get(self._workers[0].address.remote(), timeout=par.load_timeout_s)
            self.reports = ray.get(
                [
                    w.setup.remote(r, layout, rendezvous, spec, self._kv.block_size, par.step_timeout_s)
                    for r, w in enumerate(self._workers)
                ],
                timeout=par.load_timeout_s,
            )
            plan = self._plan_pool(window)
            host_blocks = self._plan_host()
            ray.get([w.allocate_kv.remote(plan.num_blocks, host_blocks) for w in self._workers], timeout=par.load_timeout_s)
        except ModelLoadError:
            self.shutdown()
            raise
        except Exception as exc:
            self.shutdown()
            raise ModelLoadError(f"loading {layout.world_size} ranks failed: {type(exc).__name__}: {exc}") from exc
        logger.info(
            "loaded %s on tp=%d x pp=%d ranks in %.1fs; per-rank parameter MiB %s",
            spec.model,
            layout.tensor_parallel_size,
            layout.pipeline_parallel_size,
            time.monotonic() - start,
            [round(r.parameter_bytes / 2**20, 1) for r in self.reports],
        )
        return ModelInfo(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            max_model_len=served_context(window, spec.max_model_len is not None, plan, self._kv.block_size),
            eos_token_ids=eos_token_ids(hf_config, generation_config(path)),
            num_parameters=_count_parameters(path),
            weight_bytes=sum(r.parameter_bytes for r in self.reports),
            dtype=spec.dtype,
            num_kv_blocks=plan.num_blocks,
            block_size=self._kv.block_size,
            model_window=window,
            kv_cache_bytes=plan.num_blocks * sum(r.kv_bytes_per_block for r in self.reports),
            kv_sizing=plan.reason,
            attention_backend=self.reports[0].attention_backend,
            fused_ops=self.reports[0].fused_ops,
            num_host_blocks=host_blocks,
        )

    def step(self, step_input: StepInput) -> StepOutput:
        if self._fault is not None:
            raise RunnerFault(self._fault)
        moves = step_input.saves or step_input.loads or step_input.offloads or step_input.onloads
        copies = self._copy_kv(step_input) if moves else {}
        if not step_input.seqs:
            return StepOutput([], **copies)
        output = self._forward(step_input)
        return replace(output, **copies) if copies else output

    def _copy_kv(self, step_input: StepInput) -> dict[str, tuple]:
        """Every rank's copies of its shard, before the forward: a chunk saved only if every
        rank wrote its file, a load used only if every rank read its own (the ranks agree on
        the least)."""
        refs = [w.copy_kv.remote(step_input) for w in self._workers]
        try:
            per_rank = ray.get(refs, timeout=self._parallel.step_timeout_s)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise RunnerFault(self._fault) from exc
        saved = tuple(
            None if any(w is None for w in written) else tuple(written) for written in zip(*(s for s, _ in per_rank), strict=True)
        )
        worst = {"ok": 0, "missing": 1, "bad": 2}
        loaded = tuple(max(outcomes, key=worst.__getitem__) for outcomes in zip(*(ld for _, ld in per_rank), strict=True))
        return {"saved": saved, "loaded": loaded}

    def _forward(self, step_input: StepInput) -> StepOutput:
        micro = _split(step_input, self._micro_batches(len(step_input.seqs)))
        last_rank = self._layout.world_size - self._layout.tensor_parallel_size  # type: ignore[union-attr]
        refs = [[w.step.remote(mb) for w in self._workers] for mb in micro]
        flat = [ref for per_mb in refs for ref in per_mb]
        _, pending = ray.wait(flat, num_returns=len(flat), timeout=self._parallel.step_timeout_s)
        try:
            if pending:
                raise RunnerFault(f"a step took longer than step_timeout_s={self._parallel.step_timeout_s}")
            ray.get(flat)  # surfaces a dead rank's error
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise RunnerFault(self._fault) from exc
        tokens: list[SampledToken] = []
        scores: list[SampledToken] = []
        embeddings: dict[int, list[float]] = {}
        for per_mb in refs:  # micro-batches keep the step's sequence order
            out = ray.get(per_mb[last_rank])
            tokens.extend(out.tokens)
            scores.extend(out.prompt_logprobs)
            embeddings.update(out.embeddings)
        return StepOutput(tokens=tokens, prompt_logprobs=scores, embeddings=embeddings)

    def logits(self, step_input: StepInput):
        """Last-stage logits for a step, whole (tests compare them with an unsharded model)."""
        refs = [w.logits.remote(step_input) for w in self._workers]
        return ray.get(refs, timeout=self._parallel.step_timeout_s)[-1]

    def health(self) -> None:
        if self._fault is not None:
            raise RunnerFault(self._fault)
        try:
            ray.get([w.ping.remote() for w in self._workers], timeout=10)
        except Exception as exc:
            self._fail(f"a rank does not answer: {type(exc).__name__}")
            raise RunnerFault(self._fault) from exc

    def shutdown(self) -> None:
        for w in self._workers:
            ray.kill(w, no_restart=True)
        self._workers = []
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None

    # ---- internals -------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        logger.error("sharded runner failed: %s; stopping its ranks", reason)
        self._fault = reason
        self.shutdown()

    def _micro_batches(self, num_seqs: int) -> int:
        pp = self._parallel.pipeline_parallel_size
        return 1 if pp == 1 else max(1, min(self._parallel.micro_batches, num_seqs))

    def _plan_pool(self, window: int) -> PoolPlan:
        """One block count for every rank: the least any rank can hold. Ranks of a replica on
        one node share its RAM (on cpu), so each is given its part of what is free there."""
        kv = self._kv
        frees = [0] * len(self._workers)
        if not (kv.num_blocks or kv.memory_bytes):
            refs = [w.free_bytes.remote(kv.max_num_batched_tokens) for w in self._workers]
            frees = ray.get(refs, timeout=self._parallel.load_timeout_s)
        on_node = Counter(r.node_id for r in self.reports)
        shared = self._spec.device != "cuda"  # each rank has a GPU of its own
        plans = [
            plan_pool(kv, r.kv_bytes_per_block, window, lambda f=free, n=on_node[r.node_id]: f // n if shared else f)
            for r, free in zip(self.reports, frees, strict=True)
        ]
        return min(plans, key=lambda p: p.num_blocks)

    def _plan_host(self) -> int:
        """One host tier size for every rank: the configured bytes for the whole replica split
        by rank, or a share of the host memory free now split among the ranks on each node."""
        kv, per_block = self._kv, max(r.kv_bytes_per_block for r in self.reports)
        if kv.host_memory_bytes is None and kv.host_memory_fraction <= 0:
            return 0
        if kv.host_memory_bytes is not None:
            return kv.host_memory_bytes // len(self.reports) // per_block
        most_on_a_node = max(Counter(r.node_id for r in self.reports).values())
        return plan_host_blocks(kv, per_block, lambda: host_free_bytes() // most_on_a_node)

    def _placement_group(self, world: int) -> tuple[PlacementGroup, int]:
        """The replica's own group (inside Serve; ranks take bundles 1..N) or one made here."""
        current = get_current_placement_group()
        if current is not None:
            if len(current.bundle_specs) < world + 1:
                raise ModelLoadError(f"the replica's placement group has {len(current.bundle_specs)} bundles; {world + 1} needed")
            return current, 1
        par = self._parallel
        bundles = replica_bundles(world, par.cpus_per_rank, par.gpus_per_rank, replica_cpus=0)[1:]
        pg = placement_group(bundles, strategy=par.placement_strategy)
        ready, _ = ray.wait([pg.ready()], timeout=par.load_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise ModelLoadError(_unplaceable(world, par))
        self._own_pg = pg
        return pg, 0


def _unplaceable(world: int, par: ParallelSpec) -> str:
    total = ray.cluster_resources()
    free = ray.available_resources()
    need = f"{world} ranks x {par.cpus_per_rank} CPU" + (f" + {par.gpus_per_rank} GPU" if par.gpus_per_rank else "")
    return (
        f"cannot place {need} ({par.placement_strategy}) within load_timeout_s={par.load_timeout_s}: "
        f"cluster has CPU {total.get('CPU', 0):g} (free {free.get('CPU', 0):g}), GPU {total.get('GPU', 0):g} "
        f"(free {free.get('GPU', 0):g})"
    )


def _split(step_input: StepInput, parts: int) -> list[StepInput]:
    """Micro-batches of about equal token counts, sequences kept in order."""
    if parts <= 1:
        return [step_input]
    total = sum(len(s.token_ids) for s in step_input.seqs)
    out: list[StepInput] = []
    current: list = []
    acc = 0
    for seq in step_input.seqs:
        current.append(seq)
        acc += len(seq.token_ids)
        if acc >= total * (len(out) + 1) / parts and len(out) < parts - 1:
            out.append(StepInput(seqs=current))
            current = []
    if current:
        out.append(StepInput(seqs=current))
    return out


def _count_parameters(path: Path) -> int:
    """Parameters in the checkpoint (int8 weights included, as `LocalModelRunner` counts them),
    read from the safetensors headers: no tensor is loaded."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(".weight_scale"):  # int8 scales are not parameters
                    total += math.prod(fh.get_slice(key).get_shape())
    return total
