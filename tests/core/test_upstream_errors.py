"""How a failed exchange with an upstream becomes the gateway's error: `upstream.gateway_error_for`
is the one mapping (before the answer's head, before its first body bytes, mid-stream), and
everything that fails before the first byte fails over except a timeout."""

from __future__ import annotations

import pytest

from gateway import upstream_http
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.upstream import Phase, gateway_error_for
from tests.core.conftest import settings_for
from tests.core.test_errors_and_failover import CHAT, assert_openai_error, post
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import running_gateway

IDLE = upstream_http.IdleTimeout("no byte")
CONNECT = upstream_http.ConnectFailed("connect to 10.0.0.7:443 failed")
GONE = upstream_http.Disconnected("closed")
BROKEN = upstream_http.ProtocolViolation("not HTTP")

#: (failure, phase) -> (error class, status, reason label, message)
MAPPING: list[tuple[Exception, Phase, type[GatewayError], int, str, str]] = [
    (IDLE, "send", UpstreamTimeout, 504, "idle_timeout", "upstream 'up0' sent no answer in time"),
    (
        CONNECT,
        "send",
        UpstreamError,
        502,
        "connect",
        "upstream 'up0' is unreachable: ConnectFailed",
    ),
    (
        GONE,
        "send",
        UpstreamError,
        502,
        "reset",
        "upstream 'up0' closed the connection before answering",
    ),
    (BROKEN, "send", UpstreamError, 502, "protocol", "upstream 'up0' failed: ProtocolViolation"),
    (
        ValueError("CR in a header"),
        "send",
        UpstreamError,
        502,
        "protocol",
        "upstream 'up0' failed: ValueError",
    ),
    (
        IDLE,
        "first_chunk",
        UpstreamTimeout,
        504,
        "idle_timeout",
        "upstream 'up0' sent no body in time",
    ),
    (GONE, "first_chunk", UpstreamError, 502, "reset", "upstream 'up0' broke off before the body"),
    (
        BROKEN,
        "first_chunk",
        UpstreamError,
        502,
        "reset",
        "upstream 'up0' broke off before the body",
    ),
    (
        IDLE,
        "stream",
        UpstreamTimeout,
        504,
        "idle_timeout",
        "The upstream went silent in the middle of the stream.",
    ),
    (
        GONE,
        "stream",
        UpstreamError,
        502,
        "reset",
        "The upstream broke off the stream (Disconnected).",
    ),
    (
        BROKEN,
        "stream",
        UpstreamError,
        502,
        "reset",
        "The upstream broke off the stream (ProtocolViolation).",
    ),
]


@pytest.mark.parametrize(
    ("failure", "phase", "kind", "status", "reason", "message"),
    MAPPING,
    ids=[f"{case[1]}-{case[0].__class__.__name__}" for case in MAPPING],
)
def test_each_upstream_failure_has_one_message_status_and_reason(
    failure: Exception,
    phase: Phase,
    kind: type[GatewayError],
    status: int,
    reason: str,
    message: str,
) -> None:
    error = gateway_error_for(failure, phase, "up0")
    assert type(error) is kind
    assert (error.status, error.reason, error.message) == (status, reason, message)
    assert "10.0.0.7" not in error.message  # the client never learns the upstream's address


async def test_an_upstream_timeout_before_the_first_byte_is_not_failed_over(
    upstream: FakeUpstream,
) -> None:
    """Another wait as long would be worse: the silent upstream's 504 is the answer."""
    upstream.scripts.append(Script([b"data: [DONE]\n\n"], headers_delay_s=5))
    async with fake_upstream() as second:
        settings = settings_for(upstream.base_url, second.base_url, read_idle_timeout_s=0.3)
        async with running_gateway(settings) as gw:
            status, _, body = await post(gw, CHAT)
            errors = gw.metric(
                "gateway_upstream_errors_total", upstream="up0", reason="idle_timeout"
            )
    assert status == 504
    assert_openai_error(body, "upstream_timeout")
    assert errors == 1
    assert second.received == []


async def test_a_reset_before_the_first_byte_fails_over(upstream: FakeUpstream) -> None:
    upstream.scripts.append(Script([], then="abort"))
    async with fake_upstream() as second:
        second.scripts.append(Script([b"data: [DONE]\n\n"]))
        async with running_gateway(settings_for(upstream.base_url, second.base_url)) as gw:
            status, _, body = await post(gw, CHAT)
            errors = gw.metric("gateway_upstream_errors_total", upstream="up0", reason="reset")
    assert (status, body) == (200, b"data: [DONE]\n\n")
    assert errors == 1
    assert len(second.received) == 1
