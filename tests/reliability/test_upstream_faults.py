"""Upstream faults: each has one defined result for the client, one metric and one log line.

Before any byte reached the client a failure is an OpenAI-shaped error (502, 504); after, the
stream ends with one `data: {"error": ...}` event so that SDK clients raise instead of keeping
half an answer. Every test also checks that the upstream pool is whole again afterwards.
"""

from __future__ import annotations

import gzip

import orjson
from structlog.testing import capture_logs

from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import RunningGateway

from .helpers import (
    FINAL,
    SIM,
    assert_openai_error,
    chat,
    closed_port,
    content_event,
    fake_settings,
    gateway,
    parses,
    post,
    request_line,
    settled,
    sim_settings,
    sim_state,
    sse_error,
)


def upstream_errors(gw: RunningGateway, reason: str, upstream: str = "sim") -> float:
    return gw.metric("gateway_upstream_errors_total", upstream=upstream, reason=reason)


async def test_connection_refused_is_502_counted_as_connect() -> None:
    settings = fake_settings(f"http://127.0.0.1:{closed_port()}/v1")
    async with gateway(settings) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat(model="test-1"))
            line = await request_line(logs)
        assert upstream_errors(gw, "connect", "up0") == 2  # sent twice: retry.attempts is 2
        assert gw.metric(
            "gateway_requests_total", team="anonymous", model="test-*", upstream="up0", code="502"
        )
        await settled(gw)
    assert_openai_error(answer, 502, "upstream_error")
    assert (line["end"], line["status"], line["upstream"]) == ("upstream_error", 502, "up0")


async def test_reset_before_headers_is_502_counted_as_reset() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "reset_before_headers"}))
            line = await request_line(logs)
        assert upstream_errors(gw, "reset") == 2  # sent twice: retry.attempts is 2
        await settled(gw)
    assert_openai_error(answer, 502, "upstream_error")
    assert (line["end"], line["status"], line["error_code"]) == (
        "upstream_error",
        502,
        "upstream_error",
    )


async def test_reset_mid_stream_ends_with_an_sse_error_event() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "reset_mid_stream", "fail_after": 2}))
            line = await request_line(logs)
        assert upstream_errors(gw, "reset") == 1
        await settled(gw)
    assert answer.status == 200 and answer.error is None
    assert len(answer.events()) == 4  # role, two content chunks, the error event
    assert sse_error(answer)["code"] == "upstream_error"
    assert (line["end"], line["status"], line["chunks"]) == ("upstream_error", 200, 2)


async def test_stall_before_the_first_byte_is_504_after_the_idle_timeout() -> None:
    async with gateway(sim_settings(read_idle_timeout_s=0.3)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "stall", "fail_after": 0}))
            line = await request_line(logs)
        assert upstream_errors(gw, "idle_timeout") == 1
        await settled(gw)  # the stalled upstream request was dropped, its slot is back
    assert_openai_error(answer, 504, "upstream_timeout")
    assert (line["end"], line["status"], line["upstream"]) == ("upstream_error", 504, "sim")


async def test_stall_mid_stream_ends_with_an_sse_error_event() -> None:
    async with gateway(sim_settings(read_idle_timeout_s=0.3)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "stall", "fail_after": 2}))
            line = await request_line(logs)
        assert upstream_errors(gw, "idle_timeout") == 1
        await settled(gw)
    assert answer.status == 200
    assert sse_error(answer)["code"] == "upstream_timeout"
    assert (line["end"], line["error_code"], line["chunks"]) == (
        "upstream_error",
        "upstream_timeout",
        2,
    )


async def test_malformed_sse_is_relayed_unchanged_and_what_parses_is_counted(
    upstream: FakeUpstream,
) -> None:
    pieces = [
        b"not a field at all\n",
        b"\xff\xfe\x00 binary noise\n\n",
        b"data\n\n",  # a data field with no colon: an empty event
        b"event: odd\nretry: soon\nid: \x00\n" + content_event("one"),
        b'data: {"choices":[{"index":0,"delta":{"content":\r\n\r\n',  # cut in the middle
        content_event("two"),
        FINAL,
        b"data: [DONE]\n\n",
    ]
    upstream.scripts.append(Script(pieces))
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat(model="test-1"))
            line = await request_line(logs)
        assert gw.metric("gateway_sse_decode_errors_total", model="test-*") == 2
        tokens = gw.metric(
            "gateway_tokens_total", team="anonymous", model="test-*", type="completion"
        )
    assert answer.status == 200
    assert answer.body == b"".join(pieces)
    assert tokens == 2
    assert (line["end"], line["chunks"], line["finish_reason"]) == ("completed", 2, "stop")


async def test_invalid_json_in_a_chunk_is_relayed_unchanged_and_counted() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "invalid_json", "fail_after": 1}))
            line = await request_line(logs)
        assert gw.metric("gateway_sse_decode_errors_total", model=SIM) == 1
        tokens = gw.metric("gateway_tokens_total", team="anonymous", model=SIM, type="completion")
        await settled(gw)
    broken = [event for event in answer.events() if not parses(event)]
    assert answer.status == 200 and len(broken) == 1  # it reached the client as it was sent
    assert answer.events()[-1] == b"[DONE]"
    assert tokens == 4  # the stream went on being counted after the broken event
    assert (line["end"], line["finish_reason"]) == ("completed", "stop")


async def test_a_data_line_of_several_mib_passes_whole() -> None:
    size = 6 * 1024 * 1024
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "big_line", "fail_after": 1, "big_bytes": size}))
            line = await request_line(logs)
        await settled(gw)
        assert gw.metric("gateway_sse_decode_errors_total", model=SIM) == 0  # parsed whole
        assert gw.metric("gateway_finish_reason_total", model=SIM, reason="stop") == 1
    big = max(answer.events(), key=len)
    assert answer.status == 200 and answer.events()[-1] == b"[DONE]"
    assert len(big) >= size - 64
    content = orjson.loads(big)["choices"][0]["delta"]["content"]
    assert set(content) == {"x"}
    assert (line["end"], line["chunks"], line["finish_reason"]) == ("completed", 5, "stop")


async def test_a_5xx_with_an_html_body_becomes_an_openai_shaped_502() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "html_500"}))
            line = await request_line(logs)
        assert upstream_errors(gw, "status_5xx") == 2  # sent twice: retry.attempts is 2
        await settled(gw)
    assert_openai_error(answer, 502, "upstream_error")
    assert "<html>" not in answer.json()["error"]["message"]
    assert (line["end"], line["status"]) == ("upstream_error", 502)


async def test_a_redirect_is_never_followed(upstream: FakeUpstream) -> None:
    async with fake_upstream() as elsewhere:
        target = f"{elsewhere.url}/v1/chat/completions"
        upstream.scripts.append(Script([], status=307, headers={"Location": target}))
        async with gateway(fake_settings(upstream.base_url)) as gw:
            with capture_logs() as logs:
                answer = await post(gw, chat(model="test-1"))
                line = await request_line(logs)
            assert upstream_errors(gw, "redirect", "up0") == 1
            await settled(gw)
        assert elsewhere.received == [] and elsewhere.connections_opened == 0
    assert_openai_error(answer, 502, "upstream_error")
    assert (line["end"], line["status"]) == ("upstream_error", 502)


async def test_a_gzip_encoded_answer_reaches_the_client_decoded() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "gzip"}, stream=False))
            line = await request_line(logs)
        sent = sim_state(gw).requests[-1].headers
        assert (
            gw.metric("gateway_tokens_total", team="anonymous", model=SIM, type="completion") == 4
        )
    assert sent["Accept-Encoding"] == "identity"  # asked for plain bytes; the upstream gzipped
    assert answer.status == 200 and "content-encoding" not in answer.headers
    assert answer.json()["choices"][0]["message"]["content"] == "The quick brown fox"
    assert (line["end"], line["usage_source"], line["completion_tokens"]) == (
        "completed",
        "upstream",
        4,
    )


async def test_a_gzip_encoded_stream_is_relayed_decoded(upstream: FakeUpstream) -> None:
    plain = content_event("hello") + FINAL + b"data: [DONE]\n\n"
    squeezed = gzip.compress(plain)
    upstream.scripts.append(
        Script([squeezed[:20], squeezed[20:]], headers={"Content-Encoding": "gzip"})
    )
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat(model="test-1"))
            line = await request_line(logs)
        assert gw.metric("gateway_finish_reason_total", model="test-*", reason="stop") == 1
    assert answer.body == plain and "content-encoding" not in answer.headers
    assert (line["end"], line["chunks"]) == ("completed", 1)


async def test_a_stream_cut_short_without_done_or_finish_reason_ends_with_an_error_event(
    upstream: FakeUpstream,
) -> None:
    """The upstream closed the body cleanly mid-answer: without the gateway's event, an SDK
    would hand the caller half an answer as if it were whole."""
    pieces = [content_event("half"), content_event(" an")]
    upstream.scripts.append(Script(pieces))
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat(model="test-1"))
            line = await request_line(logs)
        assert upstream_errors(gw, "truncated", "up0") == 1
    assert answer.body.startswith(b"".join(pieces))
    assert sse_error(answer)["code"] == "upstream_truncated"
    assert (line["end"], line["error_code"], line["chunks"]) == (
        "upstream_error",
        "upstream_truncated",
        2,
    )


async def test_a_stream_with_a_finish_reason_but_no_done_is_complete() -> None:
    """Some upstreams never send [DONE]: a finish_reason says the answer is whole."""
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "no_done"}))
            line = await request_line(logs)
        assert upstream_errors(gw, "truncated") == 0
        assert gw.metric("gateway_finish_reason_total", model=SIM, reason="stop") == 1
        await settled(gw)
    assert b"[DONE]" not in answer.body and b'"error"' not in answer.body
    assert (line["end"], line["finish_reason"]) == ("completed", "stop")


async def test_an_upstream_error_event_is_relayed_and_counted() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat({"fault": "error_event", "fail_after": 1}))
            line = await request_line(logs)
        assert upstream_errors(gw, "error_event") == 1
        await settled(gw)
    assert sse_error(answer)["code"] == "sim_error_event"  # the upstream's own event, as sent
    assert answer.body.count(b'"error"') == 1
    assert (line["end"], line["error_code"]) == ("upstream_error", "sim_error_event")
