"""SIGTERM drains, on a real `python -m gateway` process.

Readiness turns false and the listener closes at once; a stream in flight that ends within
`shutdown_grace_s` ends normally; one that does not is cut with an SSE error event
(`gateway_shutdown`); both are logged; the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from structlog.testing import capture_logs

from .helpers import SIM, assert_openai_error, chat, gateway, post, request_line, sim_settings
from .process import GatewayProcess, gateway_process

SIM_UPSTREAM = {"simulator": {"chunks": 16, "delay_ms": 0, "ttft_ms": 0}}
ROUTE = {"models": ["sim-*"], "upstreams": ["sim"], "tokenizer": "chunks"}


def config(**overrides: Any) -> dict[str, Any]:
    return {"upstreams": {"sim": SIM_UPSTREAM}, "routes": [ROUTE], **overrides}


async def stream(gw: GatewayProcess, steer: dict[str, Any], started: asyncio.Event) -> bytes:
    """A streamed chat answer, read to its end; `started` is set at its first bytes."""
    body = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.url}/v1/chat/completions", data=chat(steer)) as resp,
    ):
        assert resp.status == 200
        async for piece in resp.content.iter_any():
            body += piece
            started.set()
    return bytes(body)


async def refused(gw: GatewayProcess, timeout_s: float = 5.0) -> None:
    """Wait until a new connection can no longer get a ready answer."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession(connector=connector) as session:
        while True:
            try:
                async with session.get(gw.url + "/readyz") as resp:
                    if resp.status == 503:
                        return
            except aiohttp.ClientConnectorError:
                return
            await asyncio.sleep(0.02)


def last_event(body: bytes) -> Any:
    events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    return orjson.loads(events[-1]) if events[-1] != b"[DONE]" else "[DONE]"


async def test_sigterm_lets_streams_finish_within_the_grace_then_cuts_and_exits_0(
    tmp_path: Path,
) -> None:
    async with gateway_process(config(shutdown_grace_s=2), tmp_path) as gw:
        short_started, long_started = asyncio.Event(), asyncio.Event()
        short = asyncio.create_task(stream(gw, {"chunks": 20, "delay_ms": 40}, short_started))
        long = asyncio.create_task(stream(gw, {"chunks": 2000, "delay_ms": 20}, long_started))
        async with asyncio.timeout(10):
            await short_started.wait()
            await long_started.wait()
        gw.signal(signal.SIGTERM)
        await refused(gw)  # no new connection is served any more
        short_body, long_body = await asyncio.gather(short, long)
        code = await gw.exit_code()
        requests = [line for line in gw.lines if line.get("event") == "request"]
        events = [line["event"] for line in gw.lines]
    assert code == 0
    assert last_event(short_body) == "[DONE]"
    assert last_event(long_body)["error"]["code"] == "gateway_shutdown"
    ends = sorted((line["end"], line["error_code"]) for line in requests)
    assert ends == [("completed", None), ("rejected", "gateway_shutdown")]
    assert all(line["status"] == 200 and line["model"] == SIM for line in requests)
    assert events.index("draining") < events.index("drain_grace_expired") < events.index("stopped")


async def test_a_quiet_gateway_exits_0_at_once_on_sigterm(tmp_path: Path) -> None:
    async with gateway_process(config(shutdown_grace_s=30), tmp_path) as gw:
        gw.signal(signal.SIGTERM)
        code = await gw.exit_code(timeout_s=10)  # far less than the 30 s grace
        events = [line["event"] for line in gw.lines]
    assert code == 0
    assert "stopped" in events and "drain_grace_expired" not in events


async def test_while_draining_readiness_is_false_and_requests_get_503() -> None:
    """The drain's first step, seen by a connection that is still open."""
    async with gateway(sim_settings()) as gw:
        gw.components.lifecycle.draining = True
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/readyz") as resp:
            ready = resp.status
        with capture_logs() as logs:
            answer = await post(gw, chat())
            line = await request_line(logs)
        counted = gw.metric(
            "gateway_requests_total", team="anonymous", model="other", upstream="none", code="503"
        )
    assert ready == 503
    assert_openai_error(answer, 503, "draining")
    assert answer.headers["retry-after"] == "1"
    assert (line["end"], line["status"], counted) == ("rejected", 503, 1)
