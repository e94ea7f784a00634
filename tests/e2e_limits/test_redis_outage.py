"""Redis killed under a gateway with `limits.backend: redis`, then started again on its port.

`on_backend_error` decides what the outage means, and nothing silently changes meaning:
`fail_open` keeps serving without counting (no `x-ratelimit-*` headers, since nothing is
counted) and `fail_closed` answers 503; both raise `gateway_limits_backend_degraded` to 1, and
both go back to 0 and enforce the limits again once Redis answers.
"""

from __future__ import annotations

from typing import Any, Literal

import aiohttp
import pytest

from gateway.config import Limits
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.redis_server import RedisServer

from .helpers import (
    Reply,
    auth,
    bulk_session,
    by_status,
    chat,
    eventually,
    post,
    post_all,
    sim_settings,
    team,
)

pytestmark = pytest.mark.redis

LIMIT = 3
BURST = 30
DEGRADED = "gateway_limits_backend_degraded"


async def send(session: aiohttp.ClientSession, gw: RunningGateway, count: int) -> list[Reply]:
    """`count` requests one after the other."""
    return [await post(session, gw.url, chat(sim={"chunks": 1}), auth()) for _ in range(count)]


async def assert_enforced(session: aiohttp.ClientSession, gw: RunningGateway) -> None:
    """The team's limit holds for a burst (which also fills the Redis connection pool, so
    that the outage breaks many pooled connections, not one)."""
    replies = await post_all(session, [gw.url], BURST, chat(sim={"chunks": 1}))
    assert by_status(replies) == {200: LIMIT, 429: BURST - LIMIT}


def redis_gateway(server: RedisServer, policy: Literal["fail_open", "fail_closed"]) -> Any:
    limits = Limits(backend="redis", redis_url=server.url, on_backend_error=policy)
    return running_gateway(sim_settings(team(requests_per_minute=LIMIT), limits=limits))


async def test_fail_open_serves_uncounted_while_redis_is_down_then_limits_again(
    private_redis_server: RedisServer,
) -> None:
    async with redis_gateway(private_redis_server, "fail_open") as gw, bulk_session() as s:
        await assert_enforced(s, gw)
        assert gw.metric(DEGRADED) == 0

        await private_redis_server.astop(kill=True)
        down = await send(s, gw, 2 * LIMIT)
        assert [r.status for r in down] == [200] * (2 * LIMIT)
        assert not any("x-ratelimit-remaining-requests" in r.headers for r in down)
        await eventually(lambda: gw.metric(DEGRADED) == 1)

        await private_redis_server.astart()
        await eventually(lambda: gw.metric(DEGRADED) == 0, timeout_s=10)
        await assert_enforced(s, gw)


async def test_fail_closed_answers_503_while_redis_is_down_then_serves_again(
    private_redis_server: RedisServer,
) -> None:
    async with redis_gateway(private_redis_server, "fail_closed") as gw, bulk_session() as s:
        await assert_enforced(s, gw)

        await private_redis_server.astop(kill=True)
        down = await send(s, gw, 2)
        for reply in down:
            assert reply.status == 503
            assert int(reply.headers["Retry-After"]) >= 1
            assert reply.json()["error"]["code"] == "limits_unavailable"
        await eventually(lambda: gw.metric(DEGRADED) == 1)

        await private_redis_server.astart()
        await eventually(lambda: gw.metric(DEGRADED) == 0, timeout_s=10)
        await assert_enforced(s, gw)
