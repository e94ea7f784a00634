"""The Prometheus files we ship: valid for promtool, each alert proven to fire and stay quiet,
reading only series the gateway exports, and the same rules for the Prometheus operator."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import assets
from tests.deploy.exported import exported_sample_names
from tests.deploy.tools import require, run


@pytest.mark.prometheus
def test_shipped_scrape_config_passes_promtool_check_config() -> None:
    output = run([require("promtool"), "check", "config", str(assets.PROMETHEUS_CONFIG)])
    assert "SUCCESS" in output


@pytest.mark.prometheus
def test_scrape_config_loads_the_shipped_rules_when_they_sit_where_compose_mounts_them(
    tmp_path: Path,
) -> None:
    config = assets.load_yaml(assets.PROMETHEUS_CONFIG)
    (pattern,) = config["rule_files"]
    assert pattern == "/etc/prometheus/rules/*.yml"  # compose mounts prometheus/rules there
    config["rule_files"] = [str(assets.RECORDING_RULES.parent / "*.yml")]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config), encoding="utf-8")
    output = run([require("promtool"), "check", "config", str(copy)])
    assert f"SUCCESS: {len(assets.RULE_FILES)} rule files found" in output
    for path in assets.RULE_FILES:
        assert f"Checking {path}\n  SUCCESS: {len(assets.rules(path))} rules found" in output


@pytest.mark.prometheus
@pytest.mark.parametrize("path", assets.RULE_FILES, ids=lambda p: p.name)
def test_rule_file_passes_promtool_check_rules(path: Path) -> None:
    output = run([require("promtool"), "check", "rules", str(path)])
    assert "SUCCESS" in output


@pytest.mark.prometheus
def test_rule_unit_tests_pass_promtool_test_rules() -> None:
    output = run(
        [require("promtool"), "test", "rules", assets.RULE_TESTS.name],
        cwd=assets.RULE_TESTS.parent,
    )
    assert "SUCCESS" in output


def _alert_tests() -> list[dict[str, Any]]:
    suite = assets.load_yaml(assets.RULE_TESTS)
    return [case for test in suite["tests"] for case in test.get("alert_rule_test", [])]


@pytest.mark.parametrize("alert", [q.where for q in assets.alert_queries()])
def test_each_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet(
    alert: str,
) -> None:
    cases = [case for case in _alert_tests() if case["alertname"] == alert]
    assert any(case["exp_alerts"] for case in cases), f"{alert}: no unit test makes it fire"
    assert any(not case["exp_alerts"] for case in cases), f"{alert}: no test keeps it quiet"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _readme_anchors() -> set[str]:
    headings = re.findall(r"^#+\s+(.+)$", assets.README.read_text(encoding="utf-8"), re.M)
    return {_github_anchor(h) for h in headings}


@pytest.mark.parametrize("rule", assets.rules(assets.ALERT_RULES), ids=lambda r: r["alert"])
def test_each_alert_has_summary_description_and_a_runbook_section_that_exists(
    rule: dict[str, Any],
) -> None:
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    link = re.match(r"deploy/README\.md#([\w-]+) - \S", annotations["runbook"])
    assert link, "runbook must start with 'deploy/README.md#<section> - <first step>'"
    assert link[1] in _readme_anchors(), f"deploy/README.md has no section #{link[1]}"
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def test_rules_read_only_series_the_gateway_exports_or_the_rules_record() -> None:
    known = exported_sample_names() | {q.where for q in assets.recording_queries()}
    queries = assets.recording_queries() + assets.alert_queries()
    unknown = {q.where: assets.metric_names(q.expr) - known for q in queries}
    assert {where: names for where, names in unknown.items() if names} == {}


def test_prometheus_operator_rule_holds_exactly_the_shipped_rule_groups() -> None:
    operator_rule = assets.load_yaml(assets.K8S_BASE / "prometheusrule.yaml")
    shipped = [g for path in assets.RULE_FILES for g in assets.load_yaml(path)["groups"]]
    assert operator_rule["kind"] == "PrometheusRule"
    assert operator_rule["spec"]["groups"] == shipped
