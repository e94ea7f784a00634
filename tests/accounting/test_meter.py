"""Stream and JSON meters: what counts as completion and reasoning, and the final tally.

Most tests count with `Letters`, one token per character: it is additive, so the exact
totals do not depend on how a text was split into chunks, and the numbers read off the
test strings directly.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.meter import JsonMeter, StreamMeter, Tally
from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.tokens import load_tokenizer
from tests.accounting.streams import DONE, OPENAI_CHAT, VLLM_REASONING, chunk, delta


class Letters:
    name = "letters"

    def count(self, text: str) -> int:
        return len(text)


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def add(self, completion: int, reasoning: int) -> None:
        self.calls.append((completion, reasoning))

    @property
    def totals(self) -> tuple[int, int]:
        return sum(c for c, _ in self.calls), sum(r for _, r in self.calls)


def meter(prompt_estimate: int = 7) -> tuple[StreamMeter, Sink]:
    sink = Sink()
    return StreamMeter(Letters(), sink, prompt_estimate), sink


def run(*chunks: bytes) -> tuple[Tally, Sink]:
    stream, sink = meter()
    for piece in chunks:
        stream.feed(piece)
    tally = stream.finish()
    assert sink.totals[0] == tally.estimated_completion  # the sink saw every counted token
    return tally, sink


def content(*pieces: str, index: int = 0) -> list[bytes]:
    return [chunk(delta(index, content=piece)) for piece in pieces]


# -- completion and reasoning ------------------------------------------------------------------


def test_content_counts_as_completion_with_a_sink_call_per_feed() -> None:
    tally, sink = run(*content("Hello", " world"), DONE)
    assert sink.calls == [(5, 0), (6, 0)]
    assert (tally.completion_tokens, tally.reasoning_tokens, tally.chunks) == (11, 0, 2)
    assert (tally.usage_source, tally.prompt_tokens, tally.saw_done) == ("estimate", 7, True)


def test_events_without_tokens_do_not_call_the_sink() -> None:
    _, sink = run(chunk(delta(role="assistant", content="")), b": ping\n\n", DONE)
    assert sink.calls == []


def test_several_events_in_one_chunk_make_one_sink_call() -> None:
    _, sink = run(b"".join(content("ab", "cd", "ef")))
    assert sink.calls == [(6, 0)]


def test_reasoning_content_counts_as_reasoning_and_completion() -> None:
    tally, sink = run(
        chunk(delta(reasoning_content="think")), chunk(delta(reasoning="more")), *content("ok")
    )
    assert sink.calls == [(5, 5), (4, 4), (2, 0)]
    assert (tally.completion_tokens, tally.reasoning_tokens) == (11, 9)


def test_think_tags_split_across_chunks_count_as_reasoning() -> None:
    tally, sink = run(*content("<th", "ink>abc</", "think>", "Answer"))
    assert sink.calls == [(10, 10), (8, 8), (6, 0)]  # `</` waited for `think>`
    assert (tally.completion_tokens, tally.reasoning_tokens) == (
        len("<think>abc</think>Answer"),
        18,
    )


def test_a_close_tag_without_open_tag_makes_the_earlier_text_reasoning() -> None:
    # Chat templates that put <think> in the prompt stream only the closing tag.
    tally, sink = run(*content("plan", "ning</think>", "Answer"))
    assert sink.calls == [(4, 0), (12, 16), (6, 0)]
    assert (tally.completion_tokens, tally.reasoning_tokens) == (22, 16)


def test_text_held_as_a_possible_tag_is_counted_at_the_end() -> None:
    tally, sink = run(*content("a <", "b", "<thin"))
    assert sink.calls == [(2, 0), (2, 0), (5, 0)]  # the last call comes from finish()
    assert tally.completion_tokens == 9


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_think_split_anywhere_gives_the_same_totals(data: st.DataObject) -> None:
    text = "pre <b> <think>why < because</think> so </think> <think"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    tally, _ = run(*content(*(text[a:b] for a, b in itertools.pairwise(bounds))))
    assert tally.completion_tokens == len(text)
    assert tally.reasoning_tokens == len("<think>why < because</think>")


def test_choices_are_counted_separately_with_their_own_think_state() -> None:
    tally, _ = run(
        chunk(delta(0, content="<think>x"), delta(1, content="plain <th")),
        chunk(delta(1, content="ink>y</think>"), delta(0, content="</think>z")),
        chunk(delta(0, finish_reason="stop"), delta(1, finish_reason="length")),
    )
    assert tally.reasoning_tokens == len("<think>x</think>") + len("<think>y</think>")
    assert tally.completion_tokens == len("<think>x</think>z") + len("plain <think>y</think>")
    assert (tally.finish_reason, tally.finish_reasons) == ("stop", ("stop", "length"))


def test_tool_call_arguments_and_completions_text_count_as_completion() -> None:
    call = {"index": 0, "id": "c1", "type": "function"}
    tally, _ = run(
        chunk(delta(tool_calls=[{**call, "function": {"name": "f", "arguments": '{"a":'}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}])),
        chunk({"index": 0, "text": "legacy", "finish_reason": None}),
    )
    assert tally.completion_tokens == len('{"a":1}') + len("legacy")
    assert tally.chunks == 3


def test_bpe_tokenizer_counts_each_piece() -> None:
    sink = Sink()
    stream = StreamMeter(load_tokenizer("o200k_base"), sink, 0)
    for piece in content("hello", " world"):
        stream.feed(piece)
    assert stream.finish().completion_tokens == 2


# -- usage, errors, end of stream --------------------------------------------------------------


def test_upstream_usage_becomes_the_tally_and_ours_is_kept_as_estimate() -> None:
    tally, _ = run(OPENAI_CHAT)
    assert (tally.prompt_tokens, tally.completion_tokens) == (9, 3)
    assert tally.usage_source == "upstream"
    assert tally.estimated_completion == len("Hello wörld ☃")
    assert (tally.finish_reason, tally.saw_done, tally.chunks) == ("stop", True, 2)


def test_usage_on_a_chunk_that_also_has_choices_counts_those_choices() -> None:
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 40,
        "completion_tokens_details": {"reasoning_tokens": 30},
    }
    tally, sink = run(
        *content("abc"), chunk(delta(content="de", finish_reason="stop"), usage=usage)
    )
    assert sink.calls == [(3, 0), (2, 0)]
    assert (tally.prompt_tokens, tally.completion_tokens, tally.reasoning_tokens) == (5, 40, 30)
    assert (tally.estimated_completion, tally.chunks) == (5, 2)


def test_usage_without_reasoning_details_keeps_our_reasoning_count() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 9}
    tally, _ = run(chunk(delta(reasoning_content="hmm")), chunk(usage=usage))
    assert (tally.completion_tokens, tally.reasoning_tokens) == (9, 3)


def test_null_usage_on_every_chunk_is_not_upstream_usage() -> None:
    tally, _ = run(chunk(delta(content="abc")).replace(b'"choices"', b'"usage":null,"choices"'))
    assert (tally.usage_source, tally.completion_tokens) == ("estimate", 3)


def test_invalid_json_is_counted_and_the_stream_goes_on() -> None:
    tally, _ = run(*content("ab"), b"data: {not json\n\n", b"data: \n\n", *content("cd"), DONE)
    assert (tally.decode_errors, tally.completion_tokens, tally.saw_done) == (2, 4, True)


def test_an_error_event_is_recorded() -> None:
    error = b'event: error\ndata: {"error": {"message": "overloaded", "code": 529}}\n\n'
    tally, _ = run(*content("ab"), error)
    assert tally.upstream_error == {"message": "overloaded", "code": 529}
    assert (tally.saw_done, tally.completion_tokens) == (False, 2)


def test_stream_split_anywhere_gives_the_same_tally() -> None:
    whole, _ = run(VLLM_REASONING)
    assert (whole.completion_tokens, whole.reasoning_tokens) == (15, 13)
    for cut in range(len(VLLM_REASONING) + 1):
        split, _ = run(VLLM_REASONING[:cut], VLLM_REASONING[cut:])
        assert split == whole, cut


def test_last_event_without_final_newline_still_counts() -> None:
    tally, _ = run(*content("abc"), b"data: [DONE]")
    assert (tally.completion_tokens, tally.saw_done) == (3, True)


# -- usage: inject -----------------------------------------------------------------------------


def frames_through_meter(body: bytes) -> tuple[bytes, Tally]:
    """What the relay does in inject mode: decode frames, feed events, drop usage-only."""
    stream, _ = meter()
    decoder, written = SSEDecoder(), []
    for raw, event in decoder.feed_frames(body):
        if event is not None:
            stream.feed_event(event)
            if stream.is_usage_only(event):
                continue
        written.append(raw)
    return b"".join(written), stream.finish()


def test_inject_mode_drops_only_the_usage_only_event_and_keeps_its_numbers() -> None:
    written, tally = frames_through_meter(OPENAI_CHAT)
    usage_event = chunk(usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    assert written == OPENAI_CHAT.replace(usage_event, b"")
    assert (tally.usage_source, tally.completion_tokens, tally.saw_done) == ("upstream", 3, True)


@pytest.mark.parametrize(
    ("data", "usage_only"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":1}}', True),
        (b'{"usage":{"prompt_tokens":1}}', True),
        (b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}', False),
        (b'{"choices":[],"usage":null}', False),
        (b"[DONE]", False),
        (b'{"usage": oops', False),
    ],
)
def test_is_usage_only(data: bytes, usage_only: bool) -> None:
    stream, _ = meter()
    assert stream.is_usage_only(ServerSentEvent(None, data, None, None)) is usage_only


def test_an_event_checked_and_fed_is_parsed_once() -> None:
    stream, _ = meter()
    bad = ServerSentEvent(None, b'{"usage": oops', None, None)
    stream.is_usage_only(bad)
    stream.feed_event(bad)
    assert stream.finish().decode_errors == 1


# -- non-streamed answers ----------------------------------------------------------------------


def answer(**fields: Any) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", **fields})


def json_tally(body: bytes, max_bytes: int = 1 << 20) -> Tally:
    json_meter = JsonMeter(Letters(), 7, max_bytes=max_bytes)
    for i in range(0, len(body), 10):
        json_meter.feed(body[i : i + 10])
    return json_meter.finish()


def test_json_answer_with_usage_takes_the_upstreams_numbers() -> None:
    message = {"role": "assistant", "content": "hello"}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    tally = json_tally(answer(choices=[choice], usage=usage))
    assert (tally.prompt_tokens, tally.completion_tokens, tally.usage_source) == (3, 2, "upstream")
    assert (tally.estimated_completion, tally.finish_reason) == (5, "stop")


def test_json_answer_without_usage_is_counted_from_its_choices() -> None:
    choices = [
        {
            "index": 0,
            "message": {"content": "<think>ab</think>cd", "reasoning_content": "ef"},
            "finish_reason": "stop",
        },
        {"index": 1, "text": "gh", "finish_reason": "length"},
    ]
    tally = json_tally(answer(choices=choices))
    assert tally.usage_source == "estimate"
    assert tally.prompt_tokens == 7
    assert tally.completion_tokens == len("<think>ab</think>cd") + 2 + 2
    assert tally.reasoning_tokens == len("<think>ab</think>") + 2
    assert tally.finish_reasons == ("stop", "length")


def test_both_meters_give_the_same_tally_when_asked_again() -> None:
    """The end of a request asks for the tally more than once (cut-short check, error-event
    check, settlement): nothing may be counted twice."""
    json_meter = JsonMeter(Letters(), 7)
    json_meter.feed(answer(choices=[{"index": 0, "message": {"content": "hello"}}]))
    stream, _ = meter()
    stream.feed(OPENAI_CHAT)
    for m in (json_meter, stream):
        first = m.finish()
        assert m.finish() == first
        assert first.completion_tokens > 0


def test_json_answer_larger_than_the_copy_limit_is_not_counted() -> None:
    choice = {"index": 0, "message": {"content": "x" * 100}}
    tally = json_tally(answer(choices=[choice]), max_bytes=50)
    assert (tally.completion_tokens, tally.decode_errors, tally.usage_source) == (0, 0, "estimate")


def test_json_error_body_and_invalid_body() -> None:
    assert json_tally(b'{"error": {"message": "nope"}}').upstream_error == {"message": "nope"}
    assert json_tally(b"<html>bad gateway</html>").decode_errors == 1
