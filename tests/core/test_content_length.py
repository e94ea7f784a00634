"""A whole (non-streamed) answer keeps the upstream's Content-Length instead of going chunked."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from gateway.config import Route, Settings, SimulatorSettings, Upstream
from tests.support.clients import async_openai
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway

from .conftest import settings_for

ANSWER = orjson.dumps({
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "test-model",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Ünïcödé " * 300},
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 3, "completion_tokens": 300, "total_tokens": 303},
})  # fmt: skip
SIM_SETTINGS = Settings(
    upstreams={"sim": Upstream(simulator=SimulatorSettings())},
    routes=(Route(models=("sim-*",), upstreams=("sim",)),),
)
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def whole(pieces: list[bytes], **fields: object) -> Script:
    body = b"".join(pieces)
    headers = {"Content-Length": str(len(body))}
    return Script(pieces, content_type="application/json", headers=headers, **fields)  # type: ignore[arg-type]


async def test_a_whole_answer_keeps_the_upstream_content_length(upstream: FakeUpstream) -> None:
    # three writes upstream: the length is the upstream's, not the size of a piece
    third = len(ANSWER) // 3
    upstream.scripts.append(whole([ANSWER[:third], ANSWER[third : 2 * third], ANSWER[2 * third :]]))
    async with running_gateway(settings_for(upstream.base_url)) as gw, aiohttp.ClientSession() as s:
        async with s.post(f"{gw.base_url}/chat/completions", json=BODY) as resp:
            body = await resp.read()
            headers = resp.headers

    assert resp.status == 200
    assert headers["Content-Length"] == str(len(ANSWER))
    assert "Transfer-Encoding" not in headers
    assert body == ANSWER


async def test_the_sdk_sees_the_simulator_content_length() -> None:
    async with running_gateway(SIM_SETTINGS) as gw:
        client = await async_openai(gw.base_url, max_retries=0)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model="sim-1", messages=[{"role": "user", "content": "hi"}]
            )
            answer = raw.parse()

    assert raw.headers["content-length"] == str(len(raw.content))
    assert "transfer-encoding" not in raw.headers
    assert answer.choices[0].message.content


async def test_streams_and_gzip_answers_still_go_out_chunked() -> None:
    stream_body = {**BODY, "model": "sim-1", "stream": True}
    gzip_body = {**BODY, "model": "sim-1", "sim": {"fault": "gzip"}}
    async with running_gateway(SIM_SETTINGS) as gw, aiohttp.ClientSession() as s:
        async with s.post(f"{gw.base_url}/chat/completions", json=stream_body) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        # the pool decodes gzip: the upstream's length is the compressed one, so it is dropped
        async with s.post(f"{gw.base_url}/chat/completions", json=gzip_body) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in resp.headers
            assert (await resp.json())["object"] == "chat.completion"


async def test_an_upstream_that_breaks_off_leaves_the_client_with_an_error(
    upstream: FakeUpstream,
) -> None:
    script = whole([ANSWER[:100]], then="abort")
    script.headers["Content-Length"] = str(len(ANSWER))  # it promised the whole answer
    upstream.scripts.append(script)
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        client = await async_openai(gw.base_url, max_retries=0)
        async with client:
            with pytest.raises(openai.APIConnectionError):
                await client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": "hi"}]
                )
