"""The relay: upstream bytes to the client, unchanged, as they arrive.

Each piece read from the upstream (`read_any`, never line iteration: a 1 MiB `data:` line must
pass) is written to the client at once, and only then handed to the observer: accounting
parses a copy and never changes what is sent. The write is awaited, so a slow client slows its
own upstream read through TCP backpressure and nothing queues in between; a client that reads
nothing for `write_stall_s` is cut off.

For a plain SSE stream (no `usage: inject` framing), everything after the first chunk goes
through `gateway.relay_tap`: each piece is written from inside the upstream's read callback,
and a full client buffer pauses the upstream's reading instead of an awaited write; the
stall timeout, the budget cut and the error events follow the same rules as the loop here,
which stays for inject mode, non-SSE bodies and anything the fast path cannot take.

The relay decides nothing about tokens or limits: it reports how the stream ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

from . import upstream_http
from .errors import (
    GatewayError,
    RateLimitExceeded,
    drop_tracebacks,
    sse_error_event,
)
from .relay_tap import TapEnd, tap
from .sse import ServerSentEvent, SSEDecoder, ends_frame
from .upstream import gateway_error_for

#: past this many bytes waiting in the client's socket buffer, a write may block: bound it
STALL_CHECK_BYTES = 64 * 1024

Outcome = Literal["completed", "client_disconnect", "upstream_error", "limit"]
Write = Callable[[bytes], Awaitable[None]]


class Observer(Protocol):
    def feed(self, chunk: bytes) -> None: ...


class FrameFilter(Protocol):
    """For `usage: inject`: sees each decoded event, says which one not to send."""

    def feed_event(self, event: ServerSentEvent) -> None: ...
    def is_usage_only(self, event: ServerSentEvent) -> bool: ...


@dataclass(slots=True)
class RelayPlan:
    observer: Observer | None
    write_stall_s: float
    #: called with the time between two upstream reads
    on_chunk_gap: Callable[[float], None] | None = None
    #: inject mode: the relay writes whole frames and drops the usage-only one
    frame_filter: FrameFilter | None = None
    #: polled after each chunk: True ends the stream with an SSE error event (token budget)
    over_budget: Callable[[], bool] | None = None
    #: an SSE stream: failures end it with an SSE error event
    sse: bool = True
    #: the client's transport, to see when its socket buffer fills (a stalled reader)
    client_transport: asyncio.WriteTransport | None = None
    #: called once the upstream body ended cleanly: an error ends the stream with it as an
    #: SSE error event (a stream the upstream cut short without saying so)
    end_check: Callable[[], GatewayError | None] | None = None
    #: the event that ends the stream with an error, in the endpoint's shape
    error_event: Callable[[GatewayError], bytes] = sse_error_event


@dataclass(slots=True)
class RelayResult:
    outcome: Outcome
    error: GatewayError | None = None


class ClientGone(Exception):
    """The client closed its connection or stopped reading for too long."""


class _Ended(Exception):
    def __init__(self, outcome: Outcome, error: GatewayError) -> None:
        super().__init__(error.message)
        self.outcome, self.error = outcome, error
        #: whether the bytes sent so far end with a complete SSE event (None: not known yet)
        self.at_boundary: bool | None = None


async def pump(
    resp: web.StreamResponse, content: upstream_http.Response, first: bytes, plan: RelayPlan
) -> RelayResult:
    """Relay until the upstream body ends; turn every way it can end into a result."""
    try:
        await _loop(resp, content, first, plan)
    except ClientGone as gone:
        drop_tracebacks(gone)
        return RelayResult("client_disconnect")
    except _Ended as ended:
        drop_tracebacks(ended)
        if not plan.sse:  # a whole answer cut short: close, so the client sees it incomplete
            resp.force_close()
        if plan.sse:
            # an event cut in half would swallow the error event: close it off first
            event = plan.error_event(ended.error)
            if not ended.at_boundary:
                event = b"\n\n" + event
            with contextlib.suppress(ClientGone):
                await _guarded_write(resp, plan)(event)
        return RelayResult(ended.outcome, ended.error)
    return RelayResult("completed")


async def _loop(
    resp: web.StreamResponse, content: upstream_http.Response, first: bytes, plan: RelayPlan
) -> None:
    write = _guarded_write(resp, plan)
    frames = _FrameWriter(write, plan.frame_filter) if plan.frame_filter else None
    if frames is not None:
        write = frames.write
    feed = plan.observer.feed if plan.observer is not None else None
    gap, over = plan.on_chunk_gap, plan.over_budget
    clock = time.perf_counter
    last = clock()
    chunk = sent = first
    fast = frames is None and plan.sse
    try:
        while chunk:
            await write(chunk)
            sent = chunk
            if feed is not None:
                feed(chunk)
            if over is not None and over():
                raise _Ended("limit", _budget_error())
            if fast and (tapped := tap(resp, content, plan.client_transport, sent)) is not None:
                # the rest of the stream through the fast path (see gateway.relay_tap)
                tapped_fast, buffered = tapped
                tapped_fast.observe(feed, gap, over)
                del write  # the tap writes from here on; this frame lasts as long as the stream
                try:
                    for piece in buffered:
                        tapped_fast.deliver(piece)
                    del buffered
                    end = await tapped_fast.run(plan.write_stall_s)
                except upstream_http.H1Error as exc:
                    ended = _upstream_failed(exc)
                    ended.at_boundary = ends_frame(tapped_fast.last)
                    raise ended from exc
                _raise_unless_eof(end, tapped_fast.last)
                break
            fast = False
            chunk = await _read(content)
            if gap is not None:
                now = clock()
                gap(now - last)
                last = now
        if frames is not None:
            await frames.flush()
        if plan.end_check is not None and (error := plan.end_check()) is not None:
            raise _Ended("upstream_error", error)
    except _Ended as ended:
        if ended.at_boundary is None:
            ended.at_boundary = frames is not None or ends_frame(sent)
        raise


def _raise_unless_eof(end: TapEnd, last: bytes) -> None:
    """How a tapped stream ended, as the loop's exceptions (`last`: the last piece sent)."""
    if end == "client_gone":
        raise ClientGone
    if end == "cut":
        ended = _Ended("limit", _budget_error())
        ended.at_boundary = ends_frame(last)
        raise ended


def _guarded_write(resp: web.StreamResponse, plan: RelayPlan) -> Write:
    """resp.write, with a client that stopped reading turned into ClientGone after stall_s."""
    transport, stall_s = plan.client_transport, plan.write_stall_s

    async def write(chunk: bytes) -> None:
        try:
            if (
                transport is not None
                and transport.get_write_buffer_size() + len(chunk) > STALL_CHECK_BYTES
            ):
                async with asyncio.timeout(stall_s):
                    await resp.write(chunk)
            else:
                await resp.write(chunk)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise ClientGone from exc

    return write


class _FrameWriter:
    """Writes whole SSE frames, leaving out the usage-only event the gateway asked for."""

    def __init__(self, write: Write, frames: FrameFilter) -> None:
        self._write, self._filter, self._decoder = write, frames, SSEDecoder()

    async def write(self, chunk: bytes) -> None:
        for raw, event in self._decoder.feed_frames(chunk):
            if event is not None:
                self._filter.feed_event(event)
                if self._filter.is_usage_only(event):
                    continue
            await self._write(raw)

    async def flush(self) -> None:
        """Bytes after the last frame (a stream without its final blank line) still go out."""
        rest = self._decoder.pending_raw
        for event in self._decoder.flush():
            self._filter.feed_event(event)
        if rest:
            await self._write(rest)


async def _read(content: upstream_http.Response) -> bytes:
    try:
        return await content.read_any()
    except upstream_http.H1Error as exc:
        raise _upstream_failed(exc) from exc


def _upstream_failed(exc: upstream_http.H1Error) -> _Ended:
    """How an upstream body read fails mid-stream: the idle timeout, or a break of any kind."""
    return _Ended("upstream_error", gateway_error_for(exc, "stream"))


def _budget_error() -> GatewayError:
    return RateLimitExceeded(
        "The team's token budget ran out during this stream.", code="token_budget_exceeded"
    )
