"""Every model endpoint's usage is read, with the official SDK as client: completions streamed
and whole, embeddings. (Chat: test_counts and test_usage_truth; Responses: test_responses_api.)

The upstream is a FakeUpstream replaying verbatim bodies; the route counts with `chunks` (one
token per content event), so the live count and the upstream's usage differ on purpose and the
test sees which one was settled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from tests.e2e_accounting.helpers import (
    DONE,
    Observed,
    client,
    event,
    fake_settings,
    observed_gateway,
    one_request_line,
)
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream

LABEL = "test-*"


@pytest.fixture
async def observed() -> AsyncIterator[tuple[FakeUpstream, Observed]]:
    async with fake_upstream() as up, observed_gateway(fake_settings(up.base_url)) as obs:
        yield up, obs


def completion_chunk(text: str, finish: str | None = None) -> bytes:
    return event({
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "test-1",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    })  # fmt: skip


def tokens(obs: Observed, kind: str) -> float:
    return obs.gw.metric("gateway_tokens_total", team="anonymous", model=LABEL, type=kind)


async def test_a_completions_stream_counts_text_live_and_settles_to_its_usage(
    observed: tuple[FakeUpstream, Observed],
) -> None:
    upstream, obs = observed
    usage = event({
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "test-1",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 2}},
    })  # fmt: skip
    pieces = [completion_chunk("Once"), completion_chunk(" upon"), completion_chunk("", "stop")]
    upstream.scripts.append(Script([*pieces, usage, DONE]))
    async with await client(obs.gw.base_url) as sdk:
        stream = await sdk.completions.create(model="test-1", prompt="Tell", stream=True)
        text = "".join([part.choices[0].text async for part in stream if part.choices])
    assert text == "Once upon"
    line = await one_request_line(obs.logs)
    assert (line["prompt_tokens"], line["completion_tokens"], line["usage_source"]) == (
        7,
        5,
        "upstream",
    )
    assert (line["cached_prompt_tokens"], line["finish_reason"], line["stream"]) == (
        2,
        "stop",
        True,
    )
    assert (tokens(obs, "prompt"), tokens(obs, "completion"), tokens(obs, "cached_prompt")) == (
        7,
        5,
        2,
    )
    assert obs.gw.metric("gateway_usage_estimated_tokens_total", model=LABEL) == 2  # live: 2


async def test_a_whole_completion_is_counted_from_its_usage(
    observed: tuple[FakeUpstream, Observed],
) -> None:
    upstream, obs = observed
    answer = {
        "id": "cmpl-2", "object": "text_completion", "created": 1700000000, "model": "test-1",
        "choices": [{"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }  # fmt: skip
    upstream.scripts.append(Script([orjson.dumps(answer)], content_type="application/json"))
    async with await client(obs.gw.base_url) as sdk:
        result = await sdk.completions.create(model="test-1", prompt="Tell", max_tokens=2)
    assert result.choices[0].text == "Once upon"
    line = await one_request_line(obs.logs)
    assert (line["prompt_tokens"], line["completion_tokens"], line["finish_reason"]) == (
        4,
        2,
        "length",
    )
    assert (line["usage_source"], line["stream"]) == ("upstream", False)
    assert (tokens(obs, "prompt"), tokens(obs, "completion")) == (4, 2)


async def test_embeddings_are_counted_from_their_prompt_tokens(
    observed: tuple[FakeUpstream, Observed],
) -> None:
    upstream, obs = observed
    answer = {
        "object": "list", "model": "test-1",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }  # fmt: skip
    upstream.scripts.append(Script([orjson.dumps(answer)], content_type="application/json"))
    async with await client(obs.gw.base_url) as sdk:
        result = await sdk.embeddings.create(
            model="test-1", input="hello there", encoding_format="float"
        )
    assert result.data[0].embedding == [0.25, -0.5, 0.125]
    assert result.usage.prompt_tokens == 6
    line = await one_request_line(obs.logs)
    assert (line["prompt_tokens"], line["completion_tokens"], line["usage_source"]) == (
        6,
        0,
        "upstream",
    )
    assert (tokens(obs, "prompt"), tokens(obs, "completion")) == (6, 0)
