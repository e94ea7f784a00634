"""Property tests: the request parser and the SSE side never fail on what they are sent.

* `parse_json` and `check_tail` answer any bytes with a value or a 400, nothing else;
* the SSE decoder and the stream meter take any bytes, split anywhere, and any JSON shaped
  like a chunk, without raising (an upstream's garbage must never crash accounting);
* a whole request with a random method, path, headers and body gets a success or an
  OpenAI-shaped error from the gateway, never a 500.

`bench/fuzz_atheris.py` runs the same targets under coverage-guided fuzzing, by hand.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.fuzz_atheris import request_target, sse_target
from gateway.errors import BadRequest
from gateway.meter import StreamMeter
from gateway.request_parse import check_tail, parse_json
from gateway.sse import SSEDecoder
from gateway.tokens import load_tokenizer

from .helpers import gateway, settled, sim_settings


def dumps(value: Any) -> bytes:
    """JSON text, big integers, NaN and lone surrogates included, as a sloppy upstream writes."""
    return json.dumps(value).encode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.binary(max_size=2048), st.booleans())
def test_parse_json_returns_an_object_or_none_or_raises_400(body: bytes, required: bool) -> None:
    try:
        doc = parse_json(body, required=required)
    except BadRequest:
        assert required  # only a body that must be an object is refused, with a 400
    else:
        assert doc is None or isinstance(doc, dict)
        assert doc is not None or not required


@given(st.text(max_size=64) | st.text(alphabet="./a\x00\x1f\x7f\t", max_size=12))
def test_check_tail_refuses_exactly_dot_segments_and_control_characters(tail: str) -> None:
    segments = tail.split("/")
    unsafe = ".." in segments or "." in segments
    unsafe = unsafe or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in tail)
    try:
        assert check_tail(tail) == tail
    except BadRequest:
        assert unsafe
    else:
        assert not unsafe


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0), max_size=12))
def test_the_sse_decoder_takes_any_bytes_split_anywhere(data: bytes, cuts: list[int]) -> None:
    decoder = SSEDecoder()
    frames = [frame for piece in splits(data, cuts) for frame in decoder.feed_frames(piece)]
    assert b"".join(raw for raw, _ in frames) + decoder.pending_raw == data
    decoder.flush()


class Sink:
    def __init__(self) -> None:
        self.completion = self.reasoning = 0

    def add(self, completion: int, reasoning: int) -> None:
        assert completion >= 0 and reasoning >= 0
        self.completion += completion
        self.reasoning += reasoning


def chunk_like() -> st.SearchStrategy[Any]:
    """Objects shaped like chat chunks, with any JSON where a field is expected."""
    call = JSON | st.fixed_dictionaries({}, optional={"arguments": JSON})
    delta = st.fixed_dictionaries(
        {},
        optional={
            "content": JSON | st.text(max_size=30),
            "reasoning_content": JSON,
            "tool_calls": st.lists(
                st.fixed_dictionaries({}, optional={"function": call}), max_size=3
            )
            | JSON,
            "function_call": JSON,
        },
    )
    choice = st.fixed_dictionaries(
        {},
        optional={
            "index": JSON,
            "delta": delta | JSON,
            "message": delta | JSON,
            "text": JSON,
            "finish_reason": JSON,
        },
    )
    return (
        st.fixed_dictionaries(
            {},
            optional={
                "choices": st.lists(choice | JSON, max_size=3) | JSON,
                "usage": st.fixed_dictionaries(
                    {}, optional={"prompt_tokens": JSON, "completion_tokens": JSON}
                )
                | JSON,
                "error": JSON,
            },
        )
        | JSON
    )


@given(
    st.lists(chunk_like() | st.binary(max_size=64), max_size=10),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_the_stream_meter_never_raises_on_what_an_upstream_sends(
    events: list[Any], cuts: list[int]
) -> None:
    body = b"".join(
        b"data: " + (e.replace(b"\n", b" ") if isinstance(e, bytes) else dumps(e)) + b"\n\n"
        for e in events
    )
    sink = Sink()
    meter = StreamMeter(load_tokenizer("chars"), sink, prompt_estimate=3)
    for piece in splits(body, cuts):
        meter.feed(piece)
    tally = meter.finish()
    assert tally.estimated_completion == sink.completion
    assert min(tally.completion_tokens, tally.reasoning_tokens, tally.decode_errors) >= 0


# -- whole requests ---------------------------------------------------------------------------

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40) | (
    st.sampled_from(["gzip", "deflate", "br", "application/json", "text/event-stream", "{}"])
)
HEADERS = st.dictionaries(
    st.sampled_from(
        ["X-Sim", "Content-Type", "Content-Encoding", "Accept", "X-Request-Id", "Authorization"]
    )
    | TOKEN.map(lambda name: "X-" + name),
    HEADER_VALUE,
    max_size=4,
)
TAILS = st.sampled_from(["chat/completions", "completions", "embeddings", "models"]) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"), max_size=20
)
MODEL = st.sampled_from(["sim-1", "sim-", "nope"]) | JSON
BODY = (
    st.binary(max_size=256)
    | JSON.map(dumps)
    | st.fixed_dictionaries(
        {"model": MODEL},
        optional={"stream": JSON, "messages": JSON, "max_tokens": JSON, "stream_options": JSON},
    ).map(dumps)
)


def parser_refused(headers: dict[str, str], resp: aiohttp.ClientResponse) -> bool:
    """aiohttp's HTTP parser answers a body it cannot decode (an unsupported or broken
    Content-Encoding) with its own plain-text 400, before the application sees a request."""
    encoded = any(name.lower() == "content-encoding" for name in headers)
    return encoded and resp.status == 400 and resp.content_type == "text/plain"


REQUEST = st.tuples(st.sampled_from(["POST", "GET", "PUT", "DELETE"]), TAILS, HEADERS, BODY)


@settings(
    max_examples=10,
    deadline=None,
    # each example is a fresh gateway and 30 requests: no shrinking, the failing list is printed
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(REQUEST, min_size=30, max_size=30))
async def test_any_request_gets_a_success_or_an_openai_shaped_error_never_a_500(
    requests: list[tuple[str, str, dict[str, str], bytes]],
) -> None:
    async with gateway(sim_settings()) as gw, aiohttp.ClientSession() as session:
        for method, tail, headers, body in requests:
            async with session.request(
                method, f"{gw.base_url}/{tail}", data=body, headers=headers
            ) as resp:
                answer = await resp.read()
            seen = (method, tail, headers, body, resp.status, answer[:300])
            assert resp.status < 500 or resp.status in (502, 503, 504), seen
            if resp.status >= 400 and not parser_refused(headers, resp):
                error = orjson.loads(answer)["error"]
                assert isinstance(error["message"], str) and "type" in error, seen
        await settled(gw)


@given(st.binary(max_size=512))
def test_the_atheris_targets_accept_what_hypothesis_throws_at_them(data: bytes) -> None:
    """bench/fuzz_atheris.py runs by hand; this keeps its targets from rotting."""
    sse_target(data)
    request_target(data)
