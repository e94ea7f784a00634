"""Official SDKs, pointed at the gateway instead of the provider, work unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import orjson
import pytest
from HelpingAI import HAI
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import SIM_RUNNERS
from gateway.config import default_settings
from gateway.sim import SIM_STATE
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway, running_gateway

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(default_settings()) as running:
        yield running


def last_sim_body(gw: RunningGateway) -> dict[str, object]:
    """The last body the built-in simulator received, parsed."""
    (runner,) = gw.runner.app[SIM_RUNNERS]
    body: dict[str, object] = orjson.loads(runner.app[SIM_STATE].requests[-1].body)
    return body


async def test_async_sdk_streams_content_role_and_finish_reason(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    stream = await client.chat.completions.create(
        model="sim-1", messages=MESSAGES, stream=True, extra_body={"sim": {"chunks": 5}}
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content.split()) == 5
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_sdk_non_streaming_answer(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    answer = await client.chat.completions.create(
        model="sim-1", messages=MESSAGES, extra_body={"sim": {"chunks": 4}}
    )
    await client.close()
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 4


async def test_sync_sdk_streams_through_the_gateway(gw: RunningGateway) -> None:
    def run() -> tuple[str, str | None]:
        client = openai.OpenAI(base_url=gw.base_url, api_key="anything")
        stream = client.chat.completions.create(
            model="sim-1", messages=MESSAGES, stream=True, extra_body={"sim": {"chunks": 3}}
        )
        chunks = list(stream)
        client.close()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].choices[0].finish_reason

    text, finish = await asyncio.to_thread(run)
    assert len(text.split()) == 3
    assert finish == "stop"


async def test_unknown_fields_such_as_hide_think_reach_the_upstream(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    stream = await client.chat.completions.create(
        model="sim-1", messages=MESSAGES, stream=True, extra_body={"hideThink": False}
    )
    async for _ in stream:
        pass
    await client.close()
    assert last_sim_body(gw)["hideThink"] is False


async def test_helpingai_sdk_streams_through_the_gateway(gw: RunningGateway) -> None:
    def run() -> str:
        client = HAI(api_key="anything", base_url=gw.base_url)
        stream = client.chat.completions.create(
            model="sim-1",
            messages=[{"role": "user", "content": "Tell me a story"}],
            stream=True,
            hideThink=False,
        )
        return "".join(
            chunk.choices[0].delta.content or ""
            for chunk in stream
            if chunk.choices and chunk.choices[0].delta
        )

    text = await asyncio.to_thread(run)
    assert len(text.split()) == 16  # the simulator's default chunk count


async def test_models_lists_what_the_routes_serve(gw: RunningGateway) -> None:
    client = await async_openai(gw.base_url)
    models = await client.models.list()
    await client.close()
    assert [m.id for m in models.data] == ["sim-small", "sim-large", "sim-reasoning"]
