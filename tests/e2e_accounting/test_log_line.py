"""One canonical log line per request, with every field DESIGN.md lists, however it ends.

Completed, client-disconnected, upstream-failed (a simulator fault, before and after the
first byte) and limited requests each leave exactly one `request` event, found by the
request id the test sent. No event the gateway emits holds a key (the team's, the upstream's)
or the prompt's text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import Settings
from tests.e2e_accounting.helpers import (
    PATTERN,
    TEAM_KEY,
    UPSTREAM_KEY,
    LogEvent,
    Observed,
    client,
    eventually,
    observed_gateway,
    sim_settings,
    team,
)

#: the canonical line's fields (DESIGN.md, "Log line")
FIELDS = frozenset(
    [
        "request_id",
        "team",
        "model",
        "upstream",
        "status",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "usage_source",
        "ttft_ms",
        "duration_ms",
        "chunks",
        "finish_reason",
        "end",
        "requested_model",
    ]
)
LIMITED_KEY = "sk-team-limited-5e0c2a99"
PROMPT_TEXT = "my private prompt: the launch code is zebra-4417"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT_TEXT}]

Send = Callable[[openai.AsyncOpenAI, str], Awaitable[None]]


async def stream_all(sdk: openai.AsyncOpenAI, request_id: str, sim: dict[str, Any]) -> None:
    answer = await sdk.chat.completions.create(
        model="sim-log",
        messages=MESSAGES,
        stream=True,
        extra_body={"sim": sim},
        extra_headers={"X-Request-Id": request_id},
    )
    async for _ in answer:
        pass


async def completed(sdk: openai.AsyncOpenAI, request_id: str) -> None:
    await stream_all(sdk, request_id, {"chunks": 5, "reasoning_chunks": 2})


async def disconnected(sdk: openai.AsyncOpenAI, request_id: str) -> None:
    answer = await sdk.chat.completions.create(
        model="sim-log",
        messages=MESSAGES,
        stream=True,
        extra_body={"sim": {"chunks": 40, "delay_ms": 50}},
        extra_headers={"X-Request-Id": request_id},
    )
    async for part in answer:
        if part.choices and part.choices[0].delta.content:
            break
    await answer.close()


async def failed_mid_stream(sdk: openai.AsyncOpenAI, request_id: str) -> None:
    with pytest.raises(openai.APIError):
        await stream_all(
            sdk, request_id, {"chunks": 8, "fault": "reset_mid_stream", "fail_after": 3}
        )


async def failed_before_headers(sdk: openai.AsyncOpenAI, request_id: str) -> None:
    with pytest.raises(openai.InternalServerError):
        await stream_all(sdk, request_id, {"fault": "reset_before_headers"})


def settings() -> Settings:
    teams = (team("search"), team("limited", key=LIMITED_KEY, requests_per_minute=1))
    return sim_settings(teams=teams)


async def line_for(o: Observed, request_id: str) -> LogEvent:
    """The request's canonical line, after checking it is the only one."""

    def mine() -> list[LogEvent]:
        return [
            e for e in o.logs if e.get("event") == "request" and e.get("request_id") == request_id
        ]

    await eventually(lambda: bool(mine()))  # written last, after the request settled
    (line,) = mine()
    assert line.keys() >= FIELDS, FIELDS - line.keys()
    return line


def assert_no_secret(logs: list[LogEvent]) -> None:
    text = repr(logs)
    for secret in (TEAM_KEY, LIMITED_KEY, UPSTREAM_KEY, PROMPT_TEXT, "zebra-4417"):
        assert secret not in text


async def run(send: Send, request_id: str) -> LogEvent:
    async with observed_gateway(settings()) as o:
        sdk = await client(o.gw.base_url, key=TEAM_KEY)
        await send(sdk, request_id)
        line = await line_for(o, request_id)
        await sdk.close()
        assert len([e for e in o.logs if e.get("event") == "request"]) == 1
        assert_no_secret(o.logs)
    return line


async def test_completed_stream_logs_its_tally() -> None:
    line = await run(completed, "req-completed")
    assert line["end"] == "completed" and line["status"] == 200 and line["stream"] is True
    assert (line["team"], line["model"], line["upstream"]) == ("search", PATTERN, "sim")
    assert line["requested_model"] == "sim-log"  # verbatim; the metrics keep the pattern
    assert (line["completion_tokens"], line["reasoning_tokens"], line["chunks"]) == (7, 2, 7)
    assert line["prompt_tokens"] > 0 and line["usage_source"] == "estimate"
    assert line["finish_reason"] == "stop"
    assert 0 < line["ttft_ms"] <= line["duration_ms"]


async def test_client_disconnect_logs_what_was_counted() -> None:
    line = await run(disconnected, "req-gone")
    assert line["end"] == "client_disconnect" and line["status"] == 200
    assert line["completion_tokens"] > 0 and line["finish_reason"] is None


async def test_upstream_failure_mid_stream_is_logged_as_upstream_error() -> None:
    line = await run(failed_mid_stream, "req-reset")
    assert line["end"] == "upstream_error" and line["status"] == 200
    assert line["completion_tokens"] == 3 and line["finish_reason"] is None
    assert line["error_code"] is not None


async def test_upstream_failure_before_the_first_byte_is_logged_as_upstream_error() -> None:
    line = await run(failed_before_headers, "req-refused")
    assert line["end"] == "upstream_error" and line["status"] == 502
    assert line["stream"] is True and line["completion_tokens"] == 0
    assert line["ttft_ms"] is None


async def test_limited_request_is_logged_with_end_limit() -> None:
    async with observed_gateway(settings()) as o:
        sdk = await client(o.gw.base_url, key=LIMITED_KEY)
        await completed(sdk, "req-first")
        with pytest.raises(openai.RateLimitError):
            await completed(sdk, "req-second")
        await sdk.close()
        first, second = await line_for(o, "req-first"), await line_for(o, "req-second")
        assert len([e for e in o.logs if e.get("event") == "request"]) == 2
        assert_no_secret(o.logs)
    assert first["end"] == "completed" and first["team"] == "limited"
    assert second["end"] == "limit" and second["status"] == 429
    assert second["team"] == "limited" and second["model"] == PATTERN
    assert second["completion_tokens"] == 0 and second["ttft_ms"] is None


async def test_an_unknown_model_is_logged_as_the_client_asked_for_it() -> None:
    async def unknown(sdk: openai.AsyncOpenAI, request_id: str) -> None:
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(
                model="No-Such-Model 7b",
                messages=MESSAGES,
                extra_headers={"X-Request-Id": request_id},
            )

    line = await run(unknown, "req-unknown")
    assert line["status"] == 404
    assert (line["model"], line["requested_model"]) == ("other", "No-Such-Model 7b")
