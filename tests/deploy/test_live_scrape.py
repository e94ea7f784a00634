"""What the shipped dashboard and rules show when a real Prometheus scrapes a real gateway.

A query naming a series that does not exist, a label that is never set or a syntax Prometheus
rejects shows up as an empty panel or an alert that never fires, and only a live scrape catches
it. Here `python -m gateway` serves streams for several teams and models (through the official
openai SDK and the demo load generator, with a rate-limited team, an unreachable upstream and a
client that hangs up), a Prometheus with the shipped rules scrapes it every second, and then
every dashboard query and recording rule must return data, every alert expression must parse,
and `sum(rate(gateway_tokens_total[1m])) by (team)` must list the teams that streamed.
The config has a balanced tier with a failing member, prices and a budget, so the upstreams
and spend panels have something to show too.

Bounded: about 20-40 s, all processes on 127.0.0.1 and stopped at the end of the module.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
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
DATA_TIMEOUT_S = 30.0


#: a model routed to a balanced tier whose second member nobody serves
FLAKY_MODEL = "flaky-chat"


def gateway_config(dead_port: int, workdir: Path) -> dict[str, Any]:
    """Teams with keys, the built-in simulator behind sim-*, and an upstream nobody serves."""
    config: dict[str, Any] = {
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
    add_a_failing_tier_member(config, dead_port)
    add_prices_and_a_budget(config, workdir)
    return config


def add_a_failing_tier_member(config: dict[str, Any], dead_port: int) -> None:
    """A tier of `sim` and an unserved replica that weighted balancing nearly always picks first.

    Its first connect error cools it down (max_failures 1, for longer than the test) and the
    retry on `sim` serves the client: a retry, a cooldown and an unhealthy upstream to show.
    """
    config["upstreams"]["dead-replica"] = {
        "base_url": f"http://127.0.0.1:{dead_port}/v1",
        "connect_timeout_s": 1,
        "weight": 100,
        "health": {"max_failures": 1, "window_s": 30, "cooldown_s": 300},
    }
    tier = {"models": ["flaky-*"], "upstreams": [["sim", "dead-replica"]], "balance": "weighted"}
    config["routes"].append(tier)


def add_prices_and_a_budget(config: dict[str, Any], workdir: Path) -> None:
    """sim-small priced (the other models stay unpriced), and budgets beta cannot exhaust."""
    config["pricing"] = [
        {"models": ["sim-small"], "input": 0.5, "cached_input": 0.25, "output": 1.5}
    ]
    beta = next(team for team in config["teams"] if team["name"] == "beta")
    beta["budgets"] = {"tokens_per_day": 10**9, "usd_per_month": 1000}
    config["limits"]["state_file"] = str(workdir / "gateway-state.db")


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
    api: openai.AsyncOpenAI, model: str, sim: dict[str, int], traffic: Traffic
) -> None:
    """One streamed chat completion, read to the end; refusals and failures are tallied."""
    try:
        response = await api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "How are tokens counted while streaming?"}],
            stream=True,
            extra_body={"sim": sim},
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
    sim = {"chunks": 12, "delay_ms": 40, "reasoning_chunks": 3}
    async with client(base_url, team) as api:
        for model in models:
            await stream(api, model, sim, traffic)


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


def flaky(api: openai.AsyncOpenAI, traffic: Traffic, count: int) -> list[Awaitable[None]]:
    """Streams of the model behind the failing tier member."""
    return [stream(api, FLAKY_MODEL, {"chunks": 4}, traffic) for _ in range(count)]


async def first_events(base_url: str, traffic: Traffic) -> None:
    """One of each kind of event, so each labelled counter exists before it grows.

    prometheus_client creates a labelled series at its first increment, and Prometheus's rate()
    does not count a series' first sample as growth: without this phase, a refusal or an
    upstream error that happens once would read as a rate of 0.
    """
    async with client(base_url, "alpha") as alpha, client(base_url, "gamma") as gamma:
        await asyncio.gather(
            stream(alpha, "dead-model", {"chunks": 4}, traffic),
            hang_up(alpha, traffic),
            *flaky(alpha, traffic, 2),
            *(stream(gamma, "sim-small", {"chunks": 8}, traffic) for _ in range(3)),
        )


async def drive(base_url: str, traffic: Traffic) -> None:
    """Several teams and models streaming for a few seconds, with refusals and failures."""
    models = ["sim-small", "sim-large", "sim-chat", "sim-small", "sim-large", "sim-small"]
    async with client(base_url, "alpha") as alpha, client(base_url, "gamma") as gamma:
        await asyncio.gather(
            steady(base_url, "alpha", models, traffic),
            steady(base_url, "beta", list(reversed(models)), traffic),
            run_loadgen(base_url, traffic),
            hang_up(alpha, traffic),  # same labels as the first phase, so it reads as growth
            *(stream(alpha, "dead-model", {"chunks": 4}, traffic) for _ in range(2)),
            *flaky(alpha, traffic, 2),
            *(stream(gamma, "sim-small", {"chunks": 8, "delay_ms": 20}, traffic) for _ in range(2)),
        )


# --- waiting for Prometheus -----------------------------------------------------------------

#: series the first phase creates, which must be scraped before the second phase grows them
FIRST_EVENTS = (
    "gateway_rate_limited_total",
    "gateway_upstream_errors_total",
    "gateway_client_disconnects_total",
)


def wait_for(
    pending: Callable[[], object],
    timeout_s: float,
    what: str,
    prometheus: PrometheusServer,
    required: bool = True,
) -> None:
    """Poll until `pending()` is falsy (nothing left to wait for).

    Past the timeout, a required wait fails naming what is still pending; an optional one
    returns, and the tests that check each item say which ones never came.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = pending()
        if not left:
            return
        time.sleep(0.5)
    if required:
        pytest.fail(
            f"{what}: still waiting after {timeout_s} s for {left!r}; "
            f"prometheus log:\n{prometheus.log()[-2000:]}"
        )


def scraped_once(prometheus: PrometheusServer) -> bool:
    return any(s["value"][1] == "1" for s in prometheus.query('up{job="gateway"}'))


def unscraped(prometheus: PrometheusServer, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not prometheus.query(name)]


def has_a_number(result: list[dict[str, Any]]) -> bool:
    """At least one sample whose value is a finite number (not NaN, not an infinity)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def growing(prometheus: PrometheusServer, name: str) -> bool:
    return has_a_number(prometheus.query(f"sum(rate({name}[1m])) > 0"))


def without_numbers(prometheus: PrometheusServer) -> list[str]:
    """The queries (and growing counters) that do not answer a finite number yet."""
    queries = assets.dashboard_queries(assets.load_dashboard()) + assets.recording_queries()
    queries += [assets.Query(q.where, q.where) for q in assets.recording_queries()]
    missing = []
    for query in queries:
        try:
            if not has_a_number(prometheus.query(query.expr)):
                missing.append(query.where)
        except PrometheusError:
            pass  # a query Prometheus rejects: its own test says which
    return missing + [f"rate({name})" for name in FIRST_EVENTS if not growing(prometheus, name)]


def unevaluated_rules(prometheus: PrometheusServer) -> list[str]:
    groups = prometheus.get("/api/v1/rules")["groups"]
    names = [rule["name"] for group in groups for rule in group["rules"]]
    waiting = [r["name"] for g in groups for r in g["rules"] if r["health"] == "unknown"]
    return waiting if names else ["no rules loaded"]


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
    config = gateway_config(dead_port=free_port(), workdir=workdir)
    with (
        running_gateway_process(config, workdir) as gateway,
        running_prometheus([gateway.target], workdir, assets.RULE_FILES) as prometheus,
    ):
        url = gateway.url + "/v1"
        traffic = Traffic()
        wait_for(lambda: not scraped_once(prometheus), 20, "first scrape", prometheus)
        asyncio.run(first_events(url, traffic))
        first = functools.partial(unscraped, prometheus, FIRST_EVENTS)
        wait_for(first, 20, "first events scraped", prometheus)
        asyncio.run(drive(url, traffic))
        answers = functools.partial(without_numbers, prometheus)
        wait_for(answers, DATA_TIMEOUT_S, "answers", prometheus, required=False)
        wait_for(lambda: unevaluated_rules(prometheus), 10, "rule evaluation", prometheus)
        yield Live(prometheus, gateway, traffic)


# --- tests ------------------------------------------------------------------------------------


def test_traffic_streamed_was_limited_failed_upstream_and_hung_up_as_planned(live: Live) -> None:
    traffic = live.traffic
    assert traffic.errors == []
    assert traffic.loadgen_exit == 0
    assert traffic.completed >= 12 + GAMMA_REQUESTS_PER_MINUTE
    assert traffic.limited >= 2
    assert traffic.upstream_failed == 3
    assert traffic.disconnected == 2


@pytest.mark.parametrize("counter", FIRST_EVENTS)
def test_refusals_upstream_errors_and_disconnects_show_as_a_rate(live: Live, counter: str) -> None:
    assert growing(live.prometheus, counter)


def test_token_rate_by_team_lists_every_team_that_streamed(live: Live) -> None:
    result = live.prometheus.query("sum(rate(gateway_tokens_total[1m])) by (team)")
    rates = {sample["metric"]["team"]: float(sample["value"][1]) for sample in result}
    assert set(rates) == set(KEYS)
    assert all(rates[team] > 0 for team in STEADY_TEAMS), rates


def test_token_series_carry_the_configured_model_labels_and_every_type(live: Live) -> None:
    models = live.prometheus.label_values("model", "gateway_tokens_total")
    assert set(models) >= {"sim-small", "sim-large", "sim-*"}
    types = live.prometheus.label_values("type", "gateway_tokens_total")
    assert set(types) == {"prompt", "completion", "reasoning"}


@pytest.mark.parametrize(
    "query", assets.dashboard_queries(assets.load_dashboard()), ids=lambda q: q.where
)
def test_dashboard_query_returns_data(live: Live, query: assets.Query) -> None:
    result = live.prometheus.query(query.expr)  # raises PrometheusError unless it is accepted
    assert has_a_number(result), f"no data for: {query.expr}"


@pytest.mark.parametrize(
    "variable", assets.variable_queries(assets.load_dashboard()), ids=lambda v: v.name
)
def test_dashboard_variable_lists_values(live: Live, variable: assets.VariableQuery) -> None:
    values = live.prometheus.label_values(variable.label, variable.match)
    expected = set(KEYS) if variable.name == "team" else {"sim-small", "sim-large"}
    assert set(values) >= expected


@pytest.mark.parametrize("query", assets.recording_queries(), ids=lambda q: q.where)
def test_recording_rule_returns_data_and_is_recorded(live: Live, query: assets.Query) -> None:
    assert has_a_number(live.prometheus.query(query.expr)), f"no data for: {query.expr}"
    assert has_a_number(live.prometheus.query(query.where)), f"{query.where} was not recorded"


@pytest.mark.parametrize("query", assets.alert_queries(), ids=lambda q: q.where)
def test_alert_expression_parses_and_evaluates(live: Live, query: assets.Query) -> None:
    live.prometheus.query(query.expr)  # raises PrometheusError unless Prometheus accepts it


def test_prometheus_loaded_every_shipped_rule_and_each_evaluates_cleanly(live: Live) -> None:
    groups = live.prometheus.get("/api/v1/rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    shipped = [q.where for q in assets.recording_queries() + assets.alert_queries()]
    assert sorted(loaded) == sorted(shipped)
    assert {name: r["lastError"] for name, r in loaded.items() if r["health"] != "ok"} == {}
