"""SIGHUP reloads the configuration file: new requests see the new teams, keys, limits and
routes; a stream in flight is not touched; an invalid file is rejected and the old one stays.

The signal itself is tested on a real process; what a reload keeps, replaces and closes is
tested in-process with `Reloader.reload()`, which the SIGHUP handler runs.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from gateway.aiohttp_private import set_idle_timeout
from gateway.app import SIM_RUNNERS
from gateway.config import load_settings
from gateway.reload import Reloader

from .helpers import chat, eventually, gateway, port_of, post, settled, sim_settings
from .process import GatewayProcess, gateway_process, write_yaml

ALPHA_KEY, BETA_KEY = "sk-alpha-7c1e", "sk-beta-93d0"


def sim(**options: float) -> dict[str, Any]:
    return {"simulator": {"chunks": 8, "delay_ms": 0, "ttft_ms": 0, **options}}


def route(pattern: str, upstream: str) -> dict[str, Any]:
    return {"models": [pattern], "upstreams": [upstream], "tokenizer": "chunks"}


def team(name: str, key: str, rpm: int) -> dict[str, Any]:
    return {"name": name, "keys": [key], "limits": {"requests_per_minute": rpm}}


V1 = {
    "upstreams": {"sim": sim()},
    "routes": [route("sim-*", "sim")],
    "teams": [team("alpha", ALPHA_KEY, 100)],
}
#: alpha's key gone, beta with a limit of 2 a minute, `sim` replaced by a new upstream `fresh`
V2 = {
    "upstreams": {"fresh": sim()},
    "routes": [route("fresh-*", "fresh")],
    "teams": [team("beta", BETA_KEY, 2)],
}
#: a route naming an upstream that does not exist: invalid
INVALID = {**V2, "routes": [route("fresh-*", "nowhere")]}


async def status_of(url: str, key: str, model: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/chat/completions",
            data=chat(model=model),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        await resp.read()
        return resp.status


async def slow_stream(url: str, key: str, started: asyncio.Event) -> bytes:
    body = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/chat/completions",
            data=chat({"chunks": 60, "delay_ms": 25}),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        async for piece in resp.content.iter_any():
            body += piece
            started.set()
    return bytes(body)


async def reload_with(gw: GatewayProcess, config: dict[str, Any], event: str, count: int) -> None:
    """Write `config`, send SIGHUP, wait for the count-th `event` log line."""
    await gw.write_config(config)
    gw.signal(signal.SIGHUP)
    await gw.line(lambda line: line["event"] == event and count == sum(
        1 for seen in gw.lines if seen["event"] == event
    ))  # fmt: skip


async def test_sighup_applies_a_new_configuration_without_dropping_a_stream(
    tmp_path: Path,
) -> None:
    async with gateway_process(V1, tmp_path) as gw:
        started = asyncio.Event()
        running = asyncio.create_task(slow_stream(gw.url, ALPHA_KEY, started))
        async with asyncio.timeout(10):
            await started.wait()
        await reload_with(gw, V2, "reloaded", 1)
        after = [
            await status_of(gw.url, ALPHA_KEY, "fresh-1"),  # alpha's key is gone
            await status_of(gw.url, BETA_KEY, "sim-1"),  # the sim-* route is gone
            await status_of(gw.url, BETA_KEY, "fresh-1"),  # the new route, the new upstream
            await status_of(gw.url, BETA_KEY, "fresh-1"),
            await status_of(gw.url, BETA_KEY, "fresh-1"),  # beta's new limit: 2 a minute
        ]
        streamed = await running  # it kept its old upstream, which closes only after it
        await reload_with(gw, INVALID, "reload_rejected", 1)
        rejected = next(line for line in gw.lines if line["event"] == "reload_rejected")
        kept = [
            await status_of(gw.url, ALPHA_KEY, "fresh-1"),
            await status_of(gw.url, BETA_KEY, "fresh-1"),  # still beta's limit of V2
        ]
        gw.signal(signal.SIGTERM)
        code = await gw.exit_code()
        lines = [line for line in gw.lines if line.get("event") == "request"]
    assert after == [401, 404, 200, 200, 429]
    assert streamed.endswith(b"data: [DONE]\n\n") and streamed.count(b'"content"') == 61
    stream_line = next(line for line in lines if line["team"] == "alpha" and line["status"] == 200)
    assert (stream_line["end"], stream_line["upstream"]) == ("completed", "sim")
    assert "nowhere" in rejected["error"]
    assert kept == [401, 429]
    assert code == 0


async def test_sighup_without_a_configuration_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    async with gateway_process(None, tmp_path) as gw:
        gw.signal(signal.SIGHUP)
        ignored = await gw.line(lambda line: line["event"] == "reload_ignored")
        status = await status_of(gw.url, "any", "sim-1")  # still serving
        gw.signal(signal.SIGTERM)
        code = await gw.exit_code()
    assert "--config" in ignored["reason"]
    assert (status, code) == (200, 0)


async def test_an_unreadable_or_invalid_file_is_rejected_and_the_old_configuration_stays(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    async with gateway(sim_settings()) as gw:
        reloader = Reloader(gw.runner, path)
        comp = gw.components
        before = (comp.settings, comp.router, comp.auth, dict(comp.upstreams), comp.limiter)
        with capture_logs() as logs:
            missing = await reloader.reload()
            await asyncio.to_thread(path.write_text, "upstreams: [not: a mapping", "utf-8")
            not_yaml = await reloader.reload()
            await write_yaml(path, {"limits": {"max_inflight": "many"}})
            wrong_type = await reloader.reload()
        after = (comp.settings, comp.router, comp.auth, dict(comp.upstreams), comp.limiter)
        answer = await post(gw, chat())
    assert (missing, not_yaml, wrong_type) == (False, False, False)
    assert [entry["event"] for entry in logs] == ["reload_rejected"] * 3
    assert "max_inflight" in logs[2]["error"]
    assert after == before
    assert answer.status == 200


def upstream_config(**upstreams: dict[str, Any]) -> dict[str, Any]:
    names = list(upstreams)
    return {"upstreams": upstreams, "routes": [route("sim-*", names[0])]}


async def test_unchanged_pools_are_kept_new_ones_made_removed_ones_closed_after_their_streams(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    first = upstream_config(sim=sim(), spare=sim())
    await write_yaml(path, first)
    settings = await asyncio.to_thread(load_settings, path)
    async with gateway(settings) as gw:
        reloader = Reloader(gw.runner, path)
        comp = gw.components
        kept, removed = comp.upstreams["sim"], comp.upstreams["spare"]
        started = asyncio.Event()
        await write_yaml(path, {**first, "routes": [route("sim-*", "spare")]})
        assert await reloader.reload()
        running = asyncio.create_task(slow_stream(gw.url, "any", started))
        async with asyncio.timeout(10):
            await started.wait()  # a stream on `spare`
        await write_yaml(path, upstream_config(sim=sim(), extra=sim(chunks=3)))
        assert await reloader.reload()
        added = comp.upstreams["extra"]
        assert comp.upstreams["sim"] is kept and not kept.pool.closed
        assert comp.upstreams["spare"] is removed and not removed.pool.closed  # in use
        streamed = await running
        await eventually(lambda: removed.pool.closed)
        assert "spare" not in comp.upstreams and len(gw.runner.app[SIM_RUNNERS]) == 2
        await reloader.aclose()
        await settled(gw)
    assert streamed.endswith(b"data: [DONE]\n\n")
    assert added.pool.closed and kept.pool.closed  # closed with the app


async def test_a_reload_that_changes_the_inflight_bounds_leaves_the_old_gate_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    async with gateway(sim_settings()) as gw:
        reloader = Reloader(gw.runner, path)
        old_gate = gw.components.inflight
        started = asyncio.Event()
        running = asyncio.create_task(slow_stream(gw.url, "any", started))
        async with asyncio.timeout(10):
            await started.wait()
        await write_yaml(path, {**upstream_config(sim=sim()), "limits": {"max_inflight": 3}})
        assert await reloader.reload()
        new_gate = gw.components.inflight
        answer = await post(gw, chat())
        await running
        await settled(gw)
    assert answer.status == 200
    assert new_gate is not old_gate and new_gate.max_inflight == 3
    assert old_gate.inflight == 0 and new_gate.inflight == 0


async def test_a_reload_applies_new_client_timeouts_to_new_requests_and_connections(
    tmp_path: Path,
) -> None:
    """Both slowloris bounds are reread: a body slower than the new body timeout gets 408, and
    a connection opened after the reload that sends nothing is closed after the new idle
    timeout (the defaults, 60 s and 75 s, would outlast the test's guard)."""
    path = tmp_path / "gateway.yaml"
    async with gateway(sim_settings()) as gw:
        reloader = Reloader(gw.runner, path)
        await write_yaml(
            path,
            {
                **upstream_config(sim=sim()),
                "client_body_timeout_s": 0.3,
                "client_idle_timeout_s": 0.3,
            },
        )
        assert await reloader.reload()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        body = chat()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]  # the rest never comes
        )
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            closed = await idle_reader.read()  # EOF: the server closed the idle connection
        for each in (writer, idle_writer):
            each.close()
        await reloader.aclose()
    assert head.startswith(b"HTTP/1.1 408")
    assert closed == b""


async def test_canary_aiohttp_still_takes_a_new_connections_idle_timeout_from_server_kwargs() -> (
    None
):
    """The one private attribute a reload writes (`web.Server._kwargs["keepalive_timeout"]`):
    when a release moves it, this fails by name and a reload logs `reload_partial`."""
    async with gateway(sim_settings()) as gw:
        assert set_idle_timeout(gw.runner.server, 12.5)
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        server = gw.runner.server
        assert server is not None
        await eventually(lambda: bool(server.connections))
        (handler,) = server.connections
        writer.close()
    assert handler.keepalive_timeout == 12.5  # public read-only property of the connection
    assert not set_idle_timeout(None, 1.0)
