"""Token counts through the gateway agree with what the upstream (the simulator) reports.

The simulator reports what the gateway counts with its default tokenizer (o200k_base, per
chunk), and its default text's first pieces are one token each, so with the `chunks` tokenizer
the gateway's own count equals it too on short answers, whether or not the stream carries
`usage`. With cl100k the simulator's English text must come within BPE_TOLERANCE. Prompt tokens
are estimated at admission from the request; the simulator reports the o200k estimate.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import TokenizerName
from gateway.tokens import estimate_prompt_tokens, load_tokenizer
from tests.e2e_accounting.helpers import (
    MESSAGES,
    PATTERN,
    Observed,
    chunk,
    client,
    event,
    eventually,
    fake_settings,
    observed_gateway,
    one_request_line,
    request_lines,
    sim_settings,
)
from tests.support.fake_upstream import Script, fake_upstream

#: another BPE's per-chunk count against the simulator's o200k usage
BPE_TOLERANCE = 0.10
#: the simulator's prompt_tokens is the o200k estimate; chars / 4 (the `chunks` route's
#: rule) overstates English prose against a real BPE by roughly 20%, cl100k a little
PROMPT_TOLERANCE = 0.25

PROMPT = (
    "Before the printing press, books in Europe were copied by hand, mostly in monasteries,"
    " and a single Bible could take a scribe more than a year. Around 1450 Johannes Gutenberg"
    " combined movable metal type, an oil-based ink and a screw press adapted from wine"
    " making. Within fifty years, presses in more than two hundred cities had printed millions"
    " of volumes. Summarise this in three short sentences for a curious twelve-year-old."
)
LONG_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You answer briefly and clearly."},
    {"role": "user", "content": PROMPT},
]


async def stream(
    o: Observed,
    sim: dict[str, Any],
    *,
    include_usage: bool,
    messages: list[ChatCompletionMessageParam] = MESSAGES,
    n: int = 1,
) -> CompletionUsage | None:
    """Stream one answer through the gateway with the SDK; the usage it carried, if any."""
    sdk = await client(o.gw.base_url)
    answer = await sdk.chat.completions.create(
        model="sim-counts",
        messages=messages,
        stream=True,
        n=n,
        stream_options={"include_usage": True} if include_usage else openai.omit,
        extra_body={"sim": sim},
    )
    usage = None
    async for part in answer:
        usage = part.usage or usage
    await sdk.close()
    return usage


def completion_total(o: Observed, kind: str = "completion") -> float:
    return o.gw.metric("gateway_tokens_total", team="anonymous", model=PATTERN, type=kind)


async def test_chunks_tokenizer_equals_the_upstream_usage_when_the_stream_carries_it() -> None:
    async with observed_gateway(sim_settings("chunks")) as o:
        usage = await stream(o, {"chunks": 13}, include_usage=True)
        line = await one_request_line(o.logs)
        assert usage is not None and usage.completion_tokens == 13
        assert line["usage_source"] == "upstream"
        assert line["completion_tokens"] == usage.completion_tokens
        assert completion_total(o) == usage.completion_tokens


async def test_chunks_tokenizer_estimate_equals_the_upstream_usage_without_it() -> None:
    """Without include_usage the tally is the gateway's own count, and it must still agree."""
    async with observed_gateway(sim_settings("chunks")) as o:
        truth = await stream(o, {"chunks": 13}, include_usage=True)
        assert await stream(o, {"chunks": 13}, include_usage=False) is None
        await eventually(lambda: len(request_lines(o.logs)) == 2)
        estimated = request_lines(o.logs)[1]
        assert truth is not None
        assert estimated["usage_source"] == "estimate"
        assert estimated["completion_tokens"] == truth.completion_tokens
        assert completion_total(o) == 2 * truth.completion_tokens


async def test_every_choice_is_counted() -> None:
    """n=3: three interleaved choices, each chunk of each counted (the simulator sums them)."""
    async with observed_gateway(sim_settings("chunks")) as o:
        truth = await stream(o, {"chunks": 4}, include_usage=True, n=3)
        await stream(o, {"chunks": 4}, include_usage=False, n=3)
        await eventually(lambda: len(request_lines(o.logs)) == 2)
        estimated = request_lines(o.logs)[1]
        assert truth is not None and truth.completion_tokens == 12
        assert estimated["usage_source"] == "estimate"
        assert estimated["completion_tokens"] == truth.completion_tokens
        assert estimated["finish_reason"] == "stop"


@pytest.mark.parametrize("tokenizer", ["o200k_base", "cl100k_base"])
async def test_bpe_estimate_is_within_tolerance_of_the_upstream_usage(
    tokenizer: TokenizerName,
) -> None:
    async with observed_gateway(sim_settings(tokenizer)) as o:
        truth = await stream(o, {"chunks": 40}, include_usage=True)
        await stream(o, {"chunks": 40}, include_usage=False)
        await eventually(lambda: len(request_lines(o.logs)) == 2)
        estimated = request_lines(o.logs)[1]["completion_tokens"]
        assert truth is not None and truth.completion_tokens > 40  # "sun," is two tokens
        assert estimated == pytest.approx(truth.completion_tokens, rel=BPE_TOLERANCE)


@pytest.mark.parametrize("tokenizer", ["chunks", "o200k_base", "cl100k_base"])
async def test_prompt_is_estimated_at_admission_close_to_the_upstream_count(
    tokenizer: TokenizerName,
) -> None:
    async with observed_gateway(sim_settings(tokenizer)) as o:
        await stream(o, {"chunks": 2}, include_usage=False, messages=LONG_MESSAGES)
        line = await one_request_line(o.logs)
        body = {"model": "sim-counts", "messages": LONG_MESSAGES}
        assert line["prompt_tokens"] == estimate_prompt_tokens(body, load_tokenizer(tokenizer))
        usage = await stream(o, {"chunks": 2}, include_usage=True, messages=LONG_MESSAGES)
        assert usage is not None  # the simulator's count: the o200k estimate
        assert usage.prompt_tokens == estimate_prompt_tokens(body, load_tokenizer("o200k_base"))
        assert line["prompt_tokens"] == pytest.approx(usage.prompt_tokens, rel=PROMPT_TOLERANCE)
        await eventually(lambda: len(request_lines(o.logs)) == 2)
        prompts = line["prompt_tokens"] + usage.prompt_tokens
        await eventually(lambda: completion_total(o, "prompt") == prompts)


#: what o200k counts for the two tags (three tokens each)
TAGS = 6


@pytest.mark.parametrize(
    ("sim", "reasoning", "completion"),
    [
        ({"reasoning_chunks": 5, "chunks": 4}, 5, 9),  # delta.reasoning_content
        ({"reasoning_chunks": 5, "chunks": 4, "think": True}, 5 + TAGS, 9 + TAGS),
    ],
    ids=["reasoning_content", "think_tags"],
)
async def test_reasoning_is_counted_as_reasoning_and_as_completion(
    sim: dict[str, Any], reasoning: int, completion: int
) -> None:
    o200k = load_tokenizer("o200k_base")
    assert o200k.count("<think>") + o200k.count("</think>") == TAGS
    async with observed_gateway(sim_settings("o200k_base")) as o:
        await stream(o, sim, include_usage=False)
        line = await one_request_line(o.logs)
        assert (line["reasoning_tokens"], line["completion_tokens"]) == (reasoning, completion)
        assert completion_total(o, "reasoning") == reasoning
        assert completion_total(o, "completion") == completion
        truth = await stream(o, sim, include_usage=True)
        assert truth is not None and truth.completion_tokens_details is not None
        assert truth.completion_tokens_details.reasoning_tokens == reasoning
        assert truth.completion_tokens == completion


async def test_non_streamed_answer_is_counted_from_its_usage() -> None:
    async with observed_gateway(sim_settings("o200k_base")) as o:
        sdk = await client(o.gw.base_url)
        answer = await sdk.chat.completions.create(
            model="sim-whole",
            messages=MESSAGES,
            extra_body={"sim": {"chunks": 6, "reasoning_chunks": 2}},
        )
        await sdk.close()
        line = await one_request_line(o.logs)
        usage = answer.usage
        assert usage is not None and usage.completion_tokens == 8
        assert line["stream"] is False and line["usage_source"] == "upstream"
        assert (line["prompt_tokens"], line["completion_tokens"], line["reasoning_tokens"]) == (
            usage.prompt_tokens,
            usage.completion_tokens,
            2,
        )
        assert completion_total(o, "completion") == usage.completion_tokens
        assert completion_total(o, "prompt") == usage.prompt_tokens
        assert completion_total(o, "reasoning") == 2


async def test_non_streamed_answer_without_usage_is_estimated_from_its_text() -> None:
    whole = {
        "id": "chatcmpl-e2e",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "one two three"},
                "finish_reason": "stop",
            }
        ],
    }
    body = event(whole)[len(b"data: ") : -2]
    async with fake_upstream() as up:
        up.scripts.append(Script([body], content_type="application/json"))
        async with observed_gateway(fake_settings(up.base_url, tokenizer="o200k_base")) as o:
            sdk = await client(o.gw.base_url)
            answer = await sdk.chat.completions.create(model="test-model", messages=[])
            await sdk.close()
            line = await one_request_line(o.logs)
    assert answer.choices[0].message.content == "one two three"
    assert line["usage_source"] == "estimate"
    assert line["completion_tokens"] == 3  # " two" and " three" are one o200k token each
    assert line["finish_reason"] == "stop"


def test_fake_chunk_helper_is_openai_shaped() -> None:
    """The helper's bytes parse as the SDK's chunk type (so fake streams are realistic)."""
    from openai.types.chat import ChatCompletionChunk

    parsed = ChatCompletionChunk.model_validate_json(chunk("x")[len(b"data: ") : -2])
    assert parsed.choices[0].delta.content == "x"


@pytest.mark.parametrize(
    "sim",
    [
        {"chunks": 64},  # the default text, punctuation and all
        {"text": "Ünïcödé café, naïve résumé — 日本語の テキスト 🙂 smörgåsbord jalapeño!"},
        {"chunks": 6, "reasoning_chunks": 5, "think": True},
        {"chunks": 6, "reasoning_chunks": 5},
        {"chunks": 3, "tool_call": {"name": "f", "arguments": '{"city": "Zürich", "days": 3}'}},
    ],
    ids=["default_text", "multibyte", "think_tags", "reasoning_content", "tool_call"],
)
async def test_the_simulator_usage_is_the_default_tokenizer_count_so_drift_is_zero(
    sim: dict[str, Any],
) -> None:
    """The `sim-*` demo: what the gateway counts live equals what the simulator reports."""
    async with observed_gateway(sim_settings("o200k_base")) as o:
        usage = await stream(o, sim, include_usage=True, n=2)
        line = await one_request_line(o.logs)
        assert usage is not None and line["usage_source"] == "upstream"
        estimated = o.gw.metric("gateway_usage_estimated_tokens_total", model=PATTERN)
        upstream = o.gw.metric("gateway_usage_upstream_tokens_total", model=PATTERN)
        assert estimated == upstream == usage.completion_tokens > 2 * (sim.get("chunks") or 4)
        body = {"model": "sim-counts", "messages": MESSAGES}
        assert usage.prompt_tokens == estimate_prompt_tokens(body, load_tokenizer("o200k_base"))
