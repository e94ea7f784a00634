"""The Grafana dashboard and its provisioning: a structure Grafana loads, queries that parse,
read series the gateway exports, and cover what operators look for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import assets
from tests.deploy.exported import exported_sample_names
from tests.deploy.tools import require, run

GRID_WIDTH = 24
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "barchart", "text"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return assets.load_dashboard()


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(assets.iter_panels(dashboard["panels"]))


def _data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p["type"] not in {"row", "text"}]


def test_dashboard_has_the_top_level_fields_grafana_needs(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["uid"], str)
    assert 0 < len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert isinstance(dashboard["panels"], list)
    assert dashboard["panels"]
    assert isinstance(dashboard["templating"]["list"], list)
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns ids


def test_every_panel_has_a_unique_id_a_known_type_and_a_grid_position_on_the_grid(
    dashboard: dict[str, Any],
) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]


def test_no_two_panels_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_data_panel_has_targets_with_unique_ref_ids_and_an_expression(
    dashboard: dict[str, Any],
) -> None:
    for panel in _data_panels(dashboard):
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]


def test_every_datasource_reference_is_the_provisioned_prometheus(
    dashboard: dict[str, Any],
) -> None:
    expected = {"type": "prometheus", "uid": assets.provisioned_datasource_uid()}
    references = [v["datasource"] for v in dashboard["templating"]["list"]]
    for panel in _data_panels(dashboard):
        references.append(panel["datasource"])
        references.extend(t["datasource"] for t in panel["targets"])
    assert all(ref == expected for ref in references), references


def test_every_variable_used_is_defined_and_every_defined_variable_is_used(
    dashboard: dict[str, Any],
) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    texts = [t["expr"] for p in _data_panels(dashboard) for t in p["targets"]]
    texts += [v["definition"] for v in dashboard["templating"]["list"]]
    used = set().union(*(assets.variables_in(text) for text in texts))
    assert used - defined - set(assets.GRAFANA_BUILTINS) == set()
    assert defined - used == set()


def test_team_and_model_variables_list_label_values_and_allow_all(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) >= {"team", "model"}
    for query in assets.variable_queries(dashboard):
        assert query.label == query.name
        variable = variables[query.name]
        assert variable["type"] == "query"
        assert variable["includeAll"]
        assert variable["multi"]
        assert variable["allValue"] == ".*"


def test_panel_queries_filter_by_team_and_model_where_the_series_has_those_labels(
    dashboard: dict[str, Any],
) -> None:
    team_metrics = {
        "gateway_tokens_total",
        "gateway_active_streams",
        "gateway_requests_total",
        "gateway_cost_usd_total",
    }
    team_only_metrics = {"gateway_budget_used_ratio"}  # labels team, key, budget: no model
    for panel in _data_panels(dashboard):
        for target in panel["targets"]:
            names = assets.metric_names(target["expr"])
            if names & (team_metrics | team_only_metrics):
                assert '=~"$team"' in target["expr"], panel["title"]
            if names & team_metrics:
                assert '=~"$model"' in target["expr"], panel["title"]


def test_dashboard_reads_only_series_the_gateway_exports(dashboard: dict[str, Any]) -> None:
    known = exported_sample_names()
    unknown = {
        query.where: assets.metric_names(query.expr) - known
        for query in assets.dashboard_queries(dashboard)
    }
    assert {where: names for where, names in unknown.items() if names} == {}


def test_dashboard_covers_tokens_streams_latency_codes_limits_errors_and_drift(
    dashboard: dict[str, Any],
) -> None:
    read = set().union(*(assets.metric_names(q.expr) for q in assets.dashboard_queries(dashboard)))
    assert read >= {
        "gateway_tokens_total",
        "gateway_active_streams",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_inter_chunk_seconds_bucket",
        "gateway_requests_total",
        "gateway_rate_limited_total",
        "gateway_upstream_errors_total",
        "gateway_usage_estimated_tokens_total",
        "gateway_usage_upstream_tokens_total",
    }
    tokens_by_type = [
        q for q in assets.dashboard_queries(dashboard) if "by (team, model, type)" in q.expr
    ]
    assert tokens_by_type, "no panel splits tokens by team, model and type"


def _rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each row's title and the panels below it, up to the next row."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], list(panel.get("panels", [])))
        else:
            current.append(panel)
    return rows


def _row_exprs(dashboard: dict[str, Any], title: str) -> list[str]:
    return [t["expr"] for p in _rows(dashboard)[title] for t in p.get("targets", [])]


def test_upstreams_row_shows_inflight_health_cooldowns_retries_and_ttft_by_upstream(
    dashboard: dict[str, Any],
) -> None:
    exprs = _row_exprs(dashboard, "Upstreams")
    read = set().union(*(assets.metric_names(e) for e in exprs))
    assert read == {
        "gateway_upstream_inflight",
        "gateway_upstream_healthy",
        "gateway_upstream_cooldowns_total",
        "gateway_upstream_retries_total",
        "gateway_time_to_first_token_seconds_bucket",
    }
    ttft = [e for e in exprs if "gateway_time_to_first_token_seconds_bucket" in e]
    assert {e.split(",")[0] for e in ttft} == {"histogram_quantile(0.5", "histogram_quantile(0.99"}
    assert all("sum by (upstream, le)" in e for e in ttft), ttft
    rates = [e for e in exprs if "cooldowns_total" in e or "retries_total" in e]
    assert all("sum by (upstream, reason) (rate(" in e for e in rates), rates


def test_spend_row_shows_cost_rate_and_increase_budget_used_and_unpriced_tokens(
    dashboard: dict[str, Any],
) -> None:
    exprs = _row_exprs(dashboard, "Spend")
    cost = [e for e in exprs if "gateway_cost_usd_total" in e]
    assert any("sum by (team, model) (rate(" in e for e in cost), cost
    assert any("sum by (team, model) (increase(" in e and "[$__range]" in e for e in cost), cost
    assert any("by (team, key, budget)" in e for e in exprs if "gateway_budget_used_ratio" in e)
    assert any("by (model)" in e for e in exprs if "gateway_unpriced_tokens_total" in e)


def test_budget_panel_turns_orange_at_80_percent_and_red_at_100_percent(
    dashboard: dict[str, Any],
) -> None:
    (panel,) = [
        p
        for p in _data_panels(dashboard)
        if any("gateway_budget_used_ratio" in t["expr"] for t in p["targets"])
    ]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    steps = [(s["value"], s["color"]) for s in defaults["thresholds"]["steps"]]
    assert steps == [(None, "green"), (0.8, "orange"), (1, "red")]


@pytest.mark.prometheus
def test_every_dashboard_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (no server needed for the syntax)."""
    queries = assets.dashboard_queries(dashboard)
    rules = [{"record": f"dashboard:query:{i}", "expr": q.expr} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run([require("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(queries)} rules found" in output


def test_provisioning_loads_the_dashboard_directory_compose_mounts(
    dashboard: dict[str, Any],
) -> None:
    (provider,) = assets.load_yaml(assets.DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    grafana = assets.load_yaml(assets.COMPOSE)["services"]["grafana"]
    mounts = dict(_split_mount(m) for m in grafana["volumes"])
    source = mounts[provider["options"]["path"]]
    assert (assets.DEPLOY / source).resolve() == assets.DASHBOARD.parent


def test_provisioned_datasource_points_at_the_compose_prometheus() -> None:
    (source,) = assets.load_yaml(assets.DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in assets.load_yaml(assets.COMPOSE)["services"]


def _split_mount(mount: str) -> tuple[str, str]:
    """`./src:/target[:ro]` -> (target, src)."""
    source, target = mount.split(":")[:2]
    return target, source
