"""What the shipped dashboard and rules show when a real Prometheus scrapes a real gateway.

A query naming a series that does not exist, a label that is never set or a syntax Prometheus
rejects shows up as an empty panel or an alert that never fires, and only a live scrape catches
it. Here `python -m gateway` serves streams for several teams and models (through the official
openai SDK and the demo load generator, with a rate-limited team, an unreachable upstream and a
client that hangs up), a Prometheus with the shipped rules scrapes it every second, and then
every dashboard query and recording rule must return data, every alert expression must parse,
and `sum(rate(gateway_tokens_total[1m])) by (team)` must list the teams that streamed.

Bounded: about 20-40 s, all processes on 127.0.0.1 and stopped at the end of the module.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.deploy import assets
from tests.deploy.gateway_process import GatewayProcess, running_gateway_process
from tests.support.prometheus_server import (
    PrometheusError,
    PrometheusServer,
    free_port,
    prometheus_binary,
    running_prometheus,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(180)]

KEYS = {"alpha": "alpha-key", "beta": "beta-key", "gamma": "gamma-key", "loadgen": "loadgen-key"}
#: teams whose streams run across several scrapes, so their token rate is above zero
STEADY_TEAMS = {"alpha", "beta", "loadgen"}
#: gamma may send 2 requests a minute: the rest are refused with 429
GAMMA_REQUESTS_PER_MINUTE = 2
DATA_TIMEOUT_S = 40.0


def gateway_config(dead_port: int) -> dict[str, Any]:
    """Teams with keys, the built-in simulator behind sim-*, and an upstream nobody serves."""
    return {
        "shutdown_grace_s": 2,
        "upstreams": {
            "sim": {"simulator": {}, "usage": "inject"},
            "dead": {"base_url": f"http://127.0.0.1:{dead_port}/v1", "connect_timeout_s": 1},
        },
        "routes": [
            {"models": ["sim-small", "sim-large"], "upstreams": ["sim"], "tokenizer": "o200k_base"},
            {"models": ["sim-*"], "upstreams": ["sim"], "tokenizer": "chunks"},
            {"models": ["dead-*"], "upstreams": ["dead"]},
        ],
        "teams": [
            {"name": "alpha", "keys": [KEYS["alpha"]]},
            {"name": "beta", "keys": [KEYS["beta"]]},
            {
                "name": "gamma",
                "keys": [KEYS["gamma"]],
                "limits": {"requests_per_minute": GAMMA_REQUESTS_PER_MINUTE},
            },
            {"name": "loadgen", "keys": [KEYS["loadgen"]]},
        ],
        "limits": {"backend": "local"},
    }


# --- traffic --------------------------------------------------------------------------------


@dataclass(slots=True)
class Traffic:
    """What the clients saw, so a failure says whether the traffic or the metrics went wrong."""

    completed: int = 0
    limited: int = 0
    upstream_failed: int = 0
    disconnected: int = 0
    loadgen_exit: int | None = None
    errors: list[str] = field(default_factory=list)


def client(base_url: str, team: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=KEYS[team], max_retries=0, timeout=30)


async def stream(
    api: openai.AsyncOpenAI, model: str, chunks: int, delay_ms: int, traffic: Traffic
) -> None:
    """One streamed chat completion, read to the end; refusals and failures are tallied."""
    try:
        response = await api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "How are tokens counted while streaming?"}],
            stream=True,
            extra_body={"sim": {"chunks": chunks, "delay_ms": delay_ms}},
        )
        async for _ in response:
            pass
        traffic.completed += 1
    except openai.RateLimitError:
        traffic.limited += 1
    except openai.APIStatusError as exc:
        if exc.status_code not in {502, 503, 504}:
            raise
        traffic.upstream_failed += 1


async def hang_up(api: openai.AsyncOpenAI, traffic: Traffic) -> None:
    """Read the first chunk of a long stream, then close the connection."""
    response = await api.chat.completions.create(
        model="sim-large",
        messages=[{"role": "user", "content": "A long answer, please."}],
        stream=True,
        extra_body={"sim": {"chunks": 200, "delay_ms": 50}},
    )
    async for _ in response:
        break
    await response.close()
    traffic.disconnected += 1


async def steady(base_url: str, team: str, models: list[str], traffic: Traffic) -> None:
    """Sequential streams lasting a few seconds, so tokens grow across several scrapes."""
    async with client(base_url, team) as api:
        for model in models:
            await stream(api, model, chunks=12, delay_ms=40, traffic=traffic)


async def run_loadgen(base_url: str, traffic: Traffic) -> None:
    """The compose stack's demo load generator, bounded to a few requests."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(assets.LOADGEN),
        f"--base-url={base_url}",
        f"--key={KEYS['loadgen']}",
        "--model=sim-small",
        "--model=sim-chat",
        "--requests=6",
        "--concurrency=2",
        "--pause-s=0.2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    traffic.loadgen_exit = process.returncode
    if process.returncode != 0:
        traffic.errors.append(output.decode(errors="replace")[-2000:])


async def drive(base_url: str) -> Traffic:
    traffic = Traffic()
    models = ["sim-small", "sim-large", "sim-chat", "sim-small", "sim-large", "sim-small"]
    async with (
        client(base_url, "alpha") as alpha,
        client(base_url, "beta") as beta,
        client(base_url, "gamma") as gamma,
    ):
        await asyncio.gather(
            steady(base_url, "alpha", models, traffic),
            steady(base_url, "beta", list(reversed(models)), traffic),
            run_loadgen(base_url, traffic),
            hang_up(beta, traffic),
            *(stream(alpha, "dead-model", 4, 0, traffic) for _ in range(2)),
            *(stream(gamma, "sim-small", 8, 20, traffic) for _ in range(4)),
        )
    return traffic


# --- waiting for Prometheus -----------------------------------------------------------------


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, prometheus: PrometheusServer
) -> None:
    """Poll `check()` until it is true; fail with Prometheus's log if it never becomes so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout_s} s; prometheus log:\n{prometheus.log()[-3000:]}")


def scraped_once(prometheus: PrometheusServer) -> bool:
    return any(s["value"][1] == "1" for s in prometheus.query('up{job="gateway"}'))


def all_queries_have_data(prometheus: PrometheusServer) -> bool:
    queries = assets.dashboard_queries(assets.load_dashboard()) + assets.recording_queries()
    recorded = [assets.Query(q.where, q.where) for q in assets.recording_queries()]
    try:
        return all(prometheus.query(q.expr) for q in queries + recorded)
    except PrometheusError:
        return True  # a query that does not parse: its own test reports it


def rules_evaluated(prometheus: PrometheusServer) -> bool:
    groups = prometheus.get("/api/v1/rules")["groups"]
    return bool(groups) and all(
        rule["health"] != "unknown" for group in groups for rule in group["rules"]
    )


@dataclass(frozen=True, slots=True)
class Live:
    prometheus: PrometheusServer
    gateway: GatewayProcess
    traffic: Traffic


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (CI installs Debian's prometheus)")
    workdir: Path = tmp_path_factory.mktemp("live-scrape")
    config = gateway_config(dead_port=free_port())
    with (
        running_gateway_process(config, workdir) as gateway,
        running_prometheus([gateway.target], workdir, assets.RULE_FILES) as prometheus,
    ):
        wait_until(lambda: scraped_once(prometheus), 20, "first scrape", prometheus)
        traffic = asyncio.run(drive(gateway.url + "/v1"))
        wait_until(lambda: all_queries_have_data(prometheus), DATA_TIMEOUT_S, "data", prometheus)
        wait_until(lambda: rules_evaluated(prometheus), 10, "rule evaluation", prometheus)
        yield Live(prometheus, gateway, traffic)


# --- tests ------------------------------------------------------------------------------------


def test_traffic_streamed_was_limited_failed_upstream_and_hung_up_as_planned(live: Live) -> None:
    traffic = live.traffic
    assert traffic.errors == []
    assert traffic.loadgen_exit == 0
    assert traffic.completed >= 12 + 1
    assert traffic.limited >= 1
    assert traffic.upstream_failed == 2
    assert traffic.disconnected == 1


def test_token_rate_by_team_lists_every_team_that_streamed(live: Live) -> None:
    result = live.prometheus.query("sum(rate(gateway_tokens_total[1m])) by (team)")
    rates = {sample["metric"]["team"]: float(sample["value"][1]) for sample in result}
    assert set(rates) == set(KEYS)
    assert all(rates[team] > 0 for team in STEADY_TEAMS), rates


def test_token_series_carry_the_configured_model_labels(live: Live) -> None:
    models = live.prometheus.label_values("model", "gateway_tokens_total")
    assert set(models) >= {"sim-small", "sim-large", "sim-*"}


@pytest.mark.parametrize(
    "query", assets.dashboard_queries(assets.load_dashboard()), ids=lambda q: q.where
)
def test_dashboard_query_returns_data(live: Live, query: assets.Query) -> None:
    assert live.prometheus.query(query.expr), f"no data for: {query.expr}"


@pytest.mark.parametrize(
    "variable", assets.variable_queries(assets.load_dashboard()), ids=lambda v: v.name
)
def test_dashboard_variable_lists_values(live: Live, variable: assets.VariableQuery) -> None:
    values = live.prometheus.label_values(variable.label, variable.match)
    expected = set(KEYS) if variable.name == "team" else {"sim-small", "sim-large"}
    assert set(values) >= expected


@pytest.mark.parametrize("query", assets.recording_queries(), ids=lambda q: q.where)
def test_recording_rule_returns_data_and_is_recorded(live: Live, query: assets.Query) -> None:
    assert live.prometheus.query(query.expr), f"no data for: {query.expr}"
    assert live.prometheus.query(query.where), f"{query.where} was not recorded"


@pytest.mark.parametrize("query", assets.alert_queries(), ids=lambda q: q.where)
def test_alert_expression_parses_and_evaluates(live: Live, query: assets.Query) -> None:
    live.prometheus.query(query.expr)  # raises PrometheusError unless Prometheus accepts it


def test_prometheus_loaded_every_shipped_rule_and_each_evaluates_cleanly(live: Live) -> None:
    groups = live.prometheus.get("/api/v1/rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    shipped = [q.where for q in assets.recording_queries() + assets.alert_queries()]
    assert sorted(loaded) == sorted(shipped)
    assert {name: r["lastError"] for name, r in loaded.items() if r["health"] != "ok"} == {}
