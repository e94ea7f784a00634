"""The Responses API through the gateway, with the official SDK as client: what the SDK gets,
and what the gateway counted, logged and exported for the same request.

The upstream is a FakeUpstream replaying verbatim Responses API bodies
(`tests/accounting/responses_streams.py`); the route counts with the `chunks` tokenizer, so the
live count is one token per delta event and the settled figures are the upstream's usage.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import openai
import orjson
import pytest
from openai.types.responses import ResponseStreamEvent

from gateway.config import Limits, Settings, Team, TeamLimits
from tests.accounting.responses_streams import (
    CUT,
    RESPONSE_ID,
    TEXT,
    body,
    failed_stream,
    message,
    response,
    text_stream,
    usage,
)
from tests.e2e_accounting.helpers import (
    TEAM_KEY,
    Observed,
    client,
    eventually,
    fake_settings,
    observed_gateway,
    one_request_line,
)
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream

MODEL, LABEL = "test-1", "test-*"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as up:
        yield up


@pytest.fixture
async def observed(upstream: FakeUpstream) -> AsyncIterator[Observed]:
    async with observed_gateway(fake_settings(upstream.base_url)) as obs:
        yield obs


@pytest.fixture
async def sdk(observed: Observed) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official async client on the observed gateway, closed after the test."""
    async with await client(observed.gw.base_url) as sdk:
        yield sdk


def tokens(obs: Observed, kind: str, team: str = "anonymous") -> float:
    return obs.gw.metric("gateway_tokens_total", team=team, model=LABEL, type=kind)


def counted_at_least(obs: Observed, n: int) -> bool:
    return tokens(obs, "completion") >= n


def finished(obs: Observed, reason: str) -> float:
    return obs.gw.metric("gateway_finish_reason_total", model=LABEL, reason=reason)


async def assert_settled_like_text(obs: Observed, *, stream: bool) -> None:
    """The log line and metrics of one request that relayed `TEXT` (or its JSON twin)."""
    line = await one_request_line(obs.logs)
    assert line["path"] == "/v1/responses" and line["stream"] is stream
    assert (line["prompt_tokens"], line["completion_tokens"], line["reasoning_tokens"]) == (
        12,
        3,
        0,
    )
    assert (line["cached_prompt_tokens"], line["usage_source"]) == (4, "upstream")
    assert (line["finish_reason"], line["end"], line["status"]) == ("stop", "completed", 200)
    assert (tokens(obs, "prompt"), tokens(obs, "completion"), tokens(obs, "cached_prompt")) == (
        12,
        3,
        4,
    )
    assert finished(obs, "stop") == 1


async def test_create_stream_true_gives_the_sdk_the_text_and_usage_the_gateway_settled(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    upstream.scripts.append(Script(TEXT))
    stream = await sdk.responses.create(model=MODEL, input="Say hello", stream=True)
    text, final = "", None
    async for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            final = event.response
    assert text == "Hello wörld ☃!"
    assert final is not None and final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 3)
    assert upstream.received[0].path == "/v1/responses"
    await assert_settled_like_text(observed, stream=True)


async def test_the_stream_helper_accumulates_the_same_response(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    upstream.scripts.append(Script(TEXT))
    async with sdk.responses.stream(model=MODEL, input="Say hello") as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == "Hello wörld ☃!"
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 4
    await assert_settled_like_text(observed, stream=True)


async def test_a_whole_response_is_counted_from_its_usage(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    answer = response("completed", [message("Hello wörld ☃!")], used=usage(12, 3, cached=4))
    upstream.scripts.append(Script([orjson.dumps(answer)], content_type="application/json"))
    result = await sdk.responses.create(model=MODEL, input="Say hello")
    assert result.output_text == "Hello wörld ☃!"
    assert result.usage is not None and result.usage.output_tokens == 3
    await assert_settled_like_text(observed, stream=False)


async def test_the_sync_client_streams_the_same(upstream: FakeUpstream, observed: Observed) -> None:
    upstream.scripts.append(Script(TEXT))

    def run() -> tuple[str, int]:
        with openai.OpenAI(base_url=observed.gw.base_url, api_key="x", max_retries=0) as sdk:
            text, output_tokens = "", -1
            for event in sdk.responses.create(model=MODEL, input="Say hello", stream=True):
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.completed" and event.response.usage is not None:
                    output_tokens = event.response.usage.output_tokens
            return text, output_tokens

    assert await asyncio.to_thread(run) == ("Hello wörld ☃!", 3)
    await assert_settled_like_text(observed, stream=True)


async def test_a_stream_cut_before_its_terminal_event_makes_the_sdk_raise(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    upstream.scripts.append(Script(CUT))
    stream = await sdk.responses.create(model=MODEL, input="hi", stream=True)
    seen: list[str] = []

    async def read_all() -> None:
        async for event in stream:
            seen.append(event.type)

    with pytest.raises(openai.APIError) as raised:
        await read_all()
    assert "response.output_text.done" in seen  # everything the upstream sent came first
    assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "upstream_truncated"
    line = await one_request_line(observed.logs)
    assert (line["end"], line["error_code"], line["finish_reason"]) == (
        "upstream_error",
        "upstream_truncated",
        None,
    )
    assert (line["completion_tokens"], line["usage_source"]) == (2, "estimate")
    assert observed.gw.metric("gateway_upstream_errors_total", upstream="fake", reason="truncated")


async def test_a_failed_response_ends_as_an_upstream_error_with_its_usage(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    upstream.scripts.append(Script(failed_stream()))
    stream = await sdk.responses.create(model=MODEL, input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.failed"
    line = await one_request_line(observed.logs)
    assert (line["end"], line["error_code"], line["finish_reason"]) == (
        "upstream_error",
        "server_error",
        "error",
    )
    assert (line["prompt_tokens"], line["completion_tokens"]) == (9, 1)
    assert finished(observed, "error") == 1


async def slow_stream(
    upstream: FakeUpstream, sdk: openai.AsyncOpenAI, deltas: int
) -> openai.AsyncStream[ResponseStreamEvent]:
    """A stream of `deltas` one-word deltas, 50 ms apart, its usage saying as many tokens."""
    slow = text_stream([f"w{i} " for i in range(deltas)], used=usage(5, deltas))
    upstream.scripts.append(Script(slow, pause_s=0.05))
    return await sdk.responses.create(model=MODEL, input="hi", stream=True)


async def test_a_client_that_leaves_mid_stream_is_billed_what_was_counted(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    stream = await slow_stream(upstream, sdk, 40)
    deltas = 0
    async for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas == 5:
            break
    await stream.close()
    line = await one_request_line(observed.logs)
    assert line["end"] == "client_disconnect"
    assert 5 <= line["completion_tokens"] < 40
    assert line["usage_source"] == "estimate"
    assert tokens(observed, "completion") == line["completion_tokens"]
    assert observed.gw.metric("gateway_client_disconnects_total", team="anonymous", model=LABEL)


async def test_tokens_grow_while_a_slow_responses_stream_runs(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    stream = await slow_stream(upstream, sdk, 30)
    readings: list[tuple[int, float]] = []  # (deltas the client read, tokens counted)
    deltas = 0
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas += 1
            if deltas % 10 == 0:  # counted a few ms after relayed (gateway.meter_batch)
                await eventually(functools.partial(counted_at_least, observed, deltas))
                active = observed.gw.metric("gateway_active_streams", team="anonymous", model=LABEL)
                assert active == 1  # the stream is still open
                readings.append((deltas, tokens(observed, "completion")))
    assert [read for read, _ in readings] == [10, 20, 30]
    assert all(read <= counted < 30 for read, counted in readings[:2])
    assert (await one_request_line(observed.logs))["end"] == "completed"


async def test_a_teams_tpm_limit_refuses_the_next_request_once_a_stream_used_it(
    upstream: FakeUpstream,
) -> None:
    limited = Team(name="search", keys=(TEAM_KEY,), limits=TeamLimits(tokens_per_minute=1000))
    settings = fake_settings(upstream.base_url)
    settings = Settings(upstreams=settings.upstreams, routes=settings.routes, teams=(limited,))
    upstream.scripts.append(Script(text_stream(["big"], used=usage(600, 500))))
    async with observed_gateway(settings) as obs, await client(obs.gw.base_url, TEAM_KEY) as sdk:
        stream = await sdk.responses.create(
            model=MODEL, input="hi", stream=True, max_output_tokens=50
        )
        _ = [event async for event in stream]
        await one_request_line(obs.logs)
        assert tokens(obs, "prompt", "search") + tokens(obs, "completion", "search") == 1100
        with pytest.raises(openai.RateLimitError):
            await sdk.responses.create(model=MODEL, input="hi", stream=True, max_output_tokens=50)
    assert len(upstream.received) == 1


async def test_a_responses_request_without_a_model_is_refused(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await sdk.responses.create(input="hi")
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.create(model="nope", input="hi")


async def test_relayed_bytes_are_the_upstreams_plus_one_responses_error_event(
    upstream: FakeUpstream, observed: Observed, sdk: openai.AsyncOpenAI
) -> None:
    """What a raw client of a cut stream gets: every upstream byte, then the API's own
    `event: error` (numbered after the last event), never a chat-shaped error."""
    upstream.scripts.append(Script(CUT))
    raw = await sdk.responses.with_raw_response.create(model=MODEL, input="hi", stream=True)
    received = await raw.http_response.aread()
    sent = body(CUT)
    assert received.startswith(sent)
    event = received[len(sent) :]
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    data = orjson.loads(event[len(b"event: error\ndata: ") : -2])
    assert (data["type"], data["sequence_number"], data["code"]) == (
        "error",
        len(CUT),
        "upstream_truncated",
    )
    assert RESPONSE_ID.encode() in sent


async def test_the_budget_cut_ends_a_responses_stream_with_its_own_error_event(
    upstream: FakeUpstream,
) -> None:
    limited = Team(name="search", keys=(TEAM_KEY,), limits=TeamLimits(tokens_per_minute=100))
    base = fake_settings(upstream.base_url)
    settings = Settings(
        upstreams=base.upstreams,
        routes=base.routes,
        teams=(limited,),
        limits=Limits(on_token_budget_exceeded="cut"),
    )
    long = text_stream(["tok "] * 500, used=usage(1, 500))
    upstream.scripts.append(Script(long, pause_s=0.002))  # one read per event, or nearly
    async with observed_gateway(settings) as obs, await client(obs.gw.base_url, TEAM_KEY) as sdk:
        raw = await sdk.responses.with_raw_response.create(
            model=MODEL, input="hi", stream=True, max_output_tokens=10
        )
        received = await raw.http_response.aread()
        line = await one_request_line(obs.logs)
    *_, last = received.removesuffix(b"\n\n").split(b"\n\n")
    assert last.startswith(b"event: error\ndata: ")
    data = orjson.loads(last.split(b"data: ", 1)[1])
    assert data["code"] == data["error"]["code"] == "token_budget_exceeded"
    relayed = received.count(b"event: ") - 1  # the upstream's events, numbered from 0
    assert data["sequence_number"] == relayed
    assert received.count(b"response.output_text.delta\n") < 500
    assert (line["end"], line["error_code"]) == ("limit", "token_budget_exceeded")
