"""Prometheus totals that agree with the bill: live counters settle through a per-label debt.

The upstream here reports 8 completion tokens for streams the gateway counts as 10 while
they run (the `chunks` tokenizer: one per content chunk). A counter cannot go down, so the
overcount is owed and later live increments of the same label pay it off first.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.config import Price
from gateway.debt import DebtCounter
from tests.e2e_accounting.helpers import (
    DONE,
    MESSAGES,
    chunk,
    client,
    eventually,
    fake_settings,
    observed_gateway,
    request_lines,
    usage_event,
)
from tests.support.fake_upstream import Script, fake_upstream

STREAMS, CONCURRENCY, LIVE, SETTLED = 200, 10, 10, 8
OUTPUT_PER_MILLION = 8.0


def test_an_overcount_is_paid_off_by_later_increments_before_the_counter_moves() -> None:
    child = Counter("t", "t", registry=CollectorRegistry())
    counter = DebtCounter(child)
    counter.inc(10)
    counter.settle(8, 10)  # the truth is 8: 2 owed
    assert (child._value.get(), counter.debt) == (10, 2)
    counter.inc(1)  # pays 1 of the debt
    assert (child._value.get(), counter.debt) == (10, 1)
    counter.inc(5)  # pays the last 1, then moves
    assert (child._value.get(), counter.debt) == (14, 0)
    counter.settle(6, 6)
    counter.settle(9, 6)  # an undercount adds what was missed
    assert child._value.get() == 17


async def test_after_200_streams_settled_lower_the_counters_equal_the_log_lines() -> None:
    pieces = [chunk("x")] * LIVE + [chunk(finish="stop"), usage_event(20, SETTLED), DONE]
    price = Price(models=("test-*",), output=OUTPUT_PER_MILLION)
    async with fake_upstream() as up:
        up.default = Script(pieces, pause_s=0.001)
        settings = msgspec.structs.replace(fake_settings(up.base_url), pricing=(price,))
        async with observed_gateway(settings) as o:
            sdk = await client(o.gw.base_url)
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one() -> None:
                async with gate:
                    answer = await sdk.chat.completions.create(
                        model="test-1", messages=MESSAGES, stream=True
                    )
                    async for _ in answer:
                        pass

            await asyncio.gather(*(one() for _ in range(STREAMS)))
            await sdk.close()
            await eventually(lambda: len(request_lines(o.logs)) == STREAMS)
            lines = request_lines(o.logs)
            labels = {"team": "anonymous", "model": "test-*"}
            completion = o.gw.metric("gateway_tokens_total", **labels, type="completion")
            cost = o.gw.metric("gateway_cost_usd_total", **labels)
    settled = sum(line["completion_tokens"] for line in lines)
    assert settled == STREAMS * SETTLED
    # without the debt: 200 x 10 = 2000, 25% above the bill. With it, at most the overcount
    # of the last streams, which no later stream was left to pay off
    drift = (LIVE - SETTLED) * CONCURRENCY
    assert settled <= completion <= settled + drift
    billed = sum(line["cost_usd"] for line in lines)
    assert billed == pytest.approx(settled * OUTPUT_PER_MILLION / 1e6)
    assert billed - 1e-12 <= cost <= billed + drift * OUTPUT_PER_MILLION / 1e6 + 1e-12
