"""What the simulator records for tests: the requests it received and its connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.sim import (
    SIM_STATE,
    SimDefaults,
    SimState,
    create_sim_app,
    running_sim,
    start_sim,
)

from .helpers import chat, sse_json

AiohttpClient = Callable[..., Awaitable[TestClient[aiohttp.web.Request, aiohttp.web.Application]]]


async def test_recorder_keeps_method_path_headers_and_raw_body(
    session: aiohttp.ClientSession,
) -> None:
    raw = b'{"model": "sim-small",  "messages": [], "hideThink": false}'
    async with running_sim() as sim:
        url = sim.base_url + "/chat/completions?trace=1"
        async with session.post(url, data=raw, headers={"X-Custom": "yes"}) as resp:
            assert resp.status == 200
        seen = sim.state.requests[-1]

    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.query_string == "trace=1"
    assert seen.headers["X-Custom"] == "yes"
    assert seen.body == raw
    assert seen.json()["hideThink"] is False
    assert seen.peer is not None
    assert seen.peer.startswith("127.0.0.1:")


async def test_recorder_is_bounded(session: aiohttp.ClientSession) -> None:
    async with running_sim(SimDefaults(record_limit=3)) as sim:
        for i in range(5):
            async with session.post(sim.base_url + "/embeddings", json={"input": str(i)}):
                pass
        kept = [r.json()["input"] for r in sim.state.requests]

        assert kept == ["2", "3", "4"]
        assert sim.state.requests_received == 5


async def test_sequential_streams_reuse_one_connection(session: aiohttp.ClientSession) -> None:
    async with running_sim() as sim:
        for _ in range(1000):
            async with session.post(
                sim.base_url + "/chat/completions", json=chat(stream=True, sim={"chunks": 2})
            ) as resp:
                assert len(sse_json(await resp.read())) == 4

        assert sim.state.requests_received == 1000
        assert sim.state.connections_opened == 1
        peers = {r.peer for r in sim.state.requests}
        assert len(peers) == 1


async def test_connection_close_is_seen_within_a_second_of_the_client_leaving() -> None:
    async with running_sim() as sim:
        async with aiohttp.ClientSession() as session:
            body = chat(stream=True, sim={"chunks": 100, "delay_ms": 50})
            async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
                assert (sim.state.connections_opened, sim.state.connections_open) == (1, 1)
            # leaving the block mid-stream closes the connection

        async with asyncio.timeout(1):
            await sim.state.wait_for(lambda s: s.connections_closed == 1)
            await sim.state.wait_for(lambda s: s.active_requests == 0)


async def test_a_handler_waiting_on_ttft_ends_when_its_client_leaves() -> None:
    async with running_sim() as sim, aiohttp.ClientSession() as session:
        body = chat(stream=True, sim={"ttft_ms": 600_000})
        async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert sim.state.active_requests == 1
        resp.close()

        async with asyncio.timeout(1):
            await sim.state.wait_for(lambda s: s.active_requests == 0)


@pytest.mark.parametrize("fault", ["stall", "reset_mid_stream"])
async def test_no_handler_outlives_its_client_under_a_plain_runner(
    aiohttp_client: AiohttpClient, fault: str
) -> None:
    """Under pytest-aiohttp's runner, which does not cancel handlers on disconnect."""
    app = create_sim_app()
    client = await aiohttp_client(app)
    state: SimState = app[SIM_STATE]
    assert client.server.runner is not None
    assert client.server.runner.server is not None
    state.watch(client.server.runner.server)

    body = chat(stream=True, sim={"fault": fault, "fail_after": 1})
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    resp.close()

    async with asyncio.timeout(1):
        await state.wait_for(
            lambda s: s.active_requests == 0 and s.connections_closed == s.connections_opened == 1
        )


async def test_state_is_served_for_a_simulator_in_another_process(
    session: aiohttp.ClientSession,
) -> None:
    async with running_sim() as sim:
        async with session.post(sim.base_url + "/chat/completions", json=chat()):
            pass
        async with session.get(f"http://127.0.0.1:{sim.port}/sim/state") as resp:
            state = await resp.json()

    assert state == {
        "requests_received": 1,
        "active_requests": 0,  # /sim/* requests are not counted
        "connections_opened": 1,
        "connections_closed": 0,
        "connections_open": 1,
    }


async def test_start_sim_binds_the_port_it_is_given(free_port: int) -> None:
    runner, port = await start_sim(port=free_port, options=SimDefaults(chunks=1))
    try:
        assert port == free_port
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=chat(stream=True)) as r,
        ):
            assert len(sse_json(await r.read())) == 3
        assert runner.app[SIM_STATE].requests_received == 1
    finally:
        await runner.cleanup()
