"""Three gateway processes on one real Redis spend one team's day budget exactly.

600 short streams, 60 at a time, spread over three `python -m gateway` processes sharing a
`tokens_per_day` budget in Redis. Charged in batches (live growth every 250 ms, the exact
remainder at settle), the Redis total equals the sum of the log lines' tokens exactly, and
the admitted spend passes the budget by at most the requests in flight when it ran out. Run
with `pytest -s` to see the figures.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.gateway_process import GatewayProcess, running_gateway_processes
from tests.e2e_limits.helpers import bulk_session

from .processes import read_log, redis_team_tokens, request_lines, sim_config, stop, stream, tokens

STREAMS, IN_FLIGHT, BUDGET = 600, 60, 6000


@pytest.fixture
def three_gateways(redis_url: str, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    limits = {"backend": "redis", "redis_url": redis_url, "on_backend_error": "fail_closed"}
    config = sim_config(limits, {"tokens_per_day": BUDGET})
    with running_gateway_processes(config, tmp_path, 3) as gateways:
        yield gateways


@pytest.mark.redis
async def test_three_processes_on_redis_spend_a_day_budget_exactly(
    three_gateways: list[GatewayProcess], redis_url: str
) -> None:
    urls = [gateway.url for gateway in three_gateways]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> int:
        async with gate:
            return await stream(session, urls[i % len(urls)])

    async with bulk_session() as session:
        statuses = Counter(await asyncio.gather(*(one(i) for i in range(STREAMS))))
    for gateway in three_gateways:
        await stop(gateway)  # every line written, every charge pushed
    lines = [line for g in three_gateways for line in request_lines(await read_log(g))]
    admitted = [line for line in lines if line["status"] == 200]
    refused = [line for line in lines if line["status"] == 429]
    spent = tokens(lines)
    per_request = max(line["prompt_tokens"] + line["completion_tokens"] for line in admitted)
    print(
        f"\nbudget exactness, 3 processes on Redis: {STREAMS} streams ({IN_FLIGHT} in flight):"
        f" {len(admitted)} admitted, {len(refused)} refused; spent {spent} of {BUDGET}"
        f" (over by {spent - BUDGET}, at most {IN_FLIGHT} x {per_request} allowed)"
    )
    assert statuses == {200: len(admitted), 429: len(refused)} and refused
    assert all(line["error_code"] == "insufficient_quota" for line in refused)
    assert BUDGET <= spent <= BUDGET + IN_FLIGHT * per_request
    assert (
        await redis_team_tokens(redis_url, "d") == spent
    )  # exactly: not one token lost or doubled
    assert await redis_team_tokens(redis_url, "m") == spent
