"""Plain text chunks counted by their template give exactly what the full JSON parse gives.

A stream meter learns the bytes around the text of a plain text chunk and counts later chunks
made of the same bytes without parsing them. Streams built from chunks that match, nearly
match or do not match that template at all are counted with and without templates: every
field of the tally must be the same.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.meter import StreamMeter, Tally, _Ledger
from gateway.tokens import load_tokenizer
from tests.accounting.streams import DONE, chunk, delta


class Sink:
    def __init__(self) -> None:
        self.completion = self.reasoning = 0

    def add(self, completion: int, reasoning: int) -> None:
        self.completion += completion
        self.reasoning += reasoning


PLAIN = chunk(delta(content="Hello"))
PREFIX, _, SUFFIX = PLAIN.partition(b"Hello")

TEXTS = st.sampled_from(
    ["a", " the", "", "wörld ☃", "東京", "<think>", "</think>", "<thi", "nk>", "say \"hi\"",
     "back\\slash", "line\nbreak", "tab\t", "\u2028", "x" * 40, "\x7f", "🙂"]
)  # fmt: skip


def raw(prefix: bytes, middle: bytes, suffix: bytes) -> bytes:
    return prefix + middle + suffix


#: chunks of many kinds: the template's own shape with other texts, and everything else
CHUNKS = st.one_of(
    TEXTS.map(lambda text: chunk(delta(content=text))),
    TEXTS.map(lambda text: chunk(delta(index=1, content=text))),
    TEXTS.map(lambda text: chunk(delta(content=text), created=1700000001)),
    TEXTS.map(lambda text: chunk(delta(content=text), usage=None)),
    TEXTS.map(lambda text: chunk(delta(content=text, role="assistant"))),
    TEXTS.map(lambda text: chunk(delta(reasoning_content=text))),
    TEXTS.map(lambda text: chunk(delta(content=text), delta(index=1, content=text))),
    TEXTS.map(lambda text: chunk(delta(content=text, finish_reason="stop"))),
    st.just(chunk(delta(finish_reason="length"))),
    st.just(chunk(usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})),
    st.just(chunk(delta(content="x"), error={"message": "boom"})),
    # the template's bytes around what no JSON string may hold as it is
    st.sampled_from([b'a"b', b"a\\b", b"\x01", b"\xff", b"\xc3", b'\\"', b""]).map(
        lambda middle: b"data: " + raw(PREFIX[6:], middle, SUFFIX)
    ),
    st.just(b"data: " + PREFIX[6:] + b"tail cut off\n\n"),
    st.just(DONE),
)


def count(stream: list[bytes], tokenizer: Any, *, templates: bool) -> tuple[Tally, int, int]:
    sink = Sink()
    meter = StreamMeter(tokenizer, sink, 4, templates=templates)
    for piece in stream:
        meter.feed(piece)
    return meter.finish(), sink.completion, sink.reasoning


@pytest.mark.parametrize("tokenizer", ["o200k_base", "chars"])
@settings(max_examples=300, deadline=None)
@given(stream=st.lists(CHUNKS, max_size=30))
def test_templates_change_no_count(tokenizer: str, stream: list[bytes]) -> None:
    loaded = load_tokenizer(tokenizer)
    stream = [PLAIN, *stream]  # the first plain chunk teaches the template
    assert count(stream, loaded, templates=True) == count(stream, loaded, templates=False)


def test_plain_text_chunks_after_the_first_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    parse = _Ledger.parse

    def counting(self: _Ledger, data: bytes) -> Any:
        parsed.append(bytes(data))
        return parse(self, data)

    monkeypatch.setattr(_Ledger, "parse", counting)
    texts = ["Hello", " wörld", " 東京", ' "quoted"', " again"]
    stream = [chunk(delta(content=text)) for text in texts] + [
        chunk(delta(finish_reason="stop")),
        DONE,
    ]
    sink = Sink()
    meter = StreamMeter(load_tokenizer("chars"), sink, 0)
    for piece in stream:
        meter.feed(piece)
    tally = meter.finish()
    assert [orjson.loads(p)["choices"][0]["delta"] for p in parsed[:2]] == [
        {"content": "Hello"},
        {"content": ' "quoted"'},  # escaped in the JSON: the full path
    ]
    assert len(parsed) == 3  # and the finish chunk; DONE is not JSON and never parsed
    assert tally.chunks == 5
    assert tally.finish_reason == "stop" and tally.saw_done
    assert sink.completion == tally.completion_tokens == sum(-(-len(t) // 4) for t in texts)
