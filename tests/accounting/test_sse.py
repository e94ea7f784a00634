"""The SSE decoder: the same events however the network splits the bytes.

A small reference parser, written straight from the WHATWG text over the whole buffer,
pins what the events must be; the incremental decoder must agree with it for every split.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import ServerSentEvent, SSEDecoder
from tests.accounting.streams import CORPUS

_LINE_END = re.compile(rb"\r\n|\r|\n")


def reference_events(stream: bytes) -> list[ServerSentEvent]:
    """The events of a whole body, per the spec, plus the decoder's lenient end of stream."""
    stream = stream.removeprefix(b"\xef\xbb\xbf")
    *lines, tail = _LINE_END.split(stream)
    events: list[ServerSentEvent] = []
    fields: dict[str, object] = {"data": [], "event": None, "retry": None, "id": None}
    for line in [*lines, tail] if tail else lines:
        if line:
            _reference_field(fields, line)
        else:
            _reference_dispatch(fields, events)
    _reference_dispatch(fields, events)  # lenient: an event cut short by the end still counts
    return events


def _reference_field(fields: dict[str, object], line: bytes) -> None:
    if line.startswith(b":"):
        return
    name, _, value = line.partition(b":")
    value = value[1:] if value.startswith(b" ") else value
    data = fields["data"]
    assert isinstance(data, list)
    if name == b"data":
        data.append(value)
    elif name == b"event":
        fields["event"] = value.decode()
    elif name == b"id" and b"\x00" not in value:
        fields["id"] = value.decode()
    elif name == b"retry" and re.fullmatch(rb"[0-9]+", value):
        fields["retry"] = int(value)


def _reference_dispatch(fields: dict[str, object], events: list[ServerSentEvent]) -> None:
    data, event, retry, last_id = fields["data"], fields["event"], fields["retry"], fields["id"]
    assert isinstance(data, list)
    assert event is None or isinstance(event, str)
    assert retry is None or isinstance(retry, int)
    assert last_id is None or isinstance(last_id, str)
    if data:
        events.append(ServerSentEvent(event, b"\n".join(data), last_id, retry))
    fields.update(data=[], event=None, retry=None)


def decode_in_pieces(stream: bytes, cuts: list[int]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for piece in _pieces(stream, cuts):
        events += decoder.feed(piece)
    return events + decoder.flush()


def _pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# -- generated streams -------------------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12
)
_end = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["data", "data", "data", "event", "id", "retry", "comment", "x"]))
    value = draw(_text).encode()
    if kind == "comment":
        return b":" + value
    if kind == "retry":
        value = draw(st.sampled_from([b"1500", b"0", b"12a", b""]))
    if kind == "id" and draw(st.booleans()):
        value += b"\x00"
    sep = draw(st.sampled_from([b": ", b":", b":  "]))
    return kind.encode() + sep + value


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Events of a few lines each, mixed line ends, maybe a BOM, maybe no final newline."""
    out = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    for lines in draw(st.lists(st.lists(_line(), max_size=4), max_size=5)):
        for line in lines:
            out += [line, draw(_end)]
        out.append(draw(_end))
    stream = b"".join(out)
    if draw(st.booleans()):
        stream = stream.rstrip(b"\r\n")
    return stream


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = draw(st.one_of(sse_streams(), st.sampled_from(list(CORPUS.values()))))
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, cuts


# -- the property ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(split_streams())
def test_any_split_yields_the_events_of_the_whole_body(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    assert decode_in_pieces(stream, cuts) == reference_events(stream)


@settings(max_examples=300, deadline=None)
@given(split_streams())
def test_frames_reassemble_the_input_byte_for_byte(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    decoder = SSEDecoder()
    raw, events = [], []
    for piece in _pieces(stream, cuts):
        for frame, event in decoder.feed_frames(piece):
            raw.append(frame)
            events += [event] if event is not None else []
    assert b"".join(raw) + decoder.pending_raw == stream
    assert events + decoder.flush() == reference_events(stream)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_split_at_every_byte_and_fed_bytewise(name: str) -> None:
    stream = CORPUS[name]
    whole = reference_events(stream)
    for cut in range(len(stream) + 1):
        assert decode_in_pieces(stream, [cut]) == whole, cut
    assert decode_in_pieces(stream, list(range(len(stream)))) == whole


# -- what the events hold ----------------------------------------------------------------------


def test_fields_comments_and_multiline_data_follow_the_spec() -> None:
    events = SSEDecoder().feed(CORPUS["spec_fields"])
    assert events == [
        ServerSentEvent("message", b"first line\nsecond", "41", 3000),
        ServerSentEvent("error", b'{"error": {"message": "overloaded", "code": 529}}', "42", None),
        ServerSentEvent(None, b"no-space\n two spaces", "42", None),
    ]


def test_one_complete_event_per_chunk_decodes_on_its_own() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]\n\n") == [ServerSentEvent(None, b"[DONE]", None, None)]
    assert decoder.feed(b'data:{"a":1}\n\n') == [ServerSentEvent(None, b'{"a":1}', None, None)]
    assert decoder.pending_raw == b""


def test_the_one_event_shortcut_takes_a_lone_cr_as_the_line_end_it_is() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: first\n\n")  # the stream's start is behind: shortcut on
    assert decoder.whole_event_data(b"data: a b\n\n") == b"a b"
    chunk = b"data: a\rdata: b\n\n"  # two data lines, the first ended by CR alone
    assert decoder.whole_event_data(chunk) is None  # not one plain line: the general path
    assert decoder.feed(chunk) == [ServerSentEvent(None, b"a\nb", None, None)]


def test_utf8_character_split_across_chunks_stays_whole() -> None:
    snowman = "data: ☃\n\n".encode()
    decoder = SSEDecoder()
    assert decoder.feed(snowman[:7]) == []
    assert decoder.feed(snowman[7:]) == [ServerSentEvent(None, "☃".encode(), None, None)]


def test_cr_ending_a_chunk_and_lf_starting_the_next_are_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # not a blank line: it completes the CRLF
    assert decoder.feed(b"\r") == [ServerSentEvent(None, b"a", None, None)]
    assert decoder.feed(b"\ndata: b\n\n") == [ServerSentEvent(None, b"b", None, None)]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    frames = decoder.feed_frames(b": keep-alive\n\nevent: ping\nid: 1\n\n\n")
    assert frames == [(b": keep-alive\n\n", None), (b"event: ping\nid: 1\n\n", None), (b"\n", None)]
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent(None, b"x", "1", None)]


def test_flush_dispatches_an_event_missing_its_final_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.pending_raw == b"data: [DONE]"
    assert decoder.flush() == [ServerSentEvent(None, b"[DONE]", None, None)]
    assert decoder.flush() == []


def test_flush_of_a_partial_event_without_data_yields_nothing() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"event: x\n: note")
    assert decoder.flush() == []


def test_frames_keep_the_crlf_of_a_frame_split_after_its_cr() -> None:
    decoder = SSEDecoder()
    first = decoder.feed_frames(b"data: a\r\n\r")
    assert first == [(b"data: a\r\n\r", ServerSentEvent(None, b"a", None, None))]
    second = decoder.feed_frames(b"\ndata: b\r\n\r\n")
    assert second == [(b"\ndata: b\r\n\r\n", ServerSentEvent(None, b"b", None, None))]


# -- the typed-event shortcut, the size cap, long events in many reads -------------------------


@pytest.mark.parametrize(
    "chunk",
    [
        b'event: response.output_text.delta\ndata: {"delta":"hi"}\n\n',
        b"event:x\ndata:y\n\n",
        b"event: a\ndata: \n\n",
        b"event: a\ndata: one\ndata: two\n\n",  # two data lines: not the shortcut's shape
        b"event: a\r\ndata: b\r\n\r\n",
        b"event: a\nid: 3\ndata: b\n\n",
        b"event: a\n\n",
    ],
)
def test_the_typed_event_shortcut_agrees_with_the_general_path(chunk: bytes) -> None:
    decoder = SSEDecoder()
    decoder.feed(b": warm up\n\n")  # the shortcut needs a settled start (BOM question)
    typed = decoder.whole_typed_event(chunk)
    expected = [(e.event, e.data) for e in reference_events(chunk)]
    if typed is not None:  # (else not its shape: the general path takes it)
        assert [(typed[0].decode(), typed[1])] == expected


def test_the_typed_event_shortcut_needs_a_settled_start() -> None:
    assert SSEDecoder().whole_typed_event(b"event: a\ndata: b\n\n") is None


def test_a_frame_past_the_cap_is_dropped_and_decoding_resumes_after_it() -> None:
    big = b"event: big\ndata: " + b"x" * 5000 + b"\n\n"
    stream = b"data: 1\n\n" + big + b"data: 2\r\n\r\n" + big.replace(b"\n", b"\r") + b"data: 3\n\n"
    for step in (1, 7, 100, 4096, len(stream)):
        decoder = SSEDecoder(max_event_bytes=1000)
        events = [
            e for i in range(0, len(stream), step) for e in decoder.feed(stream[i : i + step])
        ]
        events += decoder.flush()
        assert [e.data for e in events] == [b"1", b"2", b"3"], step
        assert decoder.oversized == 2, step


def test_a_long_line_in_many_reads_is_joined_once() -> None:
    """The pieces of a partial line are kept as they came, not copied into one buffer per read
    (which made a 512 KiB event in 1 KiB reads cost 256 MiB of copies)."""
    line = b"data: " + b"y" * (512 << 10)
    decoder = SSEDecoder()
    for i in range(0, len(line), 1024):
        assert decoder.feed(line[i : i + 1024]) == []
    assert len(decoder._partial) == len(range(0, len(line), 1024))
    (event,) = decoder.feed(b"\n\n")
    assert event.data == line[6:]
