"""A stream holds no copy of its prompt: once the upstream answered, the request body (and
the copy sent to `usage: inject` upstreams) is never sent again, and a stream that lasts
minutes must not keep megabytes of conversation per client."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest

from tests.core.conftest import settings_for
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
PROMPT_BYTES = 768 * 1024  # the fake upstream (aiohttp) takes bodies up to 1 MiB


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("traced")
async def test_a_running_stream_keeps_no_copy_of_its_prompt(upstream: FakeUpstream) -> None:
    upstream.scripts.append(Script([EVENT], then="hang"))  # the stream stays open
    async with running_gateway(settings_for(upstream.base_url, usage="inject")) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            payload = orjson.dumps(
                {
                    "model": "test-1",
                    "stream": True,
                    "messages": [{"role": "user", "content": "x" * PROMPT_BYTES}],
                }
            )
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(payload), payload)
            )
            del payload
            async with asyncio.timeout(10):
                await reader.readuntil(b"tok")  # the stream is under way
            upstream.received.clear()  # the fake upstream's own copy of what it got

            kept = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, "*/gateway/*")]
            )
            held = sum(stat.size for stat in kept.statistics("filename"))
            assert held < PROMPT_BYTES // 4
        finally:
            writer.close()
