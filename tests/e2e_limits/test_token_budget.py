"""Tokens per minute while streams run: reserve at admission, charge per chunk, settle to truth.

At admission the gateway reserves its prompt estimate plus `max_tokens`; a request is admitted
only if that reservation fits what is left of the budget. At the end it settles to the true
usage (here the upstream's usage chunk: 10 prompt + 1 per content chunk) and returns the rest.
The held upstream keeps admitted streams running until the test releases them, so "while
other streams run" is certain, not a matter of timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk

from gateway.config import Limits, Team, TeamLimits
from tests.support.clients import async_openai
from tests.support.gateway import running_gateway

from .held_upstream import PROMPT_TOKENS, held_upstream
from .helpers import (
    MESSAGES,
    TEAM,
    TEAM_KEY,
    TEST_LABEL,
    TEST_MODEL,
    Reply,
    auth,
    bulk_session,
    by_status,
    chat,
    eventually,
    metric_sum,
    post,
    reservation,
    settled,
    team,
    upstream_settings,
)

COMPLETION = 5
USED = PROMPT_TOKENS + COMPLETION  # what each held stream really costs


async def read_content(stream: AsyncStream[ChatCompletionChunk], into: list[str]) -> None:
    """Read a stream to its end, collecting its content pieces as they come."""
    async for chunk in stream:
        into.extend(c.delta.content for c in chunk.choices if c.delta.content)


def stream_usage(reply: Reply) -> int:
    """The `total_tokens` of the usage event in a streamed answer."""
    for line in reply.body.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            total: int = orjson.loads(line[6:])["usage"]["total_tokens"]
            return total
    raise AssertionError(f"no usage event in {reply.body[:300]!r}")


async def test_concurrent_streams_are_admitted_only_while_their_reservations_fit() -> None:
    budget, sent = 1000, 12
    body = chat(TEST_MODEL, stream=True, max_tokens=200, chunks=COMPLETION)
    reserve = reservation(body)
    fits = budget // reserve
    async with held_upstream() as up, bulk_session() as session:
        settings = upstream_settings(up.base_url, team(tokens_per_minute=budget))
        async with running_gateway(settings) as gw:
            url = gw.url
            tasks = [asyncio.create_task(post(session, url, body, auth())) for _ in range(sent)]
            # every request is decided: held at the upstream (admitted) or answered (refused)
            await eventually(lambda: up.waiting + sum(t.done() for t in tasks) == sent)
            up.release.set()
            replies = await asyncio.gather(*tasks)
            admitted = [r for r in replies if r.status == 200]
            print(
                f"\ntokens/min {budget}, reservation {reserve} each, {sent} concurrent streams:"
                f" {len(admitted)} admitted, {sent - len(admitted)} refused"
            )
            assert by_status(replies) == {200: fits, 429: sent - fits}
            assert len(admitted) * reserve <= budget < (len(admitted) + 1) * reserve
            assert sum(stream_usage(r) for r in admitted) <= budget
            for reply in replies:
                if reply.status == 429:
                    assert reply.headers["x-ratelimit-limit-tokens"] == str(budget)
                    assert int(reply.headers["Retry-After"]) >= 1
                    assert "tokens per minute" in reply.json()["error"]["message"]
            refused = gw.metric("gateway_rate_limited_total", team=TEAM, limit="tokens")
            assert refused == sent - fits

            # settled to the truth: what the streams used stays counted, the rest came back
            await settled(gw.registry, sent)
            after = await post(session, url, body, auth())
            assert after.status == 200
            left = budget - fits * USED - reserve
            assert after.headers["x-ratelimit-remaining-tokens"] == str(left)


async def test_a_reservation_the_stream_did_not_use_returns_to_the_budget() -> None:
    budget, max_tokens = 1200, 1000
    reserve = reservation(chat(TEST_MODEL, max_tokens=max_tokens))
    assert USED + reserve <= budget < 2 * reserve  # fits only if the first one's rest returns
    async with held_upstream() as up:
        settings = upstream_settings(up.base_url, team(tokens_per_minute=budget))
        async with running_gateway(settings) as gw:
            client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)

            def create(**extra: Any) -> Any:
                return client.chat.completions.create(
                    model=TEST_MODEL,
                    messages=MESSAGES,
                    stream=True,
                    max_tokens=max_tokens,
                    extra_body={"chunks": COMPLETION},
                    **extra,
                )

            first = await create()
            await first.__anext__()  # admitted, streaming, holding its whole reservation
            with pytest.raises(openai.RateLimitError):
                await create()
            up.release.set()
            async for _ in first:
                pass
            await settled(gw.registry, 2)

            raw = await client.chat.completions.with_raw_response.create(
                model=TEST_MODEL,
                messages=MESSAGES,
                stream=True,
                max_tokens=max_tokens,
                extra_body={"chunks": COMPLETION},
            )
            assert raw.status_code == 200
            assert raw.headers["x-ratelimit-remaining-tokens"] == str(budget - USED - reserve)
            await read_content(raw.parse(), [])
            await client.close()


@pytest.mark.parametrize("budget", [100, 101])
async def test_cut_policy_ends_an_over_budget_stream_with_an_sse_error(
    budget: int, logs: list[MutableMapping[str, Any]]
) -> None:
    """The cut comes at the end of an event, never inside one: the upstream's events arrive
    cut across reads, and one of the two budgets is crossed by a read that ends mid-event."""
    produced = 500
    limits = Limits(on_token_budget_exceeded="cut")
    async with held_upstream() as up:
        up.release.set()
        settings = upstream_settings(up.base_url, team(tokens_per_minute=budget), limits=limits)
        async with running_gateway(settings) as gw:
            client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    model=TEST_MODEL,
                    messages=MESSAGES,
                    stream=True,
                    max_tokens=10,
                    extra_body={"chunks": produced, "pause_ms": 1, "split": True},
                )
                received: list[str] = []
                with pytest.raises(openai.APIError) as raised:
                    await read_content(stream, received)
            assert "token budget ran out" in raised.value.message
            assert len(received) < produced
            await settled(gw.registry, 1)
            (line,) = [entry for entry in logs if entry.get("event") == "request"]
            assert line["end"] == "limit"
            assert line["error_code"] == "token_budget_exceeded"


async def test_finish_policy_lets_an_over_budget_stream_end_and_counts_its_tokens() -> None:
    budget, produced = 100, 500
    body = chat(TEST_MODEL, stream=True, max_tokens=10, chunks=produced)
    async with held_upstream() as up, bulk_session() as session:
        up.release.set()
        settings = upstream_settings(up.base_url, team(tokens_per_minute=budget))
        async with running_gateway(settings) as gw:
            whole = await post(session, gw.url, body, auth())
            assert whole.status == 200
            assert whole.body.count(b'"content":"tok"') == produced
            assert whole.body.endswith(b"data: [DONE]\n\n")
            await settled(gw.registry, 1)
            # the overage was counted: the budget is spent for the rest of the window
            refused = await post(session, gw.url, body, auth())
            assert refused.status == 429
            assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
            assert metric_sum(gw.registry, "gateway_rate_limited_total", limit="tokens") == 1


async def test_a_model_budget_of_the_team_is_charged_live_and_cuts_too() -> None:
    """`model_limits` adds a budget for one model of the team; chunks count against it as they
    pass, like against the team's own, so the cut policy sees it being crossed."""
    produced = 500
    limited = Team(
        name=TEAM,
        keys=(TEAM_KEY,),
        model_limits={TEST_LABEL: TeamLimits(tokens_per_minute=100)},
    )
    limits = Limits(on_token_budget_exceeded="cut")
    async with held_upstream() as up:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url, limited, limits=limits)) as gw:
            client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    model=TEST_MODEL,
                    messages=MESSAGES,
                    stream=True,
                    max_tokens=10,
                    extra_body={"chunks": produced, "pause_ms": 1},
                )
                received: list[str] = []
                with pytest.raises(openai.APIError) as raised:
                    await read_content(stream, received)
    assert "token budget ran out" in raised.value.message
    assert len(received) < produced
