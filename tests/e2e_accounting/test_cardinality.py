"""Model names clients type do not become label values: 1,000 random names add no series.

Half the names match no route (404, model label `other`), half match the `sim-*` pattern
(served, model label `sim-*`). After one warm-up request of each shape, which creates every
series those shapes can touch, the registry's samples must be the same set before and after.
"""

from __future__ import annotations

import asyncio
import secrets

import openai

from tests.e2e_accounting.helpers import (
    MESSAGES,
    client,
    eventually,
    observed_gateway,
    request_lines,
    series,
    sim_settings,
)

REQUESTS = 1000
CONCURRENCY = 16


async def send(sdk: openai.AsyncOpenAI, model: str) -> None:
    """A short stream for names the routes serve; a 404 for the rest."""
    try:
        answer = await sdk.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_body={"sim": {"chunks": 1}}
        )
        async for _ in answer:
            pass
    except openai.NotFoundError:
        assert not model.startswith("sim-")


def random_names(n: int) -> list[str]:
    return [("sim-" if i % 2 else "gpt-") + secrets.token_hex(6) for i in range(n)]


async def test_random_model_names_add_no_series() -> None:
    async with observed_gateway(sim_settings()) as o:
        sdk = await client(o.gw.base_url)
        for warm_up in random_names(2):
            await send(sdk, warm_up)
        await eventually(lambda: len(request_lines(o.logs)) == 2)
        before = series(o.gw.registry)

        names = random_names(REQUESTS)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def bounded(model: str) -> None:
            async with limit:
                await send(sdk, model)

        await asyncio.gather(*(bounded(name) for name in names))
        await sdk.close()
        await eventually(lambda: len(request_lines(o.logs)) == REQUESTS + 2)
        after = series(o.gw.registry)
        assert after == before
        values = {value for _, labels in after for _, value in labels}
        assert values.isdisjoint(names)
        served = o.gw.metric(
            "gateway_requests_total", team="anonymous", model="sim-*", upstream="sim", code="200"
        )
        refused = o.gw.metric(
            "gateway_requests_total", team="anonymous", model="other", upstream="none", code="404"
        )
        assert (served, refused) == (REQUESTS // 2 + 1, REQUESTS // 2 + 1)
