"""Responses API stream bodies, framed as OpenAI writes them: `event: <type>`, then one
compact `data:` line with the same `type` and a `sequence_number`, then a blank line; no
`[DONE]`. The shapes follow openai-python's `types/responses` (ResponseTextDeltaEvent,
ResponseCompletedEvent, ...); delta events carry the `obfuscation` padding the API adds
unless `stream_options.include_obfuscation` is false.

Each body is a list of events (one upstream write each); `body(...)` joins them.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson

RESPONSE_ID = "resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b"
MODEL = "gpt-5-mini-2025-08-07"


def usage(
    input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def response(
    status: str,
    output: list[dict[str, Any]] | None = None,
    *,
    used: dict[str, Any] | None = None,
    instructions: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Response object, as `response.created` and the terminal events repeat it."""
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": 1756315696,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "max_output_tokens": None,
        "model": MODEL,
        "output": output or [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": tools or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": used,
        "user": None,
        "metadata": {},
        **extra,
    }


class Events:
    """Numbers events in order, as the API does (`sequence_number` from 0)."""

    def __init__(self, line_end: bytes = b"\n") -> None:
        self._seq = itertools.count()
        self._end = line_end

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": next(self._seq), **fields})
        end = self._end
        return b"event: " + kind.encode() + end + b"data: " + data + end + end


def message(text: str, *, refusal: bool = False) -> dict[str, Any]:
    part = {"type": "refusal", "refusal": text} if refusal else {
        "type": "output_text", "annotations": [], "logprobs": [], "text": text,
    }  # fmt: skip
    return {
        "id": "msg_68af4033c4b4819390c3d4a8a0d3d8e905438e46b5f69a3b",
        "type": "message",
        "status": "completed",
        "content": [part],
        "role": "assistant",
    }


def text_stream(
    pieces: list[str],
    *,
    used: dict[str, Any] | None,
    line_end: bytes = b"\n",
    obfuscation: str = "Xq3bN",
    instructions: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    terminal: str = "response.completed",
    **terminal_fields: Any,
) -> list[bytes]:
    """A message streamed as output_text deltas, ending with `terminal` (None: no end)."""
    ev = Events(line_end)
    item = message("".join(pieces))
    started = response("in_progress", instructions=instructions, tools=tools)
    ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events = [
        ev("response.created", response=started),
        ev("response.in_progress", response=started),
        ev("response.output_item.added", output_index=0, item={**item, "content": []}),
        ev("response.content_part.added", **ids, part={**item["content"][0], "text": ""}),
    ]
    events += [
        ev("response.output_text.delta", **ids, delta=p, logprobs=[], obfuscation=obfuscation)
        for p in pieces
    ]
    events += [
        ev("response.output_text.done", **ids, text="".join(pieces), logprobs=[]),
        ev("response.content_part.done", **ids, part=item["content"][0]),
        ev("response.output_item.done", output_index=0, item=item),
    ]
    if terminal:
        status = terminal.removeprefix("response.")
        done = response(
            status, [item], used=used, instructions=instructions, tools=tools, **terminal_fields
        )
        events.append(ev(terminal, response=done))
    return events


def reasoning_stream() -> list[bytes]:
    """A reasoning summary (reasoning_summary_text deltas), then the answer text."""
    ev = Events()
    rs: dict[str, Any] = {
        "id": "rs_68af40",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": None,
    }
    summary = [{"type": "summary_text", "text": "Think first. Then answer."}]
    item = message("42")
    events = [
        ev("response.created", response=response("in_progress")),
        ev("response.output_item.added", output_index=0, item=rs),
        ev("response.reasoning_summary_part.added", item_id="rs_68af40", output_index=0,
           summary_index=0, part={"type": "summary_text", "text": ""}),
        ev("response.reasoning_summary_text.delta", item_id="rs_68af40", output_index=0,
           summary_index=0, delta="Think first.", obfuscation="aB"),
        ev("response.reasoning_summary_text.delta", item_id="rs_68af40", output_index=0,
           summary_index=0, delta=" Then answer.", obfuscation="aBcD"),
        ev("response.reasoning_summary_text.done", item_id="rs_68af40", output_index=0,
           summary_index=0, text="Think first. Then answer."),
        ev("response.output_item.done", output_index=0, item={**rs, "summary": summary}),
        ev("response.output_item.added", output_index=1, item={**item, "content": []}),
        ev("response.output_text.delta", item_id=item["id"], output_index=1, content_index=0,
           delta="42", logprobs=[], obfuscation="zzzzzzzz"),
        ev("response.output_item.done", output_index=1, item=item),
        ev("response.completed", response=response(
            "completed", [{**rs, "summary": summary}, item],
            used=usage(20, 130, cached=0, reasoning=128))),
    ]  # fmt: skip
    return events


def function_call_stream() -> list[bytes]:
    """A function call's arguments as function_call_arguments deltas; the output ends in it."""
    ev = Events()
    call = {
        "id": "fc_68af41", "type": "function_call", "status": "completed",
        "arguments": '{"city":"Paris"}', "call_id": "call_Xy12", "name": "get_weather",
    }  # fmt: skip
    return [
        ev("response.created", response=response("in_progress")),
        ev("response.output_item.added", output_index=0,
           item={**call, "arguments": "", "status": "in_progress"}),
        ev("response.function_call_arguments.delta", item_id="fc_68af41", output_index=0,
           delta='{"city":', obfuscation="Qw"),
        ev("response.function_call_arguments.delta", item_id="fc_68af41", output_index=0,
           delta='"Paris"}', obfuscation="Qwer"),
        ev("response.function_call_arguments.done", item_id="fc_68af41", output_index=0,
           arguments='{"city":"Paris"}'),
        ev("response.output_item.done", output_index=0, item=call),
        ev("response.completed", response=response("completed", [call], used=usage(40, 17))),
    ]  # fmt: skip


def refusal_stream() -> list[bytes]:
    ev = Events()
    item = message("I can't help with that.", refusal=True)
    ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    return [
        ev("response.created", response=response("in_progress")),
        ev("response.refusal.delta", **ids, delta="I can't", obfuscation="pad"),
        ev("response.refusal.delta", **ids, delta=" help with that.", obfuscation="pad"),
        ev("response.refusal.done", **ids, refusal="I can't help with that."),
        ev("response.completed", response=response("completed", [item], used=usage(11, 7))),
    ]


def failed_stream() -> list[bytes]:
    ev = Events()
    error = {"code": "server_error", "message": "The model failed to generate a response."}
    return [
        ev("response.created", response=response("in_progress")),
        ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0,
           delta="Par", logprobs=[]),
        ev("response.failed", response=response("failed", error=error, used=usage(9, 1))),
    ]  # fmt: skip


def error_event_stream() -> list[bytes]:
    ev = Events()
    return [
        ev("response.created", response=response("in_progress")),
        ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0,
           delta="Once", logprobs=[]),
        ev("error", code="rate_limit_exceeded", message="Too many tokens.", param=None),
    ]  # fmt: skip


def big_instructions() -> tuple[str, list[dict[str, Any]]]:
    """Long instructions and many tools: a terminal event of about 512 KiB."""
    instructions = "You are a careful assistant. " * 9000  # ~260 KB
    tools = [
        {
            "type": "function",
            "name": f"tool_{i}",
            "description": "Looks things up in the catalogue. " * 20,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            "strict": True,
        }
        for i in range(330)
    ]
    return instructions, tools


TEXT = text_stream(["Hello", " wörld ☃", "!"], used=usage(12, 3, cached=4))
_BIG_INSTRUCTIONS, _BIG_TOOLS = big_instructions()
BIG = text_stream(
    ["Short", " answer."],
    used=usage(70000, 2, cached=65536),
    instructions=_BIG_INSTRUCTIONS,
    tools=_BIG_TOOLS,
)
INCOMPLETE = text_stream(
    ["Once upon", " a time"],
    used=usage(8, 16),
    terminal="response.incomplete",
    incomplete_details={"reason": "max_output_tokens"},
)
CUT = text_stream(["Half", " an answer"], used=None, terminal="")
CRLF = text_stream(["Hello", " wörld"], used=usage(5, 2), line_end=b"\r\n")
LONG_PADDING = text_stream(["Hi"], used=usage(3, 1), obfuscation="x" * 4000)

CORPUS: dict[str, list[bytes]] = {
    "text": TEXT,
    "reasoning_summary": reasoning_stream(),
    "function_call": function_call_stream(),
    "refusal": refusal_stream(),
    "obfuscation_padding": LONG_PADDING,
    "big_completed": BIG,
    "incomplete": INCOMPLETE,
    "failed": failed_stream(),
    "error_event": error_event_stream(),
    "cut_before_terminal": CUT,
    "crlf": CRLF,
}


def body(events: list[bytes]) -> bytes:
    return b"".join(events)
