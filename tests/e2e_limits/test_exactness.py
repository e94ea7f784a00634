"""A 100-per-minute team admits exactly 100 of 1,000 simultaneous requests.

On one process (the local backend: one event-loop step decides and counts) and on three
`python -m gateway` processes sharing one real Redis (one Lua script decides and counts), the
1,000 requests spread over the three: the replicas together admit what one would. Run with
`pytest -s` to see the figures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.deploy.gateway_process import GatewayProcess, running_gateway_processes
from tests.support.gateway import running_gateway

from .helpers import (
    TEAM,
    Reply,
    bulk_session,
    by_status,
    chat,
    metric_sum,
    post_all,
    sim_config,
    sim_settings,
    team,
)

LIMIT = 100
REQUESTS = 1000
BODY = chat(sim={"chunks": 2})


def assert_exactly_limit_admitted(replies: Sequence[Reply]) -> None:
    """100 answered 200, 900 answered 429 with Retry-After and OpenAI's headers, nothing else.

    Each admitted request saw its own `x-ratelimit-remaining-requests`: 99 down to 0, once each.
    """
    assert by_status(replies) == {200: LIMIT, 429: REQUESTS - LIMIT}
    admitted = [r for r in replies if r.status == 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(LIMIT))
    for reply in replies:
        if reply.status != 429:
            continue
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.headers["x-ratelimit-limit-requests"] == str(LIMIT)
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
        error = reply.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "rate_limit_exceeded"


def report(where: str, replies: Sequence[Reply]) -> None:
    counts = by_status(replies)
    print(
        f"\nexactness, {where}: {len(replies)} simultaneous requests at a {LIMIT}/min team:"
        f" {counts[200]} admitted (200), {counts[429]} refused (429)"
        f", other {len(replies) - counts[200] - counts[429]}"
    )


async def test_one_process_admits_exactly_100_of_1000_simultaneous_requests() -> None:
    settings = sim_settings(team(requests_per_minute=LIMIT))
    async with running_gateway(settings) as gw, bulk_session() as session:
        replies = await post_all(session, [gw.url], REQUESTS, BODY)
        report("one process, local backend", replies)
        assert_exactly_limit_admitted(replies)
        refused = metric_sum(gw.registry, "gateway_rate_limited_total", team=TEAM)
        assert refused == REQUESTS - LIMIT
        assert gw.metric("gateway_rate_limited_total", team=TEAM, limit="requests") == refused


@pytest.fixture
def three_gateways(redis_url: str, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Three `python -m gateway` processes, each with its own port, sharing one Redis."""
    config = sim_config(redis_url, LIMIT)
    with running_gateway_processes(config, tmp_path, 3) as gateways:
        yield gateways


@pytest.mark.redis
async def test_three_processes_sharing_redis_admit_exactly_100_in_total(
    three_gateways: list[GatewayProcess],
) -> None:
    urls = [gateway.url for gateway in three_gateways]
    async with bulk_session() as session:
        replies = await post_all(session, urls, REQUESTS, BODY)
    report("three processes sharing one Redis", replies)
    shares = [by_status(replies[i :: len(urls)]) for i in range(len(urls))]
    print("admitted/sent per process: " + ", ".join(f"{c[200]}/{c.total()}" for c in shares))
    assert_exactly_limit_admitted(replies)
