"""A 429 says when to come back, and coming back then works; the OpenAI SDK reads it as such.

These tests shorten the limiter's window (60 s in production) to 2 s of two 1 s slots, so a
refused request can wait out its `Retry-After` within the test.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import openai
import pytest

from gateway.config import Team
from tests.support.clients import async_openai
from tests.support.gateway import running_gateway

from .helpers import (
    MESSAGES,
    SIM_MODEL,
    TEAM,
    TEAM_KEY,
    auth,
    bulk_session,
    chat,
    post,
    reservation,
    sim_settings,
    team,
    use_short_window,
)

#: each request really uses nearly all it reserves, so the refunds cannot make room (46 pieces
#: of the simulator's text are 48 o200k tokens, its usage)
BODY = chat(SIM_MODEL, max_tokens=50, sim={"chunks": 46})


@pytest.mark.parametrize(
    ("limit", "limited"),
    [
        ("requests", team(requests_per_minute=2)),
        ("tokens", team(tokens_per_minute=2 * reservation(BODY))),
    ],
)
async def test_a_retry_after_the_advertised_delay_is_admitted(limit: str, limited: Team) -> None:
    async with running_gateway(sim_settings(limited)) as gw, bulk_session() as session:
        use_short_window(gw, window_s=2.0, slots=2)
        for _ in range(2):
            assert (await post(session, gw.url, BODY, auth())).status == 200
        refused = await post(session, gw.url, BODY, auth())
        assert refused.status == 429
        assert f"{limit} per minute" in refused.json()["error"]["message"]
        retry_after = int(refused.headers["Retry-After"])
        retry_after_ms = int(refused.headers["retry-after-ms"])
        assert 0 < retry_after_ms <= retry_after * 1000 <= 2000
        await asyncio.sleep(retry_after)
        assert (await post(session, gw.url, BODY, auth())).status == 200
        assert gw.metric("gateway_rate_limited_total", team=TEAM, limit=limit) == 1


def create(client: openai.AsyncOpenAI) -> Any:
    return client.chat.completions.create(model=SIM_MODEL, messages=MESSAGES)


async def test_the_openai_sdk_waits_as_told_and_its_retry_succeeds() -> None:
    async with running_gateway(sim_settings(team(requests_per_minute=2))) as gw:
        use_short_window(gw, window_s=2.0, slots=2)
        client = await async_openai(gw.base_url, TEAM_KEY, max_retries=2)
        async with client:
            for _ in range(3):
                answer = await create(client)
                assert answer.choices[0].finish_reason == "stop"
        # the third call was refused once, then the SDK's own retry got through
        assert gw.metric("gateway_rate_limited_total", team=TEAM, limit="requests") == 1


async def test_the_openai_sdk_rate_limit_error_carries_the_gateway_message() -> None:
    async with running_gateway(sim_settings(team(requests_per_minute=1))) as gw:
        client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)
        async with client:
            await create(client)
            with pytest.raises(openai.RateLimitError) as raised:
                await create(client)
    error = raised.value
    expected = re.compile(
        rf"Rate limit reached for team:{TEAM} on requests per minute: Limit 1, Used 1, "
        r"Requested 1\. Please try again in [0-9.]+m?s\."
    )
    assert isinstance(error.body, dict)
    assert expected.fullmatch(error.body["message"])
    assert expected.search(error.message)  # what `str(error)` and tracebacks show
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_error"
    assert error.response.headers["x-ratelimit-limit-requests"] == "1"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
