"""What a request costs: the upstream's usage at the `pricing` table, the live count when the
stream ends without one, cached prompt tokens at their own price, an unpriced model at 0.

Prices here (USD per million tokens): input 2, cached input 0.5, output 8.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.config import Budgets, Price, Settings, Team
from gateway.tokens import estimate_prompt_tokens, load_tokenizer
from tests.e2e_accounting.helpers import (
    DONE,
    MESSAGES,
    PATTERN,
    chunk,
    client,
    eventually,
    fake_settings,
    observed_gateway,
    one_request_line,
    request_lines,
    sim_settings,
    stream_then_leave,
    usage_event,
)
from tests.support.fake_upstream import Script, fake_upstream

PRICE = Price(models=("test-priced", "sim-*"), input=2.0, cached_input=0.5, output=8.0)


def priced(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, pricing=(PRICE,))


async def stream_all(base_url: str, model: str, **extra: Any) -> None:
    sdk = await client(base_url)
    answer = await sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True, **extra)
    async for _ in answer:
        pass
    await sdk.close()


async def test_a_stream_with_upstream_usage_costs_the_upstreams_numbers_cached_at_its_price() -> (
    None
):
    pieces = [
        chunk("a"),
        chunk("b"),
        chunk("c"),
        chunk(finish="stop"),
        usage_event(1000, 20, cached=400),
        DONE,
    ]
    async with fake_upstream() as up:
        up.default = Script(pieces)
        async with observed_gateway(priced(fake_settings(up.base_url))) as o:
            await stream_all(o.gw.base_url, "test-priced")
            line = await one_request_line(o.logs)
            # 600 uncached at 2, 400 cached at 0.5, 20 out at 8 (not the 3 counted live)
            expected = (600 * 2.0 + 400 * 0.5 + 20 * 8.0) / 1e6
            assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
            assert line["usage_source"] == "upstream" and line["key"] is None
            cost = o.gw.metric("gateway_cost_usd_total", team="anonymous", model="test-*")
            assert cost == pytest.approx(expected, rel=1e-9)
            assert o.gw.metric("gateway_unpriced_tokens_total", model="test-*") == 0


async def test_a_disconnected_stream_costs_what_was_counted_live() -> None:
    async with observed_gateway(priced(sim_settings())) as o:
        sdk = await client(o.gw.base_url)
        await stream_then_leave(sdk, "sim-gone")
        line = await one_request_line(o.logs)
        await sdk.close()
    assert line["end"] == "client_disconnect" and line["usage_source"] == "estimate"
    body = {"model": "sim-gone", "messages": MESSAGES, "stream": True}
    prompt = estimate_prompt_tokens(body, load_tokenizer("chunks"))
    assert line["prompt_tokens"] == prompt and 3 <= line["completion_tokens"] < 40
    expected = (prompt * 2.0 + line["completion_tokens"] * 8.0) / 1e6
    assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
    cost = o.gw.metric("gateway_cost_usd_total", team="anonymous", model=PATTERN)
    assert cost == pytest.approx(expected, rel=1e-9)


async def test_an_unpriced_model_costs_nothing_and_its_tokens_are_counted_as_unpriced() -> None:
    pieces = [chunk("a"), chunk("b"), chunk(finish="stop"), usage_event(50, 7, cached=0), DONE]
    async with fake_upstream() as up:
        up.default = Script(pieces)
        async with observed_gateway(priced(fake_settings(up.base_url))) as o:
            await stream_all(o.gw.base_url, "test-unpriced")
            line = await one_request_line(o.logs)
            assert line["cost_usd"] == 0
            assert o.gw.metric("gateway_cost_usd_total", team="anonymous", model="test-*") == 0
            assert o.gw.metric("gateway_unpriced_tokens_total", model="test-*") == 57


async def test_cost_and_spend_grow_while_a_stream_runs() -> None:
    team = Team(name="search", keys=("sk-live",), budgets=Budgets(usd_per_month=100))
    settings = msgspec.structs.replace(priced(sim_settings()), teams=(team,))
    async with observed_gateway(settings) as o:
        book = o.gw.components.spend
        month = book.periods.now().month.id
        labels = {"team": "search", "model": PATTERN}
        sdk = await client(o.gw.base_url, key="sk-live")
        answer = await sdk.chat.completions.create(
            model="sim-slow",
            messages=MESSAGES,
            stream=True,
            extra_body={"sim": {"chunks": 60, "delay_ms": 40}},
        )
        seen = []
        async for part in answer:
            if part.choices and part.choices[0].delta.content:
                seen.append(part)
            if len(seen) == 20:
                await eventually(lambda: book.store.known(f"team:search|{month}")[0] > 20)
                cost = o.gw.metric("gateway_cost_usd_total", **labels)
                assert cost > 0 and not request_lines(o.logs)  # still streaming
        await sdk.close()
        line = await one_request_line(o.logs)
        assert line["completion_tokens"] == 60
        tokens, usd = book.store.known(f"team:search|{month}")
        assert tokens == line["prompt_tokens"] + 60 and usd == pytest.approx(line["cost_usd"])
        assert o.gw.metric("gateway_cost_usd_total", **labels) == pytest.approx(line["cost_usd"])
