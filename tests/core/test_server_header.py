"""The `Server` header names the gateway, never the Python or aiohttp version it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from multidict import CIMultiDictProxy

from gateway.config import default_settings
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway, running_gateway


@pytest.fixture
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(default_settings()) as running:
        yield running


#: the project's name (pyproject.toml), and nothing about what it runs on
GATEWAY = "llm-stream-gateway"


def assert_names_the_gateway_only(server: str | None) -> None:
    assert server is not None
    assert "Python" not in server and "aiohttp" not in server
    assert server == GATEWAY


async def test_a_stream_answers_with_the_gateways_name_only(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    async for _ in raw.parse():
        pass
    await client.close()
    assert_names_the_gateway_only(raw.headers.get("Server"))


async def test_an_error_answers_with_the_gateways_name_only(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    with pytest.raises(openai.NotFoundError) as refused:
        await client.chat.completions.create(
            model="unrouted", messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()
    assert_names_the_gateway_only(refused.value.response.headers.get("Server"))


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/nowhere"])
async def test_every_other_answer_names_the_gateway_only(gw: RunningGateway, path: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(gw.url + path) as resp:
        await resp.read()
        headers: CIMultiDictProxy[str] = resp.headers
    assert_names_the_gateway_only(headers.get("Server"))


async def test_a_malformed_request_is_answered_with_the_gateways_name_only(
    gw: RunningGateway,
) -> None:
    """aiohttp answers a request it cannot parse itself, before any route or hook of the app."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    lines = head.decode("latin-1").split("\r\n")
    assert " 400 " in lines[0]
    servers = [
        line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("server:")
    ]
    assert servers == [GATEWAY]
