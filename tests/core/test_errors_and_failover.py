"""Every failure answers in OpenAI's shape; failover happens only before the first byte."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from gateway.config import Upstream
from tests.core.conftest import settings_for
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import RunningGateway, running_gateway

CHAT = {"model": "test-1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def post(
    gw: RunningGateway, body: bytes | dict[str, Any], path: str = "/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.base_url}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status, headers, await resp.read()


def assert_openai_error(body: bytes, code: str) -> None:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (b"", 400, "invalid_request"),
        (b'{"messages": []}', 400, "invalid_request"),
        (b'{"model": 5}', 400, "invalid_request"),
        (b'{"model": "no-such-model"}', 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    upstream: FakeUpstream, body: bytes, status: int, code: str
) -> None:
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        got_status, headers, got = await post(gw, body)
    assert got_status == status
    assert_openai_error(got, code)
    assert "x-request-id" in headers
    assert upstream.received == []


async def test_body_over_the_limit_is_413(upstream: FakeUpstream) -> None:
    settings = msgspec.structs.replace(settings_for(upstream.base_url), max_request_bytes=1000)
    async with running_gateway(settings) as gw:
        status, _, body = await post(gw, {**CHAT, "pad": "x" * 2000})
    assert status == 413
    assert_openai_error(body, "request_too_large")


async def test_unreachable_upstream_is_502() -> None:
    port = closed_port()
    async with running_gateway(settings_for(f"http://127.0.0.1:{port}/v1")) as gw:
        status, headers, body = await post(gw, CHAT)
        # tried twice (retry.attempts defaults to 2), each failure counted
        assert gw.metric("gateway_upstream_errors_total", upstream="up0", reason="connect") == 2
        assert gw.metric("gateway_upstream_retries_total", upstream="up0", reason="connect") == 1
    assert status == 502
    assert int(headers["retry-after"]) >= 1
    assert_openai_error(body, "upstream_error")
    assert str(port) not in body.decode()  # the client never learns the upstream's address


async def test_upstream_silent_before_headers_is_504(upstream: FakeUpstream) -> None:
    upstream.scripts.append(Script([b"data: [DONE]\n\n"], headers_delay_s=5))
    settings = settings_for(upstream.base_url, read_idle_timeout_s=0.3)
    async with running_gateway(settings) as gw:
        status, _, body = await post(gw, CHAT)
    assert status == 504
    assert_openai_error(body, "upstream_timeout")


async def test_pool_exhausted_is_503_with_retry_after(upstream: FakeUpstream) -> None:
    upstream.scripts.append(Script([b": wait\n\n"], then="hang"))
    settings = settings_for(upstream.base_url, max_connections=1, pool_timeout_s=0.2)
    async with (
        running_gateway(settings) as gw,
        aiohttp.ClientSession() as session,
        session.post(f"{gw.base_url}/chat/completions", json=CHAT) as holder,
    ):
        await holder.content.readany()  # the only connection is now busy
        status, headers, body = await post(gw, CHAT)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert_openai_error(body, "upstream_pool_exhausted")


async def test_upstream_dying_mid_stream_ends_with_one_sse_error_event(
    upstream: FakeUpstream,
) -> None:
    first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    upstream.scripts.append(Script([first], then="abort"))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, _, body = await post(gw, CHAT)
    assert status == 200
    assert body.startswith(first)
    rest = body[len(first) :]
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1
    assert orjson.loads(rest[6:])["error"]["code"] == "upstream_error"


async def test_5xx_and_429_fail_over_to_the_next_upstream(upstream: FakeUpstream) -> None:
    good = [b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"]
    async with fake_upstream() as second, fake_upstream() as third:
        upstream.scripts.append(Script([b"busy"], status=503, content_type="text/plain"))
        second.scripts.append(
            Script([b'{"error":{}}'], status=429, content_type="application/json")
        )
        third.scripts.append(Script(good))
        settings = settings_for(upstream.base_url, second.base_url, third.base_url)
        async with running_gateway(settings) as gw:
            status, _, body = await post(gw, CHAT)
            errors = {
                r: gw.metric("gateway_upstream_errors_total", upstream=u, reason=r)
                for u, r in (("up0", "status_5xx"), ("up1", "status_429"))
            }
    assert (status, body) == (200, b"".join(good))
    assert errors == {"status_5xx": 1, "status_429": 1}


async def test_connect_error_fails_over() -> None:
    async with fake_upstream() as second:
        second.scripts.append(Script([b"data: [DONE]\n\n"]))
        dead = f"http://127.0.0.1:{closed_port()}/v1"
        async with running_gateway(settings_for(dead, second.base_url)) as gw:
            status, _, body = await post(gw, CHAT)
    assert (status, body) == (200, b"data: [DONE]\n\n")


async def test_no_failover_after_the_first_byte(upstream: FakeUpstream) -> None:
    first = b'data: {"choices":[]}\n\n'
    async with fake_upstream() as second:
        upstream.scripts.append(Script([first], then="abort"))
        async with running_gateway(settings_for(upstream.base_url, second.base_url)) as gw:
            status, _, body = await post(gw, CHAT)
        assert second.received == []
    assert status == 200 and body.startswith(first) and b'"error"' in body


async def test_last_upstreams_5xx_becomes_502_and_keeps_retry_after(
    upstream: FakeUpstream,
) -> None:
    upstream.scripts.append(
        Script(
            [b"<html>oops</html>"],
            status=503,
            content_type="text/html",
            headers={"Retry-After": "7"},
        )
    )
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, headers, body = await post(gw, CHAT)
    assert status == 502
    assert headers["retry-after"] == "7"
    assert_openai_error(body, "upstream_error")


async def test_upstream_4xx_is_relayed_as_it_is(upstream: FakeUpstream) -> None:
    answer = b'{"error":{"message":"bad temperature","type":"invalid_request_error"}}'
    upstream.scripts.append(Script([answer], status=400, content_type="application/json"))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, _, body = await post(gw, CHAT)
    assert (status, body) == (400, answer)


async def test_client_disconnect_closes_the_upstream_connection_within_a_second(
    upstream: FakeUpstream,
) -> None:
    upstream.scripts.append(Script([b": hello\n\n"], then="hang"))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        session = aiohttp.ClientSession()
        resp = await session.post(f"{gw.base_url}/chat/completions", json=CHAT)
        await resp.content.readany()
        left = asyncio.get_running_loop().time()
        resp.close()
        await session.close()
        closed_at = await asyncio.wait_for(upstream.closed_events.get(), 5)
        assert closed_at - left < 1.0
        slots = gw.components.upstreams["up0"].slots
        for _ in range(50):
            if slots._value == 512:
                break
            await asyncio.sleep(0.02)
        assert slots._value == 512
        assert gw.metric("gateway_client_disconnects_total", team="anonymous", model="test-*") == 1


async def test_sequential_streams_reuse_a_handful_of_upstream_connections(
    upstream: FakeUpstream,
) -> None:
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        async with aiohttp.ClientSession() as session:
            for _ in range(1000):
                async with session.post(f"{gw.base_url}/chat/completions", json=CHAT) as resp:
                    assert await resp.read() == b"data: [DONE]\n\n"
    assert upstream.connections_opened <= 3


async def test_500_concurrent_streams_all_complete_byte_exact(upstream: FakeUpstream) -> None:
    pieces = [b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'] * 20
    upstream.default = Script([*pieces, b"data: [DONE]\n\n"], pause_s=0.005)
    expected = upstream.default.body
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> bytes:
                async with session.post(f"{gw.base_url}/chat/completions", json=CHAT) as resp:
                    return await resp.read()

            bodies = await asyncio.gather(*(one() for _ in range(500)))
    assert sum(body == expected for body in bodies) == 500


def test_upstream_settings_default_to_no_total_timeout() -> None:
    settings = Upstream(base_url="http://127.0.0.1:1/v1")
    assert settings.read_idle_timeout_s == 120.0 and settings.connect_timeout_s == 5.0
