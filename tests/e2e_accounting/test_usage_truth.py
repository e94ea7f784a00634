"""The upstream's `usage` is the truth; `usage: inject` obtains it without the client seeing it.

A fake upstream serves verbatim bytes, so the test knows exactly what the client must get:
with `usage: inject` and a client that did not ask for usage, the upstream's bytes minus
exactly the usage-only event, whatever the line endings and however the reads split it; with
a client that asked, the upstream's bytes unchanged. Where upstream usage and our own count
differ, the tally is the upstream's and both numbers reach the drift counters.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.e2e_accounting.helpers import (
    DONE,
    MESSAGES,
    Observed,
    chunk,
    client,
    event,
    fake_settings,
    observed_gateway,
    one_request_line,
    sim_settings,
    usage_event,
)
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream

MODEL_LABEL = "test-*"
UPSTREAM_PROMPT, UPSTREAM_COMPLETION = 11, 7
USAGE = usage_event(UPSTREAM_PROMPT, UPSTREAM_COMPLETION)
#: what the fake upstream answers: 3 content chunks (our count: 3), its usage says 7
EVENTS = [
    chunk(""),
    chunk("Hello"),
    chunk(" brave new"),
    chunk(" world"),
    chunk(None, "stop"),
    USAGE,
    DONE,
]


def pieces(body: bytes, size: int) -> list[bytes]:
    """`body` in writes of `size` bytes: frame boundaries fall anywhere, the usage event too."""
    return [body[i : i + size] for i in range(0, len(body), size)]


def with_newline(events: list[bytes], newline: bytes) -> list[bytes]:
    return [e.replace(b"\n", newline) for e in events]


async def raw_stream(o: Observed, **options: Any) -> bytes:
    """The bytes the SDK's client receives for one streamed request."""
    sdk = await client(o.gw.base_url)
    async with sdk.chat.completions.with_streaming_response.create(
        model="test-model", messages=MESSAGES, stream=True, **options
    ) as response:
        body = b"".join([part async for part in response.iter_bytes()])
    await sdk.close()
    return body


def upstream_asked_for_usage(up: FakeUpstream) -> bool:
    sent = orjson.loads(up.received[-1].body)
    return bool(sent.get("stream_options", {}).get("include_usage"))


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("split", [7, 64, 4096])
async def test_inject_removes_exactly_the_usage_event_and_tallies_it(
    newline: bytes, split: int
) -> None:
    events = with_newline(EVENTS, newline)
    usage = with_newline([USAGE], newline)[0]
    body = b"".join(events)
    async with fake_upstream() as up:
        up.scripts.append(Script(pieces(body, split)))
        async with observed_gateway(fake_settings(up.base_url, usage="inject")) as o:
            received = await raw_stream(o)
            line = await one_request_line(o.logs)
            assert upstream_asked_for_usage(up)
            assert received == body.replace(usage, b"")
            assert (line["prompt_tokens"], line["completion_tokens"]) == (
                UPSTREAM_PROMPT,
                UPSTREAM_COMPLETION,
            )
            assert line["usage_source"] == "upstream"
            tokens = {"team": "anonymous", "model": MODEL_LABEL}
            assert o.gw.metric("gateway_tokens_total", **tokens, type="completion") == 7
            assert o.gw.metric("gateway_tokens_total", **tokens, type="prompt") == 11


async def test_inject_leaves_the_stream_unchanged_for_a_client_that_asked_for_usage() -> None:
    body = b"".join(EVENTS)
    async with fake_upstream() as up:
        up.scripts.append(Script(pieces(body, 50)))
        async with observed_gateway(fake_settings(up.base_url, usage="inject")) as o:
            received = await raw_stream(o, stream_options={"include_usage": True})
            line = await one_request_line(o.logs)
    assert received == body
    sent = orjson.loads(up.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert set(sent) == {"model", "messages", "stream", "stream_options"}
    assert line["completion_tokens"] == UPSTREAM_COMPLETION


async def test_inject_with_the_simulator_hides_usage_from_the_sdk_but_tallies_it() -> None:
    async with observed_gateway(sim_settings(usage="inject")) as o:
        sdk = await client(o.gw.base_url)
        answer = await sdk.chat.completions.create(
            model="sim-inject", messages=MESSAGES, stream=True, extra_body={"sim": {"chunks": 9}}
        )
        parts = [part async for part in answer]
        await sdk.close()
        line = await one_request_line(o.logs)
    assert all(part.choices and part.usage is None for part in parts)
    assert line["usage_source"] == "upstream" and line["completion_tokens"] == 9


async def test_passthrough_does_not_ask_upstream_for_usage() -> None:
    async with fake_upstream() as up:
        up.scripts.append(Script([b"".join(EVENTS[:5]), DONE]))
        async with observed_gateway(fake_settings(up.base_url)) as o:
            received = await raw_stream(o)
            line = await one_request_line(o.logs)
    assert not upstream_asked_for_usage(up)
    assert received == b"".join(EVENTS[:5]) + DONE
    assert line["usage_source"] == "estimate" and line["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("reported", "live_total"),
    [(9, 9), (1, 3)],
    ids=["upstream_counts_more", "upstream_counts_less"],
)
async def test_upstream_usage_wins_and_the_drift_is_recorded(
    reported: int, live_total: int
) -> None:
    """The log shows the upstream's numbers; the drift counters hold ours (3) and theirs.

    gateway_tokens_total is a counter: what was counted live stays, and only what the live
    count missed is added at the end, so an overcount remains visible as drift.
    """
    script = [*EVENTS[:5], usage_event(21, reported), DONE]
    async with fake_upstream() as up:
        up.scripts.append(Script(script))
        async with observed_gateway(fake_settings(up.base_url)) as o:
            await raw_stream(o, stream_options={"include_usage": True})
            line = await one_request_line(o.logs)
            metric = o.gw.metric
            assert line["usage_source"] == "upstream"
            assert (line["prompt_tokens"], line["completion_tokens"]) == (21, reported)
            assert metric("gateway_usage_estimated_tokens_total", model=MODEL_LABEL) == 3
            assert metric("gateway_usage_upstream_tokens_total", model=MODEL_LABEL) == reported
            tokens = {"team": "anonymous", "model": MODEL_LABEL}
            assert metric("gateway_tokens_total", **tokens, type="completion") == live_total
            assert metric("gateway_tokens_total", **tokens, type="prompt") == 21


def final_chunk_with_usage(prompt: int, completion: int) -> bytes:
    """Some providers put `usage` on the last chunk that still carries a choice."""
    return event({
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    })  # fmt: skip


@pytest.mark.parametrize("usage", ["passthrough", "inject"])
async def test_usage_on_a_chunk_that_also_has_choices_is_tallied_and_relayed(usage: str) -> None:
    """Not a usage-only event: the client gets it unchanged, and its usage is still the truth."""
    body = b"".join([*EVENTS[:4], final_chunk_with_usage(5, 12), DONE])
    async with fake_upstream() as up:
        up.scripts.append(Script(pieces(body, 33)))
        async with observed_gateway(fake_settings(up.base_url, usage=usage)) as o:
            received = await raw_stream(o)
            line = await one_request_line(o.logs)
    assert received == body
    assert line["usage_source"] == "upstream"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 12)
    assert line["finish_reason"] == "stop"
