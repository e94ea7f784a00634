"""The bench's streams: OpenAI-shaped chat chunks or Responses API events, built once and shared
by both ends.

The upstream and the load generator derive the same bytes from the same few parameters, so the
load generator can check every relayed stream byte for byte without the upstream telling it
what it sent. Everything is pre-serialised: neither end may spend its CPU on JSON while it is
supposed to be measuring someone else's.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any, Literal

import orjson

MODEL = "bench-1"
DONE = b"data: [DONE]\n\n"

#: which API a bench stream speaks: chat chunks, or the Responses API's typed events
Api = Literal["chat", "responses"]
APIS: tuple[Api, ...] = ("chat", "responses")
#: the request path of each API
PATHS: dict[Api, str] = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
#: the events of a stream that carry no text: chat's role, finish and [DONE]; Responses'
#: created, in_progress, item and part added, text done, part done, item done, completed
FRAME_EVENTS: dict[Api, int] = {"chat": 3, "responses": 8}

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
    api: Api = "chat"

    def __post_init__(self) -> None:
        if self.events < FRAME_EVENTS[self.api]:
            frames = FRAME_EVENTS[self.api]
            raise ValueError(f"a bench {self.api} stream needs at least {frames} events")
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
def sse_events(events: int, api: Api = "chat") -> tuple[bytes, ...]:
    """The SSE events of a stream of `events` events, in order, each a complete event."""
    if api == "responses":
        return _responses_events(events)
    body = [_chunk({"role": "assistant", "content": ""}, None)]
    body += [_chunk({"content": _WORDS[i % len(_WORDS)]}, None) for i in range(events - 3)]
    body += [_chunk({}, "stop"), DONE]
    return tuple(body)


# What an agent sends with every Responses request, and OpenAI repeats in `response.created`
# and in the terminal event: a system prompt of a couple of kilobytes and a few tools.
INSTRUCTIONS = (
    "You are the assistant of an online bookshop. Answer in at most three sentences, in the"
    " customer's language. Use the tools to look up titles, stock and orders; never invent a"
    " price, a delivery date or an order number. If a question is not about books, orders or"
    " the shop, say politely that you can only help with those. "
) * 6
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What the customer asked for"},
                "limit": {"type": "integer", "description": "How many results at most"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        "strict": True,
    }
    for name, description in (
        ("search_catalogue", "Search the catalogue by title, author or subject."),
        ("check_stock", "How many copies of a title each warehouse holds."),
        ("find_order", "An order's items, status and expected delivery date."),
    )
]
#: ids as long as OpenAI's
RESPONSE_ID = "resp_" + "0bench" * 8
ITEM_ID = "msg_" + "0bench" * 8
#: the padding OpenAI adds to each delta (`obfuscation`): a delta and its padding are about
#: this long together
_PADDING = "Kq3ZxT9vLm2RpW7c"


def _responses_events(events: int) -> tuple[bytes, ...]:
    """A Responses stream as OpenAI sends it: `event:` and `data:` lines, numbered, no [DONE]."""
    words = [_WORDS[i % len(_WORDS)] for i in range(events - FRAME_EVENTS["responses"])]
    text = "".join(words)
    at = {"item_id": ITEM_ID, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": ITEM_ID, "type": "message", "status": "completed", "role": "assistant"}
    usage = {
        "input_tokens": 412, "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 412 + len(words),
    }  # fmt: skip
    done = {**item, "content": [part]}
    deltas = [
        {**at, "delta": w, "logprobs": [], "obfuscation": _PADDING[: max(1, 16 - len(w))]}
        for w in words
    ]
    body: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response("in_progress", [], None)}),
        ("response.in_progress", {"response": _response("in_progress", [], None)}),
        ("response.output_item.added",
         {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {**at, "part": {**part, "text": ""}}),
        *(("response.output_text.delta", delta) for delta in deltas),
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": done}),
        ("response.completed", {"response": _response("completed", [done], usage)}),
    ]  # fmt: skip
    return tuple(
        b"event: %s\ndata: %s\n\n"
        % (kind.encode(), orjson.dumps({"type": kind, "sequence_number": seq, **fields}))
        for seq, (kind, fields) in enumerate(body)
    )


def _response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": RESPONSE_ID, "object": "response", "created_at": 1700000000, "status": status,
        "background": False, "error": None, "incomplete_details": None,
        "instructions": INSTRUCTIONS, "max_output_tokens": None, "model": MODEL,
        "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": TOOLS,
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }  # fmt: skip


@functools.cache
def chunked_frames(events: int, api: Api = "chat") -> tuple[bytes, ...]:
    """Each event as one HTTP/1.1 chunk, ready for its own `transport.write`."""
    return tuple(b"%x\r\n%s\r\n" % (len(e), e) for e in sse_events(events, api))


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
def expected_body(events: int, api: Api = "chat") -> ExpectedBody:
    """The body and event ends of a stream of `events` events (cached: shared by all streams)."""
    parts = sse_events(events, api)
    ends: list[int] = []
    total = 0
    for part in parts:
        total += len(part)
        ends.append(total)
    return ExpectedBody(b"".join(parts), tuple(ends))


def request_body(spec: StreamSpec) -> bytes:
    """The request a load generator sends; `bench` tells the upstream what to stream.

    The `bench` field is an unknown field to a gateway, which must pass it through untouched.
    A Responses request carries the instructions and tools an agent sends with every turn.
    """
    bench = {"events": spec.events, "delay_ms": spec.delay_ms}
    question = "Tell me about the quick brown fox."
    if spec.api == "responses":
        return orjson.dumps({
            "model": MODEL, "stream": True, "instructions": INSTRUCTIONS, "tools": TOOLS,
            "input": question, "bench": bench,
        })  # fmt: skip
    return orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": question}],
            "bench": bench,
        }
    )


def parse_request_body(body: bytes, api: Api = "chat") -> StreamSpec:
    """The stream a request asks for; a request without `bench` gets a short default stream."""
    params = orjson.loads(body).get("bench") or {}
    return StreamSpec(int(params.get("events", 20)), float(params.get("delay_ms", 0.0)), api)
