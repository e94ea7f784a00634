"""The bench's Responses stream is what OpenAI sends: the official SDK parses every event."""

from __future__ import annotations

import pytest
from openai._streaming import SSEDecoder
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from bench.sse import FRAME_EVENTS, StreamSpec, expected_body, parse_request_body, request_body

EVENTS = TypeAdapter(ResponseStreamEvent)


def test_every_event_validates_as_the_sdk_type_numbered_in_order() -> None:
    body = expected_body(30, "responses").body
    raw = list(SSEDecoder().iter_bytes(iter([body])))
    events = [EVENTS.validate_json(sse.data) for sse in raw]

    assert [sse.event for sse in raw] == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(30))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 30 - FRAME_EVENTS["responses"]
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == "".join(deltas)
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == len(deltas)


def test_the_big_events_repeat_instructions_and_tools() -> None:
    ends = expected_body(260, "responses").ends
    sizes = [b - a for a, b in zip((0, *ends), ends, strict=False)]

    assert min(sizes[0], sizes[-1]) > 3000  # created and completed: the whole response
    assert max(sizes[4:-4]) < 300  # a delta: a word, its ids and its padding


def test_the_request_names_the_api_and_the_upstream_reads_it_back() -> None:
    spec = StreamSpec(40, 5.0, "responses")
    assert parse_request_body(request_body(spec), "responses") == spec


def test_a_responses_stream_needs_its_frame_events() -> None:
    with pytest.raises(ValueError, match="responses"):
        StreamSpec(FRAME_EVENTS["responses"] - 1, 0.0, "responses")
