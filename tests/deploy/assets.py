"""Where the shipped deployment files are, and the PromQL they contain.

The dashboard, the rules and the live-scrape tests all need the same list of expressions:
each panel query (with Grafana's template variables replaced by values Prometheus accepts),
each recording and alert rule. Collecting them here keeps the tests about behaviour.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llm-gateway.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "llm-gateway.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RECORDING_RULES = DEPLOY / "prometheus" / "rules" / "gateway-recording.yml"
ALERT_RULES = DEPLOY / "prometheus" / "rules" / "gateway-alerts.yml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "gateway-rules.test.yml"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GATEWAY_CONFIG = DEPLOY / "config" / "gateway.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_EXAMPLE = DEPLOY / "k8s" / "overlays" / "example"
LOADGEN = DEPLOY / "loadgen" / "demo_load.py"

#: Grafana's built-in variables, replaced by what they would be on a short time range
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
}

#: `$name`, `${name}`, `${name:format}` and `[[name]]`
TEMPLATE_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

#: a metric name the gateway exports, or a recording rule's name (level:metric:operation)
METRIC_NAME = re.compile(r"\b(?:[a-z_]+:)?gateway_[a-z_]+(?::[a-z0-9_]+)?\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def provisioned_datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    uid: str = source["uid"]
    return uid


def variables_in(text: str) -> set[str]:
    """The names of the template variables a query uses."""
    return {next(g for g in m.groups() if g) for m in TEMPLATE_VARIABLE.finditer(text)}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace every template variable by its value; an unknown one is a KeyError."""

    def replace(match: re.Match[str]) -> str:
        return values[next(g for g in match.groups() if g)]

    return TEMPLATE_VARIABLE.sub(replace, text)


def all_variables_match_everything(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Values for the built-ins and for each dashboard variable set to "All" (`.*`)."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        values[variable["name"]] = variable.get("allValue") or ".*"
    return values


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression shipped in a file, and where it comes from."""

    where: str
    expr: str


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Each panel target, with its template variables replaced by their "All" values."""
    values = all_variables_match_everything(dashboard)
    return [
        Query(f"{panel['title']} [{target['refId']}]", substitute(target["expr"], values))
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


@dataclass(frozen=True, slots=True)
class VariableQuery:
    """A `label_values(match, label)` template variable, its match already substituted."""

    name: str
    label: str
    match: str


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$")


def variable_queries(dashboard: Mapping[str, Any]) -> list[VariableQuery]:
    values = all_variables_match_everything(dashboard)
    found = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"variable {variable['name']}: not a label_values query: {text}")
        found.append(VariableQuery(variable["name"], match[2], substitute(match[1], values)))
    return found


def rules(path: Path) -> list[dict[str, Any]]:
    """Every rule of a rules file, in file order."""
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def recording_queries() -> list[Query]:
    return [Query(rule["record"], rule["expr"]) for rule in rules(RECORDING_RULES)]


def alert_queries() -> list[Query]:
    return [Query(rule["alert"], rule["expr"]) for rule in rules(ALERT_RULES)]


def metric_names(expr: str) -> set[str]:
    """The gateway metric and recorded series names an expression reads."""
    return set(METRIC_NAME.findall(expr))
