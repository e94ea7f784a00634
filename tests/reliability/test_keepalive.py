"""Keep-alive comments for slow starts (`routes[].keepalive_comment_s`).

While the first upstream byte of a stream is awaited, the gateway sends `: keep-alive` SSE
comments, so that a load balancer with an idle timeout does not cut a slow-starting stream.
Comments are invisible to SDKs. Once one went out the 200 is sent: a later upstream failure can
only be told with an SSE error event, and it is counted once, under its own reason.
"""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from structlog.testing import capture_logs

from gateway.proxy import KEEPALIVE_COMMENT
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway

from .helpers import (
    SIM,
    chat,
    gateway,
    post,
    request_line,
    settled,
    sim_settings,
    sse_error,
)

COMMENT_S = 0.05
SDK_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def upstream_errors(gw: RunningGateway, reason: str) -> float:
    return gw.metric("gateway_upstream_errors_total", upstream="sim", reason=reason)


def all_upstream_errors(gw: RunningGateway) -> float:
    return sum(
        sample.value
        for metric in gw.registry.collect()
        if metric.name == "gateway_upstream_errors"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_comments_flow_while_the_first_byte_is_awaited() -> None:
    async with gateway(sim_settings(keepalive_comment_s=COMMENT_S)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"ttft_ms": 400}))
            line = await request_line(logs)
        assert gw.metric(
            "gateway_requests_total", team="anonymous", model=SIM, upstream="sim", code="200"
        )
        await settled(gw)
    head, _, rest = answer.body.partition(b"data:")
    assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
    assert head and head == KEEPALIVE_COMMENT * (len(head) // len(KEEPALIVE_COMMENT))
    assert KEEPALIVE_COMMENT not in rest  # none once the upstream has spoken
    assert answer.events()[-1] == b"[DONE]"
    assert (line["end"], line["status"], line["chunks"]) == ("completed", 200, 4)


async def test_no_comment_without_the_setting() -> None:
    async with gateway(sim_settings()) as gw:
        answer = await post(gw, chat({"ttft_ms": 200}))
    assert answer.body.startswith(b"data:")


async def test_the_openai_sdk_ignores_the_comments() -> None:
    async with gateway(sim_settings(keepalive_comment_s=COMMENT_S)) as gw:
        client = await async_openai(gw.base_url, max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="sim-1",
                messages=SDK_MESSAGES,
                stream=True,
                extra_body={"sim": {"ttft_ms": 300, "chunks": 3}},
            )
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("fault", "reason", "code"),
    [
        ("reset_before_headers", "reset", "upstream_error"),
        ("html_500", "status_5xx", "upstream_error"),
    ],
)
async def test_an_upstream_failure_after_a_comment_ends_with_an_sse_error_event(
    fault: str, reason: str, code: str
) -> None:
    async with gateway(sim_settings(keepalive_comment_s=COMMENT_S)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"headers_delay_ms": 300, "fault": fault}))
            line = await request_line(logs)
        # sent twice (retry.attempts is 2), each attempt counted under its own reason
        assert upstream_errors(gw, reason) == 2
        assert all_upstream_errors(gw) == 2
        await settled(gw)
    assert answer.status == 200 and answer.body.startswith(KEEPALIVE_COMMENT)
    assert sse_error(answer)["code"] == code
    assert (line["end"], line["status"], line["error_code"]) == ("upstream_error", 200, code)


async def test_the_sdk_raises_on_a_failure_after_comments() -> None:
    async with gateway(sim_settings(keepalive_comment_s=COMMENT_S)) as gw:
        client = await async_openai(gw.base_url, max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="sim-1",
                messages=SDK_MESSAGES,
                stream=True,
                extra_body={"sim": {"headers_delay_ms": 300, "fault": "reset_before_headers"}},
            )
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
