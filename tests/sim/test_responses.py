"""The simulator serves the Responses API as OpenAI does; the official SDK reads all of it."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI, AsyncStream
from openai.types.responses import ResponseStreamEvent

from gateway.sim import RunningSim

from .helpers import TOOL, gateway_prompt, o200k


def sse_typed(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, JSON data) pairs of a Responses SSE body: `event:` then `data:` lines."""
    assert raw.endswith(b"\n\n")
    out = []
    for frame in raw[:-2].split(b"\n\n"):
        event, data = frame.split(b"\n")
        assert event.startswith(b"event: ") and data.startswith(b"data: "), frame
        out.append((event[7:].decode(), orjson.loads(data[6:])))
    return out


async def post_stream(
    session: aiohttp.ClientSession, running: RunningSim, **fields: Any
) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": "sim-small", "input": "hello", "stream": True, **fields}
    async with session.post(running.base_url + "/responses", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        return sse_typed(await resp.read())


async def open_stream(client: AsyncOpenAI, **steering: Any) -> AsyncStream[ResponseStreamEvent]:
    """`client.responses.create(stream=True)` with this `sim` steering."""
    return await client.responses.create(
        model="sim-small", input="hi", stream=True, extra_body={"sim": steering}
    )


async def test_stream_is_named_events_numbered_in_order_without_done(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    events = await post_stream(session, sim, sim={"chunks": 3})

    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["usage"] is None


async def test_deltas_carry_obfuscation_padding_that_is_not_output(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    events = await post_stream(session, sim, sim={"chunks": 4})

    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert all(d["obfuscation"] and d["obfuscation"].isalnum() for d in deltas)
    done = next(data for name, data in events if name == "response.output_text.done")
    assert done["text"] == "".join(d["delta"] for d in deltas) == "The quick brown fox"


async def test_terminal_event_repeats_the_whole_response_with_usage(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    fields = {"instructions": "Be brief. " * 50, "tools": tools, "sim": {"reasoning_chunks": 2}}
    events = await post_stream(session, sim, **fields)

    name, terminal = events[-1]
    response = terminal["response"]
    assert name == "response.completed"
    assert response["status"] == "completed"
    assert (response["instructions"], response["tools"]) == (fields["instructions"], tools)
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]
    deltas = [d["delta"] for n, d in events if n.endswith("_text.delta")]
    reasoning = [d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta"]
    body = {"model": "sim-small", "input": "hello", "stream": True, **fields}
    assert response["usage"] == {
        "input_tokens": gateway_prompt(body),
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": sum(o200k(d) for d in deltas),
        "output_tokens_details": {"reasoning_tokens": sum(o200k(d) for d in reasoning)},
        "total_tokens": gateway_prompt(body) + sum(o200k(d) for d in deltas),
    }


async def test_sdk_create_stream_reads_text_and_usage(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.responses.create(
        model="sim-small",
        input="hello there",
        stream=True,
        extra_body={"sim": {"text": "Ünïcödé café, naïve 日本語!"}},
    )
    events = [event async for event in stream]

    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Ünïcödé café, naïve 日本語!"
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == text
    usage = last.response.usage
    assert usage is not None
    pieces = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert usage.output_tokens == sum(o200k(p) for p in pieces) > len(pieces)
    assert usage.input_tokens == gateway_prompt({"input": "hello there"})
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_sdk_stream_helper_accumulates_reasoning_text_and_usage(
    openai_client: AsyncOpenAI,
) -> None:
    async with openai_client.responses.stream(
        model="sim-small",
        input="hi",
        extra_body={"sim": {"chunks": 5, "reasoning_chunks": 3, "cached_tokens": 1}},
    ) as stream:
        seen = [event.type async for event in stream]
        final = await stream.get_final_response()

    assert "response.reasoning_summary_text.delta" in seen
    assert final.status == "completed"
    assert final.output_text == "The quick brown fox jumps"
    reasoning = final.output[0]
    assert reasoning.type == "reasoning"
    assert [s.text for s in reasoning.summary] == ["Let me think"]
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens == o200k("Let") + 2
    assert final.usage.output_tokens == final.usage.output_tokens_details.reasoning_tokens + 5
    assert final.usage.input_tokens_details.cached_tokens == 1


async def test_sdk_stream_helper_reads_a_function_call(openai_client: AsyncOpenAI) -> None:
    async with openai_client.responses.stream(
        model="sim-small", input="weather?", extra_body={"sim": {"chunks": 0, "tool_call": TOOL}}
    ) as stream:
        arguments = [
            e.delta async for e in stream if e.type == "response.function_call_arguments.delta"
        ]
        final = await stream.get_final_response()

    call = final.output[-1]
    assert [item.type for item in final.output] == ["function_call"]
    assert call.type == "function_call"
    assert (call.name, call.arguments) == (TOOL["name"], TOOL["arguments"])
    assert "".join(arguments) == TOOL["arguments"]
    assert final.usage is not None
    assert final.usage.output_tokens == sum(o200k(a) for a in arguments)


async def test_whole_response_has_output_and_usage(openai_client: AsyncOpenAI) -> None:
    response = await openai_client.responses.create(
        model="sim-large", input="hi", extra_body={"sim": {"chunks": 3, "tool_call": TOOL}}
    )

    assert (response.object, response.model, response.status) == (
        "response",
        "sim-large",
        "completed",
    )
    assert response.output_text == "The quick brown"
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.usage is not None
    assert response.usage.output_tokens == 3 + o200k(TOOL["arguments"])
    assert response.usage.input_tokens == gateway_prompt({"input": "hi"})


@pytest.mark.parametrize(
    ("fault", "text"), [("crlf", "The quick brown"), ("split", "Ünïcödé café naïve")]
)
async def test_sdk_reads_crlf_and_split_streams(
    openai_client: AsyncOpenAI, fault: str, text: str
) -> None:
    async with openai_client.responses.stream(
        model="sim-small", input="hi", extra_body={"sim": {"chunks": 3, "fault": fault}}
    ) as stream:
        final = await stream.get_final_response()

    assert (final.status, final.output_text) == ("completed", text)


async def test_error_event_makes_the_sdk_raise(openai_client: AsyncOpenAI) -> None:
    stream = await open_stream(openai_client, chunks=4, fault="error_event", fail_after=2)
    seen: list[str] = []

    async def read() -> None:
        async for event in stream:
            seen.append(event.type)

    with pytest.raises(openai.APIError, match="sim: injected error event"):
        await read()
    assert seen.count("response.output_text.delta") == 2


async def test_error_event_has_the_sdk_typed_fields(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    events = await post_stream(session, sim, sim={"fault": "error_event", "fail_after": 1})

    name, data = events[-1]
    assert name == "error"
    assert (data["code"], data["message"], data["param"]) == (
        "sim_error_event",
        "sim: injected error event",
        None,
    )
    assert data["error"]["code"] == "sim_error_event"


async def test_failed_ends_with_response_failed_and_the_helper_raises(
    openai_client: AsyncOpenAI,
) -> None:
    async with openai_client.responses.stream(
        model="sim-small", input="hi", extra_body={"sim": {"fault": "failed", "fail_after": 2}}
    ) as stream:
        events = [event async for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()

    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error is not None
    assert last.response.error.code == "server_error"


async def test_incomplete_ends_with_what_was_sent_and_its_usage(openai_client: AsyncOpenAI) -> None:
    stream = await open_stream(openai_client, chunks=6, fault="incomplete", fail_after=2)
    events = [event async for event in stream]

    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == "The quick"
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 2
    assert "response.output_item.done" not in [e.type for e in events]


async def test_no_done_cuts_the_stream_before_its_terminal_event(
    openai_client: AsyncOpenAI,
) -> None:
    async with openai_client.responses.stream(
        model="sim-small", input="hi", extra_body={"sim": {"chunks": 3, "fault": "no_done"}}
    ) as stream:
        events = [event.type async for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()

    assert events[-1] == "response.output_item.done"


async def test_reset_mid_stream_raises_a_connection_error(openai_client: AsyncOpenAI) -> None:
    stream = await open_stream(openai_client, chunks=4, fault="reset_mid_stream", fail_after=1)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass


@pytest.mark.parametrize(("fault", "status"), [("failed", "failed"), ("incomplete", "incomplete")])
async def test_whole_response_faults_set_its_status(
    openai_client: AsyncOpenAI, fault: str, status: str
) -> None:
    response = await openai_client.responses.create(
        model="sim-small", input="hi", extra_body={"sim": {"fault": fault, "fail_after": 1}}
    )

    assert response.status == status
    assert response.output_text == ("The" if fault == "incomplete" else "")
    assert response.usage is not None
    assert response.usage.output_tokens == (1 if fault == "incomplete" else 0)


async def test_status_steering_raises_the_sdk_error(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await openai_client.responses.create(
            model="sim-small", input="hi", extra_body={"sim": {"status": 429}}
        )


async def test_responses_faults_are_refused_on_chat(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="responses only"):
        await openai_client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"sim": {"fault": "failed"}},
        )


async def test_a_response_can_be_retrieved_and_continued(openai_client: AsyncOpenAI) -> None:
    async with openai_client.responses.stream(
        model="sim-small", input="hi", extra_body={"sim": {"chunks": 2}}
    ) as stream:
        first = await stream.get_final_response()

    again = await openai_client.responses.retrieve(first.id)
    follow = await openai_client.responses.create(
        model="sim-small", input="more", previous_response_id=first.id
    )

    assert (again.id, again.output_text, again.status) == (first.id, "The quick", "completed")
    assert follow.previous_response_id == first.id
    assert follow.id != first.id


async def test_a_response_not_stored_cannot_be_retrieved(openai_client: AsyncOpenAI) -> None:
    response = await openai_client.responses.create(model="sim-small", input="hi", store=False)

    assert response.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await openai_client.responses.retrieve(response.id)


async def test_unknown_response_ids_are_not_found(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await openai_client.responses.retrieve("resp_elsewhere")
    with pytest.raises(openai.BadRequestError) as raised:
        await openai_client.responses.create(
            model="sim-small", input="hi", previous_response_id="resp_elsewhere"
        )
    assert raised.value.code == "previous_response_not_found"


async def test_two_simulators_never_make_the_same_response_id(
    openai_client: AsyncOpenAI, sim: RunningSim
) -> None:
    from gateway.sim import running_sim

    first = await openai_client.responses.create(model="sim-small", input="hi")
    async with running_sim() as other:
        other_client = openai_client.with_options(base_url=other.base_url)
        second = await other_client.responses.create(model="sim-small", input="hi")
        with pytest.raises(openai.NotFoundError):
            await other_client.responses.retrieve(first.id)

    assert first.id != second.id
    assert list(sim.state.responses) == [first.id]


async def test_the_response_store_is_bounded(openai_client: AsyncOpenAI, sim: RunningSim) -> None:
    sim.state.responses_limit = 2
    ids = [
        (await openai_client.responses.create(model="sim-small", input="hi")).id for _ in range(3)
    ]

    assert list(sim.state.responses) == ids[1:]


async def test_max_output_tokens_stops_the_answer_as_incomplete(openai_client: AsyncOpenAI) -> None:
    async with openai_client.responses.stream(
        model="sim-small",
        input="hi",
        max_output_tokens=3,
        extra_body={"sim": {"text": "one two three four five"}},
    ) as stream:
        events = [event async for event in stream]
    whole = await openai_client.responses.create(
        model="sim-small", input="hi", max_output_tokens=3, extra_body={"sim": {"chunks": 9}}
    )

    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.output_text == "one two three"
    assert last.response.usage is not None and last.response.usage.output_tokens == 3
    assert (whole.status, whole.output_text) == ("incomplete", "The quick brown")
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
