"""`GET /v1/models` lists real ids: exact route names, and what pattern routes' upstreams list."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from structlog.testing import capture_logs

from gateway.app import MODEL_CATALOG
from gateway.config import Route, Settings, Upstream, default_settings
from gateway.sim import RunningSim, SimDefaults, running_sim
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway, running_gateway


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def models_asked(sim: RunningSim) -> int:
    """How many `GET /v1/models` the simulator received."""
    return sum(1 for r in sim.state.requests if r.path == "/v1/models")


async def listed(gw: RunningGateway) -> list[str]:
    client = await async_openai(gw.base_url)
    async with client:
        return [m.id for m in (await client.models.list()).data]


@asynccontextmanager
async def two_sims_and_a_dead_upstream() -> AsyncIterator[
    tuple[RunningGateway, RunningSim, RunningSim]
]:
    async with (
        running_sim(SimDefaults(models=("sim-a1", "other-x", "sim-shared"))) as a,
        running_sim(SimDefaults(models=("sim-b1", "sim-shared"))) as b,
    ):
        upstreams = {
            "a": Upstream(base_url=a.base_url, api_key="key-a"),
            "b": Upstream(base_url=b.base_url, api_key="key-b"),
            "down": Upstream(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="key-down"),
        }
        routes = (
            Route(models=("exact-one",), upstreams=("b",)),
            Route(models=("sim-b*",), upstreams=("a",)),  # claims sim-b1 (a does not list it)
            Route(models=("sim-*",), upstreams=("down", "a", "b")),
        )
        async with running_gateway(Settings(upstreams=upstreams, routes=routes)) as gw:
            yield gw, a, b


async def test_a_pattern_route_lists_the_matching_models_of_its_upstreams() -> None:
    async with two_sims_and_a_dead_upstream() as (gw, a, b):
        with capture_logs() as logs:
            models = await listed(gw)

    # exact names as they are; sim-b1 would go to the `sim-b*` route, whose upstream does not
    # serve it; other-x matches no route; the dead upstream adds nothing; no pattern is listed
    assert models == ["exact-one", "sim-a1", "sim-shared"]
    failures = [e for e in logs if e["event"] == "upstream_models_unavailable"]
    assert [f["upstream"] for f in failures] == ["down"]
    assert a.state.requests[-1].headers["Authorization"] == "Bearer key-a"
    assert b.state.requests[-1].headers["Authorization"] == "Bearer key-b"


async def test_model_lists_are_cached_for_a_minute() -> None:
    now = [1000.0]
    async with two_sims_and_a_dead_upstream() as (gw, a, b):
        gw.runner.app[MODEL_CATALOG].clock = lambda: now[0]
        with capture_logs() as logs:
            first = await listed(gw)
            second = await listed(gw)
            asked = (models_asked(a), models_asked(b))
            now[0] += 61
            await listed(gw)

        assert first == second
        assert asked == (1, 1)  # the second listing asked no upstream
        assert (models_asked(a), models_asked(b)) == (2, 2)
        # the dead upstream: one log line per failed fetch, not one per listing
        assert sum(e["event"] == "upstream_models_unavailable" for e in logs) == 2


async def test_the_default_configuration_lists_the_simulator_models() -> None:
    async with running_gateway(default_settings()) as gw:
        assert await listed(gw) == ["sim-small", "sim-large", "sim-reasoning"]
