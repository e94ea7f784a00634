"""The simulator streams OpenAI's exact chunks, and the official SDK reads them."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from gateway.sim import DEFAULT_TEXT, RunningSim

from .helpers import TOOL, chat, gateway_prompt, o200k, sse_data, sse_json


async def post(
    session: aiohttp.ClientSession,
    sim: RunningSim,
    body: dict[str, Any],
    path: str = "/chat/completions",
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.post(sim.base_url + path, json=body) as resp:
        return resp, await resp.read()


async def test_chat_stream_is_byte_for_byte_openai_chunks(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    resp, raw = await post(session, sim, chat(model="my-model", stream=True, sim={"chunks": 2}))

    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = sse_json(raw)
    head = {k: events[0][k] for k in ("id", "object", "created", "model")}
    assert head["id"].startswith("chatcmpl-")
    assert head["object"] == "chat.completion.chunk"
    assert head["model"] == "my-model"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return orjson.dumps({**head, "choices": [choice]})

    assert sse_data(raw) == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "The"}),
        chunk({"content": " quick"}),
        chunk({}, "stop"),
        b"[DONE]",
    ]


async def test_sdk_reads_the_stream(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        extra_body={"sim": {"chunks": 5}},
    )
    chunks = [c async for c in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "The quick brown fox jumps"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_default_text_is_sixteen_word_pieces(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]

    assert len(pieces) == 16
    assert "".join(pieces) == " ".join(DEFAULT_TEXT.split()[:16])
    assert all(p.strip() and " " not in p.strip() for p in pieces)


async def test_include_usage_sends_the_usage_only_chunk_before_done(
    openai_client: AsyncOpenAI,
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "12345678"},
        {"role": "user", "content": "1"},
    ]
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"chunks": 7}},
    )
    chunks = [c async for c in stream]

    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    # prompt: the gateway's estimate (o200k, 3 per message, 3 to prime the reply)
    prompt = gateway_prompt({"messages": messages})
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, 7)
    assert last.usage.total_tokens == prompt + 7
    assert all(c.usage is None for c in body)


async def test_every_chunk_carries_usage_null_when_usage_is_asked(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, sim={"chunks": 2})
    _, raw = await post(session, sim, body)

    events = sse_json(raw)
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []


async def test_n_choices_are_interleaved_and_all_counted(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = chat(stream=True, n=2, stream_options={"include_usage": True}, sim={"chunks": 3})
    _, raw = await post(session, sim, body)

    events = sse_json(raw)
    indexes = [e["choices"][0]["index"] for e in events[:-1]]
    assert indexes == [0, 1] * 5  # role, 3 content, finish
    for i in (0, 1):
        mine = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert "".join(d.get("content", "") for d in mine) == "The quick brown"
    assert events[-1]["usage"]["completion_tokens"] == 6


async def test_reasoning_chunks_come_first_and_are_counted(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"chunks": 3, "reasoning_chunks": 4}},
    )
    chunks = [c async for c in stream]

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra]
    assert "".join(r for r in reasoning if r) == "Let me think about"
    kinds = ["r" if d.model_extra and "reasoning_content" in d.model_extra else "c" for d in deltas]
    assert kinds[1:8] == ["r"] * 4 + ["c"] * 3
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4


async def test_think_puts_reasoning_in_the_content(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"chunks": 2, "reasoning_chunks": 2, "think": True}},
    )
    chunks = [c async for c in stream]

    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert pieces == ["", "<think>", "Let", " me", "</think>", "The", " quick", None]
    usage = chunks[-1].usage
    assert usage is not None
    # o200k per chunk, the tags included: "<think>" and "</think>" are 3 tokens each
    assert usage.completion_tokens == sum(o200k(p or "") for p in pieces) == 10
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 8


async def test_text_and_finish_reason_are_steerable(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"text": "one two three", "chunks": 5, "finish_reason": "length"}},
    )
    chunks = [c async for c in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "one two three one two"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_text_alone_sets_the_chunk_count(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"text": "Hello, wörld! 🙂"}},
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]

    assert pieces == ["Hello,", " wörld!", " 🙂"]


async def test_plain_completion_streams_text_completion_chunks(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(
        model="sim-small",
        prompt="Say something",
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"chunks": 3}},
    )
    chunks = [c async for c in stream]

    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The quick brown"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == gateway_prompt({"prompt": "Say something"}) == 2
    assert chunks[-1].usage.completion_tokens == 3


async def test_whole_chat_answer_has_message_and_usage(openai_client: AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(
        model="sim-large",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        extra_body={"sim": {"chunks": 4, "reasoning_chunks": 1}},
    )

    assert answer.object == "chat.completion"
    assert answer.model == "sim-large"
    assert [c.index for c in answer.choices] == [0, 1]
    message = answer.choices[0].message
    assert message.content == "The quick brown fox"
    assert message.model_extra == {"reasoning_content": "Let"}
    assert answer.usage is not None
    prompt = gateway_prompt({"messages": [{"role": "user", "content": "hi"}]})
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 10)


async def test_whole_text_completion(openai_client: AsyncOpenAI) -> None:
    answer = await openai_client.completions.create(
        model="sim-small", prompt=["ab", "cd"], extra_body={"sim": {"chunks": 2}}
    )

    assert answer.object == "text_completion"
    assert answer.choices[0].text == "The quick"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 2


async def test_steering_in_the_x_sim_header(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    headers = {"x-sim": '{"chunks": 1, "text": "from header", "finish_reason": "length"}'}
    body = chat(stream=True, sim={"text": "from body"})
    async with session.post(sim.base_url + "/chat/completions", json=body, headers=headers) as r:
        events = sse_json(await r.read())

    assert events[1]["choices"][0]["delta"] == {"content": "from"}  # the body wins on `text`
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_are_deterministic_with_usage(openai_client: AsyncOpenAI) -> None:
    first = await openai_client.embeddings.create(model="sim-embed", input=["a", "bb"])
    again = await openai_client.embeddings.create(
        model="sim-embed", input="bb", encoding_format="float"
    )

    assert [d.index for d in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 8
    assert first.data[0].embedding != first.data[1].embedding
    assert again.data[0].embedding == first.data[1].embedding  # base64 and float agree
    assert first.usage.prompt_tokens == 2


async def test_models_lists_sim_models(openai_client: AsyncOpenAI) -> None:
    models = [m.id async for m in openai_client.models.list()]

    assert models
    assert all(m.startswith("sim-") for m in models)


async def test_a_chat_tool_call_streams_its_arguments_in_pieces(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "weather?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"chunks": 2, "tool_call": TOOL}},
    )
    chunks = [c async for c in stream]

    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
    first, *pieces = [call[0] for call in calls if call]
    assert first.function is not None
    assert (first.id, first.type, first.function.name) == ("call_sim1", "function", "get_weather")
    arguments = [p.function.arguments for p in pieces if p.function and p.function.arguments]
    assert "".join(arguments) == TOOL["arguments"] and len(arguments) > 1
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 2 + sum(o200k(a) for a in arguments)


async def test_a_whole_chat_answer_carries_the_tool_call(openai_client: AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "weather?"}],
        extra_body={"sim": {"chunks": 0, "tool_call": TOOL}},
    )

    message = answer.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == (TOOL["name"], TOOL["arguments"])
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == o200k(TOOL["arguments"])
