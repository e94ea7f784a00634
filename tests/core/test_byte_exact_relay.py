"""The client receives exactly the upstream's bytes, however the upstream shapes and splits them."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.core.conftest import settings_for
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway

HEAD = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
CHUNK = HEAD + b'"delta":{"content":"h\xc3\xa9llo"},"finish_reason":null}]}'
FINAL = HEAD + b'"delta":{},"finish_reason":"stop"}]}'
BIG = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (1 << 20) + b'"}}]}'

CORPUS: dict[str, list[bytes]] = {
    "lf": [CHUNK + b"\n\n", FINAL + b"\n\n", b"data: [DONE]\n\n"],
    "crlf": [CHUNK + b"\r\n\r\n", FINAL + b"\r\n\r\n", b"data: [DONE]\r\n\r\n"],
    "cr": [CHUNK + b"\r\r", b"data: [DONE]\r\r"],
    "comments_and_fields": [
        b": keep-alive\n\n",
        b"event: message\nid: 7\nretry: 1000\n" + CHUNK + b"\n\n",
        b"data: [DONE]\n\n",
    ],
    "multi_line_data": [b'data: {"a":\ndata: 1}\n\n', b"data: [DONE]\n\n"],
    "split_everywhere": [bytes([b]) for b in CHUNK + b"\r\n\r\n" + FINAL + b"\n\ndata: [DONE]\n\n"],
    "utf8_split": [CHUNK[:60], CHUNK[60:61], CHUNK[61:] + b"\n\n", b"data: [DONE]\n\n"],
    "no_final_newline": [CHUNK + b"\n\n", b"data: [DONE]"],
    "one_mib_line": [BIG[: 1 << 19], BIG[1 << 19 :] + b"\n\n", b"data: [DONE]\n\n"],
}


async def fetch(url: str, body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


@pytest.mark.parametrize("name", sorted(CORPUS))
async def test_client_bytes_equal_upstream_bytes(upstream: FakeUpstream, name: str) -> None:
    upstream.scripts.append(Script(CORPUS[name]))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, headers, body = await fetch(
            f"{gw.base_url}/chat/completions", {"model": "test-1", "stream": True, "messages": []}
        )
    assert status == 200
    assert body == b"".join(CORPUS[name])
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "x-request-id" in headers


async def test_request_body_goes_upstream_byte_for_byte_with_the_upstream_key(
    upstream: FakeUpstream,
) -> None:
    raw = b'{"model": "test-1",  "messages": [], "hideThink": false, "x": 1.50}'
    async with (
        running_gateway(settings_for(upstream.base_url)) as gw,
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.base_url}/chat/completions",
            data=raw,
            headers={"Authorization": "Bearer client-secret", "Content-Type": "application/json"},
        ) as resp,
    ):
        await resp.read()
    seen = upstream.received[0]
    assert seen.body == raw
    assert seen.headers["Authorization"] == "Bearer upstream-key-0"
    assert "client-secret" not in str(seen.headers)


async def test_hop_by_hop_headers_are_stripped_and_upstream_status_kept(
    upstream: FakeUpstream,
) -> None:
    upstream.scripts.append(
        Script(
            [b'{"ok": true}'],
            status=201,
            content_type="application/json",
            headers={"Keep-Alive": "timeout=5", "X-Upstream": "kept"},
        )
    )
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, headers, body = await fetch(f"{gw.base_url}/chat/completions", {"model": "test-1"})
    assert (status, body) == (201, b'{"ok": true}')
    assert headers["x-upstream"] == "kept"
    assert "keep-alive" not in headers


async def test_an_upstream_cookie_is_never_sent_back_for_another_request(
    upstream: FakeUpstream,
) -> None:
    """The gateway's upstream pool is shared by every team: a cookie one answer set must not
    ride along on the next request, and the client does not get it either."""
    upstream.scripts.append(
        Script(
            [b'{"ok": true}'],
            content_type="application/json",
            headers={"Set-Cookie": "session=team-a; Path=/"},
        )
    )
    by_name = upstream.base_url.replace("127.0.0.1", "localhost")  # a jar skips IP hosts
    async with running_gateway(settings_for(by_name)) as gw:
        for _ in range(2):
            status, headers, _ = await fetch(f"{gw.base_url}/chat/completions", {"model": "test-1"})
            assert status == 200
            assert "set-cookie" not in headers
    assert [r.headers.get("Cookie") for r in upstream.received] == [None, None]


async def test_each_chunk_reaches_the_client_before_the_next_is_sent(
    upstream: FakeUpstream,
) -> None:
    """No buffering: the first event arrives while the upstream still holds the rest."""
    first = b'data: {"n":1}\n\n'
    upstream.scripts.append(Script([first], then="hang"))
    async with (
        running_gateway(settings_for(upstream.base_url)) as gw,
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.base_url}/chat/completions", json={"model": "test-1", "stream": True}
        ) as resp,
    ):
        got = await asyncio.wait_for(resp.content.readexactly(len(first)), 5)
    assert got == first
