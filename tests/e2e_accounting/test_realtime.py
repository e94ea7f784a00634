"""Metrics move while a stream runs, not only when it ends.

A slow simulated stream (100 chunks, 30 ms apart) is read a few chunks at a time; each reading
takes the token counter and the active-stream gauge from the same instant (or the same scrape),
so "tokens counted while the gateway still holds the stream open" is a causal check. The client
then hangs up, and the log line's `end` confirms the stream was still open at that point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e_accounting.helpers import (
    MESSAGES,
    PATTERN,
    TEAM_KEY,
    client,
    eventually,
    observed_gateway,
    one_request_line,
    request_lines,
    sim_settings,
    team,
)
from tests.support.gateway import RunningGateway

SLOW_CHUNKS = 100
SLOW = {"chunks": SLOW_CHUNKS, "delay_ms": 30}
LABELS = {"team": "anonymous", "model": PATTERN}


async def scrape(gw: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as Prometheus would, parsed: (name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def read_content_chunks(parts: AsyncIterator[ChatCompletionChunk], n: int) -> None:
    """Read from the stream until `n` more content chunks arrived."""
    content = 0
    while content < n:
        part = await anext(parts)
        if part.choices and part.choices[0].delta.content:
            content += 1


async def test_tokens_show_in_the_registry_and_on_metrics_while_the_stream_is_open() -> None:
    async with observed_gateway(sim_settings()) as o:
        gw = o.gw
        sdk = await client(gw.base_url)
        answer = await sdk.chat.completions.create(
            model="sim-slow", messages=MESSAGES, stream=True, extra_body={"sim": SLOW}
        )
        parts = aiter(answer)
        await read_content_chunks(parts, 5)
        tokens = gw.metric("gateway_tokens_total", **LABELS, type="completion")
        active = gw.metric("gateway_active_streams", **LABELS)
        assert active == 1 and 5 <= tokens < SLOW_CHUNKS

        await read_content_chunks(parts, 5)
        scraped = await scrape(gw)
        assert scraped[key("gateway_active_streams", **LABELS)] == 1
        assert scraped[key("gateway_tokens_total", **LABELS, type="completion")] >= 10

        await answer.close()
        line = await one_request_line(o.logs)
        await sdk.close()
        assert line["end"] == "client_disconnect"  # the stream was open until the client left
        assert (
            gw.metric("gateway_tokens_total", **LABELS, type="completion")
            == (line["completion_tokens"])
        )


async def test_stream_metrics_cover_its_whole_life() -> None:
    """Active streams up during, back to 0 after; TTFT and duration observed; code counted."""
    async with observed_gateway(sim_settings()) as o:
        gw = o.gw
        sdk = await client(gw.base_url)
        answer = await sdk.chat.completions.create(
            model="sim-slow",
            messages=MESSAGES,
            stream=True,
            extra_body={"sim": {"chunks": 20, "delay_ms": 50}},
        )
        parts = aiter(answer)
        await read_content_chunks(parts, 1)
        assert gw.metric("gateway_active_streams", **LABELS) == 1
        assert gw.metric("gateway_requests_total", **LABELS, upstream="sim", code="200") == 0
        async for _ in parts:
            pass
        await sdk.close()
        await one_request_line(o.logs)
        assert gw.metric("gateway_active_streams", **LABELS) == 0
        per_upstream = {"model": PATTERN, "upstream": "sim"}
        assert gw.metric("gateway_time_to_first_token_seconds_count", **per_upstream) == 1
        assert gw.metric("gateway_stream_duration_seconds_count", **per_upstream) == 1
        duration = gw.metric("gateway_stream_duration_seconds_sum", **per_upstream)
        ttft = gw.metric("gateway_time_to_first_token_seconds_sum", **per_upstream)
        assert 0 < ttft < duration
        assert gw.metric("gateway_inter_chunk_seconds_count", model=PATTERN) > 0
        assert gw.metric("gateway_requests_total", **LABELS, upstream="sim", code="200") == 1


async def test_requests_are_counted_by_status_code() -> None:
    settings = sim_settings(teams=(team("search", requests_per_minute=1),))
    async with observed_gateway(settings) as o:
        gw = o.gw
        sdk = await client(gw.base_url, key=TEAM_KEY)
        await sdk.chat.completions.create(model="sim-ok", messages=MESSAGES)
        for model, error in (("sim-ok", openai.RateLimitError), ("nope", openai.NotFoundError)):
            try:
                await sdk.chat.completions.create(model=model, messages=MESSAGES)
            except error:
                pass
            else:  # pragma: no cover - the assertion below names what went wrong
                raise AssertionError(f"{model}: expected {error.__name__}")
        await sdk.close()
        await eventually(lambda: len(request_lines(o.logs)) == 3)
        codes = {
            (sample.labels["model"], sample.labels["upstream"], sample.labels["code"]): sample.value
            for family in gw.registry.collect()
            if family.name == "gateway_requests"
            for sample in family.samples
            if sample.name == "gateway_requests_total" and sample.labels["team"] == "search"
        }
        assert codes == {
            (PATTERN, "sim", "200"): 1,
            (PATTERN, "none", "429"): 1,
            ("other", "none", "404"): 1,
        }
        assert gw.metric("gateway_rate_limited_total", team="search", limit="requests") == 1
