"""Budgets on a Redis that goes away: `on_backend_error` decides, as for the other limits.

`fail_open` keeps serving while Redis is down, keeps the charges it could not push and pushes
them once Redis answers again (the restarted Redis here has no persistence, so it holds
exactly the outage's charges); `fail_closed` answers 503 limits_unavailable. Both show in
`gateway_limits_backend_degraded`.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import pytest

from gateway.config import Budgets, Limits, Settings, Team
from tests.e2e_accounting.helpers import eventually, observed_gateway, request_lines, sim_settings
from tests.e2e_limits.helpers import auth, bulk_session, chat, post
from tests.support.redis_server import RedisServer, private_redis_server

from .processes import redis_team_tokens

__all__ = ["private_redis_server"]
pytestmark = pytest.mark.redis

KEY = "sk-outage-search"
DEGRADED = "gateway_limits_backend_degraded"


def settings(server: RedisServer, policy: Literal["fail_open", "fail_closed"]) -> Settings:
    team = Team(name="search", keys=(KEY,), budgets=Budgets(tokens_per_day=10**9))
    limits = Limits(backend="redis", redis_url=server.url, on_backend_error=policy)
    return msgspec.structs.replace(sim_settings(teams=(team,)), limits=limits)


async def test_fail_open_serves_while_redis_is_down_and_pushes_the_charges_when_it_returns(
    private_redis_server: RedisServer,
) -> None:
    async with observed_gateway(settings(private_redis_server, "fail_open")) as o:
        async with bulk_session() as session:
            await private_redis_server.astop(kill=True)
            for _ in range(5):
                reply = await post(session, o.gw.url, chat("sim-1"), auth(KEY))
                assert reply.status == 200
            await eventually(lambda: o.gw.metric(DEGRADED) == 1, timeout_s=5)
            await private_redis_server.astart()
            await eventually(lambda: o.gw.metric(DEGRADED) == 0, timeout_s=10)
        lines = request_lines(o.logs)
        spent = sum(line["prompt_tokens"] + line["completion_tokens"] for line in lines)
        assert len(lines) == 5 and spent > 0
        assert await redis_team_tokens(private_redis_server.url, "d", "search") == spent


async def test_fail_closed_refuses_budgeted_requests_while_redis_is_down(
    private_redis_server: RedisServer,
) -> None:
    async with observed_gateway(settings(private_redis_server, "fail_closed")) as o:
        async with bulk_session() as session:
            assert (await post(session, o.gw.url, chat("sim-1"), auth(KEY))).status == 200
            await private_redis_server.astop(kill=True)
            reply = await post(session, o.gw.url, chat("sim-1"), auth(KEY))
            assert reply.status == 503
            assert reply.json()["error"]["code"] == "limits_unavailable"
            await eventually(lambda: o.gw.metric(DEGRADED) == 1, timeout_s=5)
            await private_redis_server.astart()
            await eventually(lambda: o.gw.metric(DEGRADED) == 0, timeout_s=10)
            assert (await post(session, o.gw.url, chat("sim-1"), auth(KEY))).status == 200
