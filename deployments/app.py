"""The `import_path` target of serve_config.yaml: validates args and binds the deployments.

Deployment options given here are the defaults; the `deployments:` section of serve_config.yaml
overrides them (autoscaling, resources, ...), as with any Ray Serve application.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import ShardserveArgs
from deployments.ingress.ingress import Ingress
from deployments.metrics import MetricsHub
from deployments.prefix_keys import ROUTING_STATS_PERIOD_S
from deployments.replica.llm_server import LLMServer
from parallel.checkpoints import model_repository
from parallel.checkpoints.model_repository import select_versions
from parallel.runners.placement import replica_bundles, unplaceable_reason

RAY_HIGH_THROUGHPUT_ENV: dict[str, str] = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
"""Ray Serve's high-throughput mode (Ray 2.55+, documented in Ray's KubeRay guide), exported
where Ray starts: HAProxy in front instead of Serve's Python proxy, the ingress replica taking
HTTP itself, gRPC between replicas, user code on the replica's own event loop. Each streamed
chunk then crosses one Python process fewer (see README "High-throughput mode"). Environment,
not config: Serve's controller and proxies read it when they start, before any app is built."""


def llm_server_options(args: ShardserveArgs) -> dict[str, Any]:
    """Replica options computed from the config, in one place.

    The engine batches, so Serve may send a replica as many requests as its engine can run plus
    queue; the engine's queue (`max_waiting_requests`) is where a request waits for a batch slot.
    Serve's own queue in front of the replicas only refills it: a running sequence that finishes
    is replaced from the engine's queue at once, so Serve needs to hold no more than the few
    requests a step frees. Every request held there waits batch times before the engine sees
    it: with a queue as long as the replica's capacity, goodput at twice the sustainable rate
    fell to 22% of peak (bench/overload.py). Beyond it Serve refuses at once (503), so no queue
    anywhere is unbounded; a burst refused by it while the replicas have room is sent again by
    the ingress (`PlacedCalls`).
    """
    options: dict[str, Any] = {
        "name": "LLMServer",
        "max_ongoing_requests": args.engine.replica_capacity,
        "max_queued_requests": args.engine.router_queue_size,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # A replica being drained (downscale, redeploy) finishes its in-flight generations
        # first; none can outlive request_timeout_s, so that is how long it may take.
        "graceful_shutdown_wait_loop_s": 1,
        "graceful_shutdown_timeout_s": args.engine.request_timeout_s,
        "ray_actor_options": {"num_cpus": 1},
    }
    if args.routing == "prefix_affinity" and args.engine.enable_prefix_caching:
        options["request_router_config"] = {
            "request_router_class": "deployments.routing:PrefixAffinityRouter",
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,  # the replicas' directory entries
        }
    if args.world_size > 1:
        # The replica (it only drives) and its ranks are reserved and released together.
        spec = args.parallel_spec()
        options["placement_group_bundles"] = replica_bundles(args.world_size, spec.cpus_per_rank, spec.gpus_per_rank, 1)
        options["placement_group_strategy"] = spec.placement_strategy
    elif args.device == "cuda":
        # The model runs in the replica: it needs a GPU of its own (Ray sets CUDA_VISIBLE_DEVICES),
        # or it could land on a node without one, or share cuda:0 with another replica.
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The `import_path` target: validates `args` (pydantic.ValidationError names a bad field).

    Also the target of a one-line start, `serve run deployments.app:build_app model=/path/to/model
    engine.max_num_seqs=8`: Serve passes such arguments as flat strings, so a dotted key is a
    nested field (pydantic turns "8" into 8)."""
    return bind_app(ShardserveArgs.model_validate(nested(args or {})))


def nested(args: dict[str, Any]) -> dict[str, Any]:
    """`{"engine.max_num_seqs": "8"}` as `{"engine": {"max_num_seqs": "8"}}`; other keys as they are."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"argument {key!r} sets a field inside {part!r}, which is given a value too")
        node[leaf] = value
    return out


def bind_app(
    config: ShardserveArgs,
    llm_server_overrides: dict[str, Any] | None = None,
    version_overrides: dict[int, dict[str, Any]] | None = None,
) -> Application:
    """The application for a validated config. `llm_server_overrides` (every LLM server) and
    `version_overrides` (one served version's) are for programmatic callers (benchmarks,
    tests) that have no `deployments:` section, e.g. `ray_actor_options`."""
    options = {**llm_server_options(config), **(llm_server_overrides or {})}
    if not config.parallel.allow_pending_placement:
        _check_placeable(*replica_demand(options))
    hub = serve.deployment(MetricsHub).options(
        name="MetricsHub",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
        # Every replica pushes its metrics every few seconds: an access-log line per push
        # flooded the `serve run` console with "CALL push OK".
        logging_config={"enable_access_log": False},
    ).bind()
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
        # A redeploy replaces the ingress too: its streams last as long as the LLM server's
        # (Serve's default of 20 s cut longer generations in the middle of a rollout).
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=options["graceful_shutdown_timeout_s"],
    )
    if config.repository is None:
        return ingress.bind(serve.deployment(LLMServer).options(**options).bind(config, hub), config, hub)
    versions = served_versions(config)
    llms = {
        v: serve.deployment(LLMServer).options(
            **{**options, "name": "LLMServer" if v == versions[-1] else f"LLMServer-v{v}", **(version_overrides or {}).get(v, {})}
        )
        .bind(config.for_version(v), hub)
        for v in versions
    }
    return ingress.bind(llms, config, hub)


def served_versions(config: ShardserveArgs) -> list[int]:
    """The repository versions this app serves (read from disk when the app is built, on the
    cluster); a label naming a version not served fails the build."""
    repo = config.repository
    assert repo is not None
    available = model_repository.versions(Path(repo.base_path), repo.name)
    versions = select_versions(available, repo.version_policy, repo.latest_n, repo.versions)
    named = {**{f"label {label}": v for label, v in repo.labels.items()}, **{f"traffic to {v}": v for v in repo.traffic or {}}}
    stray = {what: v for what, v in named.items() if v not in versions}
    if stray:
        raise ValueError(f"{sorted(stray)} name versions that are not served (served: {versions})")
    return versions


def replica_demand(options: dict[str, Any]) -> tuple[list[dict[str, float]], str]:
    """What one LLM server replica reserves: its placement group's bundles when sharded, else
    its own actor's resources (a GPU on cuda), as one bundle."""
    if "placement_group_bundles" in options:
        return options["placement_group_bundles"], options["placement_group_strategy"]
    actor = options.get("ray_actor_options", {})
    bundle = {"CPU": float(actor.get("num_cpus", 1)), "GPU": float(actor.get("num_gpus", 0))}
    return [{k: v for k, v in bundle.items() if v}], "STRICT_PACK"


def _check_placeable(bundles: list[dict[str, float]], strategy: str) -> None:
    """Fail the build, naming the missing resource, rather than leave a replica pending forever.

    The builder runs on the cluster (`serve run`/`serve deploy`), so Ray is up; elsewhere
    (building without a cluster) there is nothing to check against.
    """
    import ray

    if not ray.is_initialized():
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    reason = unplaceable_reason(bundles, strategy, nodes)
    if reason is not None:
        raise ValueError(f"cannot place the LLMServer: {reason}; set parallel.allow_pending_placement on an autoscaling cluster")
