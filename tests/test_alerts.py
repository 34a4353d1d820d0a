"""The alerting rules in cluster/alerts/, checked by Prometheus's own promtool: they parse, every
alert fires on the series that should fire it and stays silent on healthy ones (the unit tests in
shardserve-rules.test.yml), and the Prometheus Operator's copy is the same rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ALERTS = Path(__file__).resolve().parent.parent / "cluster" / "alerts"


def installed(name: str, package: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs Debian's {package} package)")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return binary


def test_rules_parse_and_pass_their_unit_tests() -> None:
    tool = installed("promtool", "prometheus")
    check = subprocess.run([tool, "check", "rules", "shardserve-rules.yml"], cwd=ALERTS, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run([tool, "test", "rules", "shardserve-rules.test.yml"], cwd=ALERTS, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_the_scrape_config_loads_the_rules_and_the_alertmanager_example_is_valid() -> None:
    promtool = installed("promtool", "prometheus")
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=ALERTS.parent, capture_output=True, text=True)
    assert config.returncode == 0 and "1 rule files found" in config.stdout, config.stdout + config.stderr
    amtool = installed("amtool", "prometheus-alertmanager")
    route = subprocess.run([amtool, "check-config", "alertmanager.yml"], cwd=ALERTS, capture_output=True, text=True)
    assert route.returncode == 0, route.stdout + route.stderr


def test_every_alert_is_tested_firing_and_has_a_runbook() -> None:
    rules = [r for g in yaml.safe_load((ALERTS / "shardserve-rules.yml").read_text())["groups"] for r in g["rules"]]
    cases = [c for t in yaml.safe_load((ALERTS / "shardserve-rules.test.yml").read_text())["tests"] for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    for rule in rules:
        assert rule["alert"] in fired, f"{rule['alert']} has no test in which it fires"
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert "Runbook:" in rule["annotations"]["description"], rule["alert"]


def test_the_operators_prometheusrule_is_the_same_rules() -> None:
    from tools.prometheus_rule import render

    assert (ALERTS / "prometheusrule.yaml").read_text() == render(), "run python -m tools.prometheus_rule"
    doc = yaml.safe_load((ALERTS / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["spec"] == yaml.safe_load((ALERTS / "shardserve-rules.yml").read_text())
