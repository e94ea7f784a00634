"""The bench's stream: OpenAI-shaped chat chunks, built once and shared by both ends.

The upstream and the load generator derive the same bytes from the same few parameters, so the
load generator can check every relayed stream byte for byte without the upstream telling it
what it sent. Everything is pre-serialised: neither end may spend its CPU on JSON while it is
supposed to be measuring someone else's.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import orjson

MODEL = "bench-1"
DONE = b"data: [DONE]\n\n"

# Common English words with their leading space, as a BPE tokenizer sees model output; each is
# one token in o200k_base, so a counting gateway does realistic work per chunk.
_WORDS = (
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and",
    " then", " it", " runs", " into", " the", " forest", " where", " nobody", " can", " see",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What one bench stream looks like: how many SSE events and how far apart.

    `events` counts every SSE event, including the role chunk, the finish chunk and
    `data: [DONE]`, because each of them is one write upstream and one relay downstream.
    """

    events: int
    delay_ms: float

    def __post_init__(self) -> None:
        if self.events < 3:
            raise ValueError("a bench stream needs at least 3 events (role, finish, [DONE])")
        if self.delay_ms < 0:
            raise ValueError("delay_ms cannot be negative")


def _chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
    """One `chat.completion.chunk` event, shaped as OpenAI sends it."""
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@functools.cache
def sse_events(events: int) -> tuple[bytes, ...]:
    """The SSE events of a stream of `events` events, in order, each a complete event."""
    body = [_chunk({"role": "assistant", "content": ""}, None)]
    body += [_chunk({"content": _WORDS[i % len(_WORDS)]}, None) for i in range(events - 3)]
    body += [_chunk({}, "stop"), DONE]
    return tuple(body)


@functools.cache
def chunked_frames(events: int) -> tuple[bytes, ...]:
    """Each event as one HTTP/1.1 chunk, ready for its own `transport.write`."""
    return tuple(b"%x\r\n%s\r\n" % (len(e), e) for e in sse_events(events))


LAST_CHUNK = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ExpectedBody:
    """The de-chunked body a client must receive, with where each event ends.

    The event ends let the load generator count relayed events from a byte offset alone.
    """

    body: bytes
    ends: tuple[int, ...]

    def events_before(self, offset: int) -> int:
        """How many events are complete once `offset` bytes have arrived."""
        return bisect.bisect_right(self.ends, offset)


@functools.cache
def expected_body(events: int) -> ExpectedBody:
    """The body and event ends of a stream of `events` events (cached: shared by all streams)."""
    parts = sse_events(events)
    ends: list[int] = []
    total = 0
    for part in parts:
        total += len(part)
        ends.append(total)
    return ExpectedBody(b"".join(parts), tuple(ends))


def request_body(spec: StreamSpec) -> bytes:
    """The chat request a load generator sends; `bench` tells the upstream what to stream.

    The `bench` field is an unknown field to a gateway, which must pass it through untouched.
    """
    return orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about the quick brown fox."}],
            "bench": {"events": spec.events, "delay_ms": spec.delay_ms},
        }
    )


def parse_request_body(body: bytes) -> StreamSpec:
    """The stream a request asks for; a request without `bench` gets a short default stream."""
    params = orjson.loads(body).get("bench") or {}
    return StreamSpec(int(params.get("events", 20)), float(params.get("delay_ms", 0.0)))
