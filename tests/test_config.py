"""Config validation happens when the app is built and names the bad field (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.app import build_app, llm_server_options
from deployments.config import ShardserveArgs, config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_build_app_takes_one_argument_as_serve_requires() -> None:
    import inspect

    assert len(inspect.signature(build_app).parameters) == 1


def test_embedded_default_config_validates() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    args = ShardserveArgs.model_validate(app["args"])
    assert args.model == "shardserve/doc-llama"
    assert config["http_options"]["host"] == "127.0.0.1"
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert llm["autoscaling_config"]["max_replicas"] >= llm["autoscaling_config"]["min_replicas"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"modle": "x"}, "modle"),
        ({"dtype": "float64"}, "dtype"),
        ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
        ({"engine": {"max_batch": 4}}, "engine.max_batch"),
        ({"limits": {"max_n": "lots"}}, "limits.max_n"),
        ({"max_model_len": 3}, "max_model_len"),
    ],
)
def test_bad_args_fail_build_naming_the_field(args, field) -> None:
    with pytest.raises(ValidationError) as info:
        build_app(args)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert field in locs


def test_float16_on_cpu_refused() -> None:
    with pytest.raises(ValidationError, match="float16"):
        ShardserveArgs(dtype="float16")


def test_replica_options_follow_engine_limits() -> None:
    args = ShardserveArgs.model_validate({"engine": {"max_num_seqs": 4, "max_waiting_requests": 6}})
    assert llm_server_options(args)["max_ongoing_requests"] == 10


def test_model_name_defaults_to_last_path_part() -> None:
    assert ShardserveArgs(model="/models/llama-3-8b/").model_name == "llama-3-8b"
    assert ShardserveArgs(model="x", served_model_name="y").model_name == "y"


def test_readme_config_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config_reference_markdown() in readme, "regenerate the README config reference (see README)"
