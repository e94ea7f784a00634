"""Upstreams behind an HTTP proxy: the gateway reads HTTP_PROXY / HTTPS_PROXY / NO_PROXY when
it builds its upstream pools and tunnels through the proxy with CONNECT.

The proxy variables are set while the gateway starts and removed before the SDK client is
made: the gateway must have read them once, at start, and the client talks to it directly.
(TLS inside the tunnel is pinned in test_upstream_http, against a TLS server.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest

from gateway.config import Settings, default_settings
from tests.core.conftest import settings_for
from tests.support.clients import async_openai
from tests.support.connect_proxy import TunnelProxy, tunnel_proxy
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import RunningGateway, running_gateway

EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"through"},"finish_reason":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":" the proxy"},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")


@asynccontextmanager
async def gateway_started_with(
    env: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningGateway]:
    """A gateway started while `env` names the proxies; the variables are gone once it runs."""
    with monkeypatch.context() as started:
        for name in PROXY_VARIABLES:
            started.delenv(name, raising=False)
            started.delenv(name.lower(), raising=False)
        for name, value in env.items():
            started.setenv(name, value)
        gateway = running_gateway(settings)
        gw = await gateway.__aenter__()
    try:
        yield gw
    finally:
        await gateway.__aexit__(None, None, None)


async def stream_text(gw: RunningGateway, model: str = "test-1") -> str:
    client = await async_openai(gw.base_url, max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_requests_reach_the_upstream_through_the_proxy_named_at_start(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.scripts += [Script(EVENTS, pause_s=0.01), Script(EVENTS)]
    async with (
        tunnel_proxy() as proxy,
        gateway_started_with(
            {"HTTP_PROXY": proxy.url}, settings_for(upstream.base_url), monkeypatch
        ) as gw,
    ):
        assert [await stream_text(gw), await stream_text(gw)] == ["through the proxy"] * 2
    upstream_authority = upstream.url.removeprefix("http://")
    assert proxy.connects == [upstream_authority]  # one tunnel, its connection kept alive
    assert [r.path for r in upstream.received] == ["/v1/chat/completions"] * 2
    assert upstream.connections_opened == 1


async def test_no_proxy_sends_the_upstream_past_the_proxy(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.scripts.append(Script(EVENTS))
    env = {"NO_PROXY": "localhost,127.0.0.1"}
    async with tunnel_proxy() as proxy:
        env["HTTP_PROXY"] = proxy.url
        async with gateway_started_with(env, settings_for(upstream.base_url), monkeypatch) as gw:
            assert await stream_text(gw) == "through the proxy"
    assert proxy.connects == []
    assert len(upstream.received) == 1


@pytest.mark.parametrize("refusal", ["407 Proxy Authentication Required", "403 Forbidden"])
async def test_a_proxy_refusing_connect_is_a_502_upstream_error(
    refusal: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: TunnelProxy
    async with (
        tunnel_proxy(refuse=refusal) as proxy,
        gateway_started_with(
            {"HTTP_PROXY": f"http://gw:pw@127.0.0.1:{proxy.port}"},
            settings_for(upstream.base_url),
            monkeypatch,
        ) as gw,
    ):
        with pytest.raises(openai.APIStatusError) as raised:
            await stream_text(gw)
        # one send and its retry (routes[].retry.attempts: 2), each refused by the proxy
        assert gw.metric("gateway_upstream_errors_total", upstream="up0", reason="connect") == 2
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "upstream_error"
    assert "ConnectFailed" in raised.value.body["message"]
    assert proxy.authorizations == ["Basic Z3c6cHc="] * 2  # gw:pw
    assert upstream.received == []


async def test_the_built_in_simulator_is_never_proxied(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator listens on the gateway host's loopback: a proxy could not reach it (this
    one refuses every CONNECT), whatever the environment says."""
    async with (
        tunnel_proxy(refuse="403 Forbidden") as proxy,
        gateway_started_with({"HTTP_PROXY": proxy.url}, default_settings(), monkeypatch) as gw,
    ):
        assert await stream_text(gw, model="sim-small")
    assert proxy.connects == []
