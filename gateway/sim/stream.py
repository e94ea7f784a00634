"""Writing one streamed answer: its beats, their timing, and the faults that strike mid-stream.

A stream is a run of beats that its `Shape` (the API's wire format) lays out. Chat and plain
completions (`ChatShape`; a beat holds one event per choice, `n` > 1 interleaves them):

    role (chat only) -> reasoning chunks -> content chunks -> [tool call: its name, then its
    arguments in pieces (chat only)] -> finish -> [usage] -> [DONE]

Responses (`responses.ResponseShape`): frame events around reasoning, text and tool-argument
deltas, then the terminal event that repeats the whole response.

Timing: `ttft_s` before the first beat; the first token beat follows the frame beats at once,
then `delay_s` before each later token beat; frames, the finish and what ends the stream follow
at once. Every event is its own `resp.write`, as a model server writes them, even with no delay.

A mid-stream fault strikes once `fail_after` token beats are out (at the latest before the
finish beat): with `fail_after` 0, before any event. Usage counts the tokens (o200k_base, per
chunk, as the gateway counts them) of the chunks actually written, so it always agrees with what
a client saw.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

import orjson
from aiohttp import web

from .answers import usage
from .connection import drop, pause
from .events import DONE, ChunkEncoder, error_event
from .steering import Plan

#: how long `stall` keeps a connection silent before it gives up and drops it
STALL_S = 3600.0
#: the gap between the fragments of one event under `split`: a real timer, so that a reader
#: in the same process gets them as separate reads
SPLIT_GAP_S = 0.001

MID_STREAM_FAULTS = frozenset(
    ("reset_mid_stream", "stall", "invalid_json", "big_line", "error_event", "failed", "incomplete")
)

Write = Callable[[bytes], Awaitable[None]]

#: how a stream ends: its normal end, cut short (fault `no_done`), or a Responses terminal fault
Ending = Literal["completed", "cut", "failed", "incomplete"]


class Beat(Enum):
    FRAME = 0  # events around the tokens (chat's role chunk, Responses' items opening, closing)
    REASONING = 1
    CONTENT = 2
    FINISH = 3


@dataclass(slots=True)
class Tally:
    steps: int = 0  # token beats written
    tokens: int = 0  # tokens of the chunks written, over every choice
    reasoning: int = 0


#: one beat: its kind, its events, and the tokens and reasoning tokens they carry
Step = tuple[Beat, list[bytes], int, int]


class Shape(Protocol):
    """One API's streamed events for one answer (`ChatShape`, `responses.ResponseShape`)."""

    def beats(self) -> Iterator[Step]: ...

    def content(self, piece: bytes) -> bytes:
        """One content event of JSON string `piece` (for the `invalid_json`, `big_line` faults)."""
        ...

    def error(self) -> bytes:
        """The error event that ends the stream (fault `error_event`)."""
        ...

    def end(self, tally: Tally, ending: Ending) -> list[bytes]:
        """What follows the last beat written."""
        ...


class ChatShape:
    """Chat and plain completion chunks, `n` choices, `[DONE]` and the optional usage chunk."""

    __slots__ = ("enc", "include_usage", "n", "plan", "prompt_tokens")

    def __init__(
        self, enc: ChunkEncoder, plan: Plan, *, n: int, prompt_tokens: int, include_usage: bool
    ) -> None:
        self.enc, self.plan, self.n = enc, plan, n
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage

    def beats(self) -> Iterator[Step]:
        enc, plan, n = self.enc, self.plan, self.n
        choices = range(n)
        if enc.kind == "chat":
            yield Beat.FRAME, [enc.role(i) for i in choices], 0, 0
        thought = enc.content if plan.think else enc.reasoning
        for piece, tokens in zip(plan.reasoning.json, plan.reasoning.tokens, strict=True):
            yield Beat.REASONING, [thought(i, piece) for i in choices], n * tokens, n * tokens
        for piece, tokens in zip(plan.content.json, plan.content.tokens, strict=True):
            yield Beat.CONTENT, [enc.content(i, piece) for i in choices], n * tokens, 0
        if plan.tool_name is not None:
            call_id = orjson.dumps("call_" + enc.response_id.rpartition("-")[2])
            name = orjson.dumps(plan.tool_name)
            yield Beat.FRAME, [enc.tool_call(i, call_id, name) for i in choices], 0, 0
            for piece, tokens in zip(plan.arguments.json, plan.arguments.tokens, strict=True):
                yield Beat.CONTENT, [enc.arguments(i, piece) for i in choices], n * tokens, 0
        reason = orjson.dumps(plan.finish_reason)
        yield Beat.FINISH, [enc.finish(i, reason) for i in choices], 0, 0

    def content(self, piece: bytes) -> bytes:
        return self.enc.content(0, piece)

    def error(self) -> bytes:
        return error_event("sim: injected error event", "sim_error_event")

    def end(self, tally: Tally, ending: Ending) -> list[bytes]:
        out = []
        if self.include_usage:
            reasoning = tally.reasoning if self.plan.reasoning.text else None
            out.append(self.enc.usage(usage(self.prompt_tokens, tally.tokens, reasoning)))
        if ending != "cut":
            out.append(DONE)
        return out


async def write_stream(
    request: web.BaseRequest, resp: web.StreamResponse, shape: Shape, plan: Plan
) -> None:
    """Write the events after the headers; returns early when a fault ends the stream."""
    write = _writer(resp, plan)
    tally = Tally()
    armed = plan.fault in MID_STREAM_FAULTS
    for index, (kind, events, tokens, reasoning) in enumerate(shape.beats()):
        if armed and (tally.steps >= plan.fail_after or kind is Beat.FINISH):
            armed = False
            if await _strike(request, write, shape, plan, tally):
                return
        token_beat = kind is Beat.REASONING or kind is Beat.CONTENT
        if index == 0:
            await pause(request, plan.ttft_s)
        elif tally.steps and token_beat:
            await pause(request, plan.delay_s)
        for event in events:
            await write(event)
        if token_beat:
            tally.steps += 1
            tally.tokens += tokens
            tally.reasoning += reasoning
    for event in shape.end(tally, "cut" if plan.fault == "no_done" else "completed"):
        await write(event)


async def _strike(
    request: web.BaseRequest, write: Write, shape: Shape, plan: Plan, tally: Tally
) -> bool:
    """Do the mid-stream fault; True when it ends the stream."""
    if plan.fault == "reset_mid_stream":
        drop(request)
        return True
    if plan.fault == "stall":
        await pause(request, STALL_S)
        drop(request)
        return True
    if plan.fault == "error_event":
        await write(shape.error())
        return True
    if plan.fault == "failed" or plan.fault == "incomplete":
        for event in shape.end(tally, plan.fault):
            await write(event)
        return True
    if plan.fault == "invalid_json":
        event = shape.content(b'"this event is cut short"')
        await write(event[: len(event) // 2] + b"\n\n")
    elif plan.fault == "big_line":
        line = len(shape.content(b'""')) - 2  # the data line without its "\n\n"
        await write(shape.content(orjson.dumps(big_text(plan.big_bytes - line))))
        tally.tokens += plan.tokenizer.count(big_text(plan.big_bytes - line))
    return False


@functools.lru_cache(maxsize=4)
def big_text(size: int) -> str:
    """The text of the `big_line` fault's chunk (cached, with its count in the tokenizer)."""
    return "x" * max(size, 0)


def _writer(resp: web.StreamResponse, plan: Plan) -> Write:
    if plan.fault == "crlf":
        return lambda event: resp.write(event.replace(b"\n", b"\r\n"))
    if plan.fault == "split":
        return functools.partial(_write_split, resp)
    return resp.write


async def _write_split(resp: web.StreamResponse, event: bytes) -> None:
    start = 0
    for cut in _cuts(event):
        await resp.write(event[start:cut])
        await asyncio.sleep(SPLIT_GAP_S)
        start = cut
    await resp.write(event[start:])


def _cuts(event: bytes) -> list[int]:
    """Where `split` cuts an event: in `data:`, inside the first multi-byte character, in the
    middle of the JSON, and between the two newlines that end the event."""
    cuts = {3, len(event) // 2, len(event) - 1}
    lead = next((i for i, byte in enumerate(event) if byte >= 0xC0), None)
    if lead is not None:
        cuts.add(lead + 1)
    return sorted(c for c in cuts if 0 < c < len(event))
