"""The Responses API meter: what each typed event counts, live and at the end, however the
network splits the stream.

Counted with `Letters` (one token per character), so the figures read off the test strings.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway import meter as meter_module
from gateway.errors import UpstreamError, responses_error_event, stream_error_event
from gateway.meter import JsonMeter, ResponsesMeter, Tally
from gateway.sse import SSEDecoder
from tests.accounting.responses_streams import (
    BIG,
    CORPUS,
    CRLF,
    CUT,
    INCOMPLETE,
    LONG_PADDING,
    RESPONSE_ID,
    TEXT,
    body,
    error_event_stream,
    failed_stream,
    function_call_stream,
    message,
    reasoning_stream,
    refusal_stream,
    response,
    usage,
)
from tests.accounting.test_meter import Letters, Sink

SMALL = [name for name, events in CORPUS.items() if len(body(events)) < 10_000]


def run(pieces: list[bytes], **kwargs: Any) -> tuple[Tally, Sink, list[str]]:
    sink, ids = Sink(), list[str]()
    meter = ResponsesMeter(Letters(), sink, 5, ids.append, **kwargs)
    for piece in pieces:
        meter.feed(piece)
    tally = meter.finish()
    assert sink.totals == (tally.estimated_completion, sink.totals[1])
    return tally, sink, ids


def test_output_text_deltas_count_live_and_the_terminal_usage_settles() -> None:
    tally, sink, ids = run(TEXT)
    assert sink.calls == [(5, 0), (8, 0), (1, 0)]  # one per delta event, padding excluded
    assert (tally.estimated_completion, tally.chunks) == (14, 3)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.reasoning_tokens) == (12, 3, 0)
    assert (tally.usage_source, tally.cached_prompt_tokens) == ("upstream", 4)
    assert (tally.finish_reason, tally.upstream_error, tally.decode_errors) == ("stop", None, 0)
    assert ids == [RESPONSE_ID] and tally.response_id == RESPONSE_ID


def test_reasoning_summary_deltas_count_as_reasoning_and_completion() -> None:
    tally, sink, _ = run(reasoning_stream())
    assert sink.totals == (len("Think first. Then answer.42"), len("Think first. Then answer."))
    assert (tally.completion_tokens, tally.reasoning_tokens) == (130, 128)


def test_reasoning_text_deltas_count_as_reasoning() -> None:
    events = [
        e.replace(b"reasoning_summary_text.delta", b"reasoning_text.delta")
        for e in reasoning_stream()
    ]
    _, sink, _ = run(events)
    assert sink.totals[1] == len("Think first. Then answer.")


def test_function_call_arguments_count_as_completion_and_end_in_tool_calls() -> None:
    tally, sink, _ = run(function_call_stream())
    assert sink.totals == (len('{"city":"Paris"}'), 0)
    assert (tally.finish_reason, tally.completion_tokens) == ("tool_calls", 17)


def test_custom_tool_input_deltas_count_as_completion() -> None:
    events = [
        e.replace(b"function_call_arguments.delta", b"custom_tool_call_input.delta")
        for e in function_call_stream()
    ]
    _, sink, _ = run(events)
    assert sink.totals == (len('{"city":"Paris"}'), 0)


def test_refusal_deltas_count_as_completion() -> None:
    tally, sink, _ = run(refusal_stream())
    assert sink.totals == (len("I can't help with that."), 0)
    assert tally.finish_reason == "stop"


def test_obfuscation_padding_is_never_counted() -> None:
    tally, sink, _ = run(LONG_PADDING)
    assert sink.totals == (2, 0)
    assert tally.estimated_completion == 2


def test_incomplete_for_max_output_tokens_finishes_with_length() -> None:
    tally, _, _ = run(INCOMPLETE)
    assert (tally.finish_reason, tally.completion_tokens, tally.upstream_error) == (
        "length",
        16,
        None,
    )


def test_incomplete_for_content_filter_finishes_with_content_filter() -> None:
    events = [
        e.replace(b'"max_output_tokens"}', b'"content_filter"}')
        if b"incomplete_details" in e
        else e
        for e in INCOMPLETE
    ]
    tally, _, _ = run(events)
    assert tally.finish_reason == "content_filter"


def test_failed_response_is_an_upstream_error_with_its_usage() -> None:
    tally, _, _ = run(failed_stream())
    assert tally.finish_reason == "error"
    assert tally.upstream_error == {
        "code": "server_error",
        "message": "The model failed to generate a response.",
    }
    assert (tally.usage_source, tally.completion_tokens) == ("upstream", 1)


def test_error_event_is_recorded_and_keeps_the_live_count() -> None:
    tally, sink, _ = run(error_event_stream())
    assert tally.finish_reason == "error"
    assert tally.upstream_error is not None
    assert tally.upstream_error["code"] == "rate_limit_exceeded"
    assert (tally.usage_source, sink.totals) == ("estimate", (4, 0))


def test_a_stream_cut_before_its_terminal_event_has_no_finish_and_our_count() -> None:
    tally, _, _ = run(CUT)
    assert (tally.finish_reasons, tally.saw_done, tally.upstream_error) == ((), False, None)
    assert (tally.usage_source, tally.completion_tokens) == ("estimate", len("Half an answer"))


def test_crlf_framing_counts_the_same() -> None:
    tally, _, _ = run(CRLF)
    assert (tally.estimated_completion, tally.completion_tokens, tally.finish_reason) == (
        11,
        2,
        "stop",
    )


def test_events_without_an_event_line_are_typed_by_their_json() -> None:
    bare = [
        b"\n".join(line for line in e.split(b"\n") if not line.startswith(b"event:")) for e in TEXT
    ]
    assert run(bare)[0] == run(TEXT)[0]


@pytest.mark.parametrize("name", SMALL)
def test_every_split_point_gives_the_same_tally(name: str) -> None:
    whole = body(CORPUS[name])
    expected, _, _ = run([whole])
    for cut in range(1, len(whole)):
        tally, _, _ = run([whole[:cut], whole[cut:]])
        assert tally == expected, cut


@pytest.mark.parametrize("name", SMALL)
def test_bytewise_feeding_gives_the_same_tally(name: str) -> None:
    whole = body(CORPUS[name])
    assert run([whole[i : i + 1] for i in range(len(whole))])[0] == run(CORPUS[name])[0]


def test_the_big_terminal_event_is_parsed_once_however_it_is_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[int] = []
    original = meter_module._Ledger.parse

    def parse(self: Any, data: bytes | bytearray) -> Any:
        parsed.append(len(data))
        return original(self, data)

    monkeypatch.setattr(meter_module._Ledger, "parse", parse)
    whole = body(BIG)
    tally, sink, _ = run([whole[i : i + 1024] for i in range(0, len(whole), 1024)])
    big = [n for n in parsed if n > 100_000]
    assert len(big) == 2  # response.created and response.completed, once each
    assert (tally.prompt_tokens, tally.cached_prompt_tokens, tally.completion_tokens) == (
        70000,
        65536,
        2,
    )
    assert sink.totals == (len("Short answer."), 0)


def test_an_event_past_the_size_cap_is_skipped_counted_and_the_rest_still_counts() -> None:
    whole = body(BIG)
    tally, sink, _ = run(
        [whole[i : i + 4096] for i in range(0, len(whole), 4096)], max_event_bytes=64 << 10
    )
    # response.created, response.in_progress and response.completed repeat the response
    assert (tally.oversized_events, tally.decode_errors) == (3, 3)
    assert sink.totals == (len("Short answer."), 0)  # the deltas between them still count
    assert (tally.usage_source, tally.finish_reason) == ("estimate", None)


def test_next_sequence_number_follows_the_last_event_seen() -> None:
    meter = ResponsesMeter(Letters(), Sink(), 0)
    for event in CUT:
        meter.feed(event)
    assert meter.next_sequence_number == len(CUT)
    meter.feed(b": keep-alive\n\n")  # a comment is no event
    assert meter.next_sequence_number == len(CUT)


# -- the event the gateway adds to end a Responses stream -------------------------------------


def test_the_responses_error_event_is_the_apis_error_event_with_an_error_object() -> None:
    error = UpstreamError("cut short", code="upstream_truncated", reason="truncated")
    raw = responses_error_event(error, 17)
    (event,) = SSEDecoder().feed(raw)
    assert event.event == "error"
    data = orjson.loads(event.data)
    assert data["type"] == "error" and data["sequence_number"] == 17
    assert (data["code"], data["message"]) == ("upstream_truncated", "cut short")
    assert data["error"] == error.body()["error"]  # what both SDKs raise on
    assert stream_error_event(error, True, 17) == raw
    assert stream_error_event(error, False).startswith(b'data: {"error":')


# -- whole answers (JsonMeter) ----------------------------------------------------------------


def json_tally(answer: dict[str, Any] | bytes) -> Tally:
    meter = JsonMeter(Letters(), 5)
    meter.feed(answer if isinstance(answer, bytes) else orjson.dumps(answer))
    return meter.finish()


def test_a_whole_response_takes_its_usage_and_cached_tokens() -> None:
    answer = response("completed", [message("Hi there")], used=usage(30, 2, cached=16, reasoning=1))
    tally = json_tally(answer)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.reasoning_tokens) == (30, 2, 1)
    assert (tally.cached_prompt_tokens, tally.usage_source, tally.finish_reason) == (
        16,
        "upstream",
        "stop",
    )
    assert (tally.estimated_completion, tally.response_id) == (len("Hi there"), RESPONSE_ID)


def test_a_whole_response_without_usage_is_counted_from_its_output() -> None:
    rs = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hmm"}]}
    call = {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}
    tally = json_tally(response("completed", [rs, message("ok"), call]))
    assert (tally.completion_tokens, tally.reasoning_tokens) == (len("hmm") + 2 + 2, 3)
    assert (tally.usage_source, tally.prompt_tokens, tally.finish_reason) == (
        "estimate",
        5,
        "tool_calls",
    )


def test_a_whole_incomplete_response_finishes_with_length() -> None:
    answer = response(
        "incomplete", [message("Once")], used=usage(3, 4),
        incomplete_details={"reason": "max_output_tokens"},
    )  # fmt: skip
    assert json_tally(answer).finish_reason == "length"


def test_completions_answer_takes_its_usage() -> None:
    answer = {
        "id": "cmpl-1", "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": "four words right here", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10},
    }  # fmt: skip
    tally = json_tally(answer)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.estimated_completion) == (
        6,
        4,
        len("four words right here"),
    )
    assert (tally.usage_source, tally.finish_reason) == ("upstream", "stop")


def test_embeddings_answer_takes_its_prompt_tokens_and_has_no_completion() -> None:
    answer = {
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }  # fmt: skip
    tally = json_tally(answer)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.usage_source) == (
        8,
        0,
        "upstream",
    )


def test_events_too_large_to_read_still_count_toward_the_next_sequence_number() -> None:
    meter = ResponsesMeter(Letters(), Sink(), 0, max_event_bytes=64 << 10)
    for event in BIG[:-1]:  # response.created and response.in_progress are too large to read
        meter.feed(event)
    assert meter.next_sequence_number == len(BIG) - 1
