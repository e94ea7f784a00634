"""Tokens the upstream generated before the client hung up are counted and logged.

The client reads part of a slow stream and closes it (the SDK closes the connection): the
gateway stops relaying, and still settles the request as a client disconnect with what it had
counted, in the metrics and in the one log line.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e_accounting.helpers import (
    MESSAGES,
    PATTERN,
    client,
    observed_gateway,
    one_request_line,
    sim_settings,
    stream_then_leave,
)

LABELS = {"team": "anonymous", "model": PATTERN}


async def test_tokens_before_a_client_disconnect_are_counted() -> None:
    async with observed_gateway(sim_settings()) as o:
        sdk = await client(o.gw.base_url)
        await stream_then_leave(sdk, "sim-gone")
        line = await one_request_line(o.logs)
        await sdk.close()
        metric = o.gw.metric
        assert line["end"] == "client_disconnect"
        assert 3 <= line["completion_tokens"] < 40
        assert line["finish_reason"] is None
        assert (
            metric("gateway_tokens_total", **LABELS, type="completion") == line["completion_tokens"]
        )
        assert metric("gateway_client_disconnects_total", **LABELS) == 1
        assert metric("gateway_active_streams", **LABELS) == 0
        assert metric("gateway_finish_reason_total", model=PATTERN, reason="none") == 1
        assert metric("gateway_stream_duration_seconds_count", model=PATTERN, upstream="sim") == 1


async def test_a_client_that_gives_up_before_the_first_byte_is_counted_as_a_disconnect() -> None:
    """Clients timing out on a slow first token are the disconnects operators must see."""
    async with observed_gateway(sim_settings()) as o:
        sdk = await client(o.gw.base_url)
        with pytest.raises(openai.APITimeoutError):
            await sdk.chat.completions.create(
                model="sim-slow-start",
                messages=MESSAGES,
                stream=True,
                timeout=0.3,
                extra_body={"sim": {"headers_delay_ms": 3000}},
            )
        line = await one_request_line(o.logs)
        await sdk.close()
        assert line["end"] == "client_disconnect" and line["completion_tokens"] == 0
        assert line["status"] == 499  # nginx's "client closed request": no response had begun
        assert o.gw.metric("gateway_client_disconnects_total", **LABELS) == 1
        code = {"upstream": "none", "code": "499"}
        assert o.gw.metric("gateway_requests_total", **LABELS, **code) == 1
        assert o.gw.metric("gateway_active_streams", **LABELS) == 0
