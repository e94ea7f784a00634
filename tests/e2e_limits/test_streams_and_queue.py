"""Concurrent streams per team, and the process-wide `max_inflight` gate.

A team's stream cap refuses at once (429, limit="concurrency"); only streamed requests take a
slot, and a slot comes back when its stream ends. The in-flight gate is the one place where a
request waits: at most `queue_timeout_s`, in a queue no longer than `max_inflight`, then 503
with `Retry-After`. The held upstream keeps streams running until the test releases them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from gateway.config import Limits
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway, running_gateway

from .held_upstream import HeldUpstream, held_upstream
from .helpers import (
    MESSAGES,
    TEAM,
    TEAM_KEY,
    TEST_MODEL,
    Reply,
    auth,
    bulk_session,
    chat,
    eventually,
    post,
    settled,
    team,
    upstream_settings,
)


def create(client: openai.AsyncOpenAI, *, stream: bool = True) -> Any:
    """One chat completion through the SDK (the coroutine; streamed by default)."""
    return client.chat.completions.create(model=TEST_MODEL, messages=MESSAGES, stream=stream)


async def test_a_third_concurrent_stream_is_refused_until_one_ends() -> None:
    async with held_upstream() as up:
        settings = upstream_settings(up.base_url, team(concurrent_streams=2))
        async with running_gateway(settings) as gw:
            client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)
            async with client:
                running = [await create(client) for _ in range(2)]
                for stream in running:
                    await stream.__anext__()  # both streams have started and hold a slot
                with pytest.raises(openai.RateLimitError) as raised:
                    await create(client)
                assert "concurrent streams" in raised.value.message
                assert int(raised.value.response.headers["Retry-After"]) >= 1
                refused = gw.metric("gateway_rate_limited_total", team=TEAM, limit="concurrency")
                assert refused == 1

                # a request that does not stream takes no slot
                whole = asyncio.create_task(create(client, stream=False))
                await eventually(lambda: up.waiting == 3)

                up.release.set()
                for stream in running:
                    async for _ in stream:
                        pass
                await whole
                await settled(gw.registry, 4)
                again = await create(client)
                async for _ in again:
                    pass


async def hold_one(
    session: aiohttp.ClientSession, gw: RunningGateway, up: HeldUpstream
) -> asyncio.Task[Reply]:
    """A stream that holds the gateway's only in-flight place until the upstream releases."""
    holder = asyncio.create_task(post(session, gw.url, chat(TEST_MODEL, stream=True), auth()))
    await eventually(lambda: up.waiting == 1)
    return holder


async def test_max_inflight_waits_at_most_queue_timeout_then_answers_503() -> None:
    limits = Limits(max_inflight=1, queue_timeout_s=0.2)
    async with held_upstream() as up, bulk_session() as session:
        settings = upstream_settings(up.base_url, team(), limits=limits)
        async with running_gateway(settings) as gw:
            holder = await hold_one(session, gw, up)
            queued = asyncio.create_task(post(session, gw.url, chat(TEST_MODEL), auth()))
            await eventually(lambda: gw.components.inflight.waiting == 1)
            # the queue holds max_inflight waiters: one more is refused without waiting
            at_once = await post(session, gw.url, chat(TEST_MODEL), auth())
            after_wait = await queued
            for reply in (at_once, after_wait):
                assert reply.status == 503
                assert reply.headers["Retry-After"] == "1"
                assert reply.json()["error"]["code"] == "gateway_overloaded"
            assert gw.metric("gateway_rate_limited_total", team=TEAM, limit="inflight") == 2
            up.release.set()
            assert (await holder).status == 200


async def test_a_request_queued_for_max_inflight_runs_when_a_place_frees_in_time() -> None:
    limits = Limits(max_inflight=1, queue_timeout_s=30)
    async with held_upstream() as up, bulk_session() as session:
        settings = upstream_settings(up.base_url, team(), limits=limits)
        async with running_gateway(settings) as gw:
            holder = await hold_one(session, gw, up)
            queued = asyncio.create_task(post(session, gw.url, chat(TEST_MODEL), auth()))
            await eventually(lambda: gw.components.inflight.waiting == 1)
            up.release.set()
            assert (await holder).status == 200
            assert (await queued).status == 200
            assert gw.metric("gateway_rate_limited_total", team=TEAM, limit="inflight") == 0
