"""Writing one streamed answer: its beats, their timing, and the faults that strike mid-stream.

A stream is a run of beats; a beat holds one event per choice (`n` > 1 interleaves them):

    role (chat only) -> reasoning chunks -> content chunks -> finish -> [usage] -> [DONE]

Timing: `ttft_s` before the first beat; the first token chunk follows the role chunk at once,
then `delay_s` between token beats; the finish, usage and `[DONE]` events follow the last token
at once. Every event is its own `resp.write`, as a model server writes them, even with no delay.

A mid-stream fault strikes once `fail_after` token beats are out (at the latest before the
finish beat): with `fail_after` 0, before any event. Usage counts the token chunks actually
written, so it always agrees with what a client saw.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum

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
    ("reset_mid_stream", "stall", "invalid_json", "big_line", "error_event")
)

Write = Callable[[bytes], Awaitable[None]]


class Beat(Enum):
    ROLE = 0
    REASONING = 1
    CONTENT = 2
    FINISH = 3


@dataclass(slots=True)
class Tally:
    steps: int = 0  # token beats written
    tokens: int = 0  # token chunks written, over every choice
    reasoning: int = 0


def beats(enc: ChunkEncoder, plan: Plan, n: int) -> Iterator[tuple[Beat, list[bytes]]]:
    choices = range(n)
    if enc.kind == "chat":
        yield Beat.ROLE, [enc.role(i) for i in choices]
    thought = enc.content if plan.think else enc.reasoning
    for piece in plan.reasoning.json:
        yield Beat.REASONING, [thought(i, piece) for i in choices]
    for piece in plan.content.json:
        yield Beat.CONTENT, [enc.content(i, piece) for i in choices]
    reason = orjson.dumps(plan.finish_reason)
    yield Beat.FINISH, [enc.finish(i, reason) for i in choices]


async def write_stream(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    enc: ChunkEncoder,
    plan: Plan,
    *,
    n: int,
    prompt_tokens: int,
    include_usage: bool,
) -> None:
    """Write the events after the headers; returns early when a fault ends the stream."""
    write = _writer(resp, plan)
    tally = Tally()
    armed = plan.fault in MID_STREAM_FAULTS
    for index, (kind, events) in enumerate(beats(enc, plan, n)):
        if armed and (tally.steps >= plan.fail_after or kind is Beat.FINISH):
            armed = False
            if await _strike(request, write, enc, plan, tally):
                return
        if index == 0:
            await pause(request, plan.ttft_s)
        elif tally.steps and kind is not Beat.FINISH:
            await pause(request, plan.delay_s)
        for event in events:
            await write(event)
        if kind is Beat.REASONING or kind is Beat.CONTENT:
            tally.steps += 1
            tally.tokens += n
            if kind is Beat.REASONING:
                tally.reasoning += n
    if include_usage:
        reasoning = tally.reasoning if plan.reasoning.text else None
        await write(enc.usage(usage(prompt_tokens, tally.tokens, reasoning)))
    if plan.fault != "no_done":
        await write(DONE)


async def _strike(
    request: web.BaseRequest, write: Write, enc: ChunkEncoder, plan: Plan, tally: Tally
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
        await write(error_event("sim: injected error event", "sim_error_event"))
        return True
    if plan.fault == "invalid_json":
        event = enc.content(0, b'"this event is cut short"')
        await write(event[: len(event) // 2] + b"\n\n")
    elif plan.fault == "big_line":
        line = len(enc.content(0, b'""')) - 2  # the data line without its "\n\n"
        await write(enc.content(0, orjson.dumps("x" * max(plan.big_bytes - line, 0))))
        tally.tokens += 1
    return False


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
