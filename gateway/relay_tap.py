"""The relay's fast path: upstream body pieces written to the client inside the upstream's
own read callback, with no task wake-up per event.

Awaiting `Response.read_any()` costs, per SSE event, a future, a task step and a buffer
append and pop; `StreamResponse.write` adds another await. A `Tap` does the same job
synchronously: the upstream connection (`gateway.upstream_http`) hands each body piece to the tap as
its parser decodes it, and the tap frames it for the client (HTTP/1.1 chunked, as aiohttp's
`StreamWriter` would, or raw for HTTP/1.0), writes it with one `transport.write`, and feeds
the observers. The relay task only awaits the tap's end (the upstream's end or error, the
budget cut, the client gone) or its backpressure: when the client's socket buffer is full,
the tap pauses the upstream's reading and wakes the task, which awaits the client's drain
under the write-stall timeout, then resumes it. While paused, the upstream's idle timeout
does not run (`upstream_http.Response.pause_reading`).

What this relies on in aiohttp's server: the prepared response's connection `StreamWriter`,
that its framing is the plain one reproduced here (no compression, no declared length, the
head sent, no hooks), and its client protocol's flow-control flag, which `drain()` waits on.
These are aiohttp internals, named with the versions tested in `gateway.aiohttp_private`:
`tap()` gets the writer from `aiohttp_private.plain_writer` once per stream and returns None
when any does not hold (or a release removed it), and the relay then keeps its awaited loop.
`Tap.deliver` reads the flow-control flag (`BaseProtocol._paused`) per event as a plain
attribute; the adapter checked at tap time that it is there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import structlog
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from .aiohttp_private import plain_writer
from .upstream_http import Response

#: how a tapped stream ended without an upstream error
TapEnd = Literal["eof", "cut", "client_gone"]
Feed = Callable[[bytes], None]


class Tap:
    """Delivers one stream's upstream pieces to its client, inside the upstream's callbacks.

    Observers (`feed`, `gap`, `over`) run after each piece is written; an exception in
    `feed` switches counting off for the stream but never touches the bytes.
    """

    __slots__ = (
        "_body",
        "_chunked",
        "_client",
        "_end",
        "_error",
        "_feed",
        "_gap",
        "_held",
        "_last_at",
        "_over",
        "_transport",
        "_wake",
        "_writer",
        "last",
    )

    def __init__(
        self, body: Response, writer: StreamWriter, transport: asyncio.WriteTransport, last: bytes
    ) -> None:
        self._body, self._writer, self._transport = body, writer, transport
        self._client = writer.protocol
        self._chunked = writer.chunked
        self._feed: Feed | None = None
        self._gap: Callable[[float], None] | None = None
        self._over: Callable[[], bool] | None = None
        self._end: TapEnd | None = None
        self._error: BaseException | None = None
        self._held = False
        self._wake: asyncio.Future[None] | None = None
        self._last_at = time.perf_counter()
        #: the last piece written to the client (does the stream so far end an SSE event?)
        self.last = last

    def observe(
        self,
        feed: Feed | None,
        gap: Callable[[float], None] | None,
        over: Callable[[], bool] | None,
    ) -> None:
        self._feed, self._gap, self._over = feed, gap, over

    # -- called by the upstream's connection, synchronously -----------------------------------

    def deliver(self, data: bytes) -> None:
        """One upstream piece: to the client at once, then to the observers."""
        if self._end is not None:
            return  # cut or client gone: nothing more goes out
        transport = self._transport
        if transport.is_closing():
            self._stop("client_gone")
            return
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        try:
            transport.write(framed)
        except (ConnectionError, RuntimeError):
            self._stop("client_gone")
            return
        self._writer.output_size += len(framed)
        self.last = data
        now = time.perf_counter()
        if self._gap is not None:
            self._gap(now - self._last_at)
        self._last_at = now
        if self._feed is not None:
            try:
                self._feed(data)
            except Exception:
                self._feed = None
                structlog.get_logger("gateway").exception("stream_observer_failed")
        if self._over is not None and self._over():
            self._stop("cut")
        # `writing_paused` without a property call (aiohttp_private.PROTOCOL_PAUSED, checked in tap)
        elif self._client._paused and not self._held:
            self._held = True
            self._body.pause_reading()
            self._signal()

    def upstream_ended(self, error: BaseException | None) -> None:
        if self._end is None and self._error is None:
            if error is None:
                self._end = "eof"
            else:
                self._error = error
        self._signal()

    # -- the relay task -----------------------------------------------------------------------

    async def run(self, stall_s: float) -> TapEnd:
        """Until the stream ends: returns how, or raises the upstream's error."""
        while True:
            if self._error is not None:
                raise self._error
            if self._end is not None:
                return self._end
            if self._held:
                await self._drain(stall_s)
                continue
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    async def _drain(self, stall_s: float) -> None:
        """The client's buffer is full: wait for it to drain, then read the upstream again."""
        try:
            async with asyncio.timeout(stall_s):
                await self._writer.drain()
        except (ConnectionError, RuntimeError, TimeoutError):
            self._end = "client_gone"
            return
        self._held = False
        self._last_at = time.perf_counter()
        if self._end is None and self._error is None:
            self._body.resume_reading()

    def _stop(self, end: TapEnd) -> None:
        self._end = end
        self._body.pause_reading()
        self._signal()

    def _signal(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)


def tap(
    resp: web.StreamResponse, body: Response, transport: asyncio.WriteTransport | None, last: bytes
) -> tuple[Tap, list[bytes]] | None:
    """Put a tap on `body` if the client's side is plain enough for it, else None.

    Returns the tap and the pieces the body had already buffered: the caller delivers them
    (in order, before anything the connection hands over later) with `Tap.deliver`.
    """
    if transport is None or transport.is_closing():
        return None
    writer = plain_writer(resp)
    if writer is None:
        return None
    new = Tap(body, writer, transport, last)
    return new, body.tap(new.deliver, new.upstream_ended)
