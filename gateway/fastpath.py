"""The relay's fast path: upstream body pieces written to the client inside the upstream's
own read callback, with no task wake-up per event.

Awaiting `StreamReader.readany()` costs, per SSE event, a future, a task step, a buffer
append and pop and a parser resume; `StreamResponse.write` adds another await. A `Tap` does
the same job synchronously: aiohttp's response parser calls `feed_data` on the body's
`StreamReader`, and a tapped reader hands each piece straight to the tap, which frames it
for the client (HTTP/1.1 chunked, as aiohttp's `StreamWriter` would, or raw for HTTP/1.0),
writes it with one `transport.write`, and feeds the observers. The relay task only awaits
the tap's end (EOF, an upstream error, the budget cut, the client gone) or its backpressure:
when the client's socket buffer is full, the tap pauses the upstream protocol's reading and
wakes the task, which awaits the client's drain under the write-stall timeout, then resumes.

What this relies on in aiohttp (3.14), and why:

* the response parser (C or Python) delivers the body by calling, on the object that is
  `ClientResponse.content`, `feed_data(data)`, `begin/end_http_chunk_receiving()`,
  `feed_eof()` and `set_exception(exc)`, looked up on the object's type at each call; the
  client protocol's sock_read timer, `connection_lost` and `ClientResponse.close/release`
  call `set_exception`/`feed_eof` on it too. A tap is installed by assigning the reader's
  `__class__` to `_TappedReader`, a subclass with the same slots (`__slots__ = ()`), so the
  parser, the protocol and the response keep the object they hold.
* `StreamReader` has `__slots__` and no room for a tap reference; the tap is kept in the
  reader's `_waiter` slot, the slot of whoever waits for the reader's data, which the tap
  now is. Any read on a tapped reader therefore fails in `StreamReader._wait` ("already
  waiting"), instead of silently stealing bytes.
* `StreamReader._protocol` is the upstream connection's `ResponseHandler`; its
  `pause_reading()` pauses the parser after the current piece and the transport, and
  `resume_reading()` parses what was held back, synchronously, then reads again.
* the client protocol's `read_timeout` (sock_read) re-arms a timer on every read; a tap
  sets it to None while it holds the stream (aiohttp then stops re-arming) and keeps the
  same idle deadline itself with one timer per idle period, checked lazily against the
  last read, and puts it back when it lets go. Reads held back by the tap's own pause are
  not the upstream's silence, so the deadline restarts when reading resumes.
* a tapped reader buffers nothing, so its `_buffer` deque (and `_http_chunk_splits`, which
  only `readchunk()` uses) is swapped for one shared empty deque that refuses to grow
  (`PARKED`) while the tap holds it: about 1.5 KB less per stream. `park_buffer` does the same
  for a request body read to its end.
* on the client side, `StreamResponse._payload_writer` is the connection's `StreamWriter`:
  its `chunked`, `length`, `_compress`, headers-sent state and hooks say whether its
  framing is the plain one reproduced here; its `protocol.writing_paused` is the client
  transport's flow control, and `drain()` waits for it.

`tap()` checks these preconditions and returns None when any does not hold, and the relay
then keeps its awaited loop.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Literal, cast

import aiohttp
import structlog
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter

#: how a tapped stream ended without an upstream error
TapEnd = Literal["eof", "cut", "client_gone"]
Feed = Callable[[bytes], None]


class _Parked(collections.deque[bytes]):
    """An empty buffer shared by every reader that no longer buffers: growing it is a bug."""

    __slots__ = ()

    def append(self, item: bytes) -> None:
        raise RuntimeError("a parked reader buffer cannot take data")

    appendleft = append


PARKED = _Parked()


def park_buffer(reader: aiohttp.StreamReader) -> None:
    """Free the empty buffer of a reader that is at its end or tapped (see the module notes).

    Other readers (aiohttp's shared `EMPTY_PAYLOAD` for a body-less request) are left alone.
    """
    if type(reader) in _PARKABLE and not reader._buffer:
        reader._buffer = PARKED
        reader._http_chunk_splits = None


class _TappedReader(aiohttp.StreamReader):
    """A body reader that hands each piece to its tap instead of buffering it."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        tap: Tap | None = self._waiter  # type: ignore[assignment]  # per event: no cast() call
        if data and tap is not None:
            self.total_bytes += len(data)
            tap.deliver(data)
        return False

    def begin_http_chunk_receiving(self) -> None:
        """Chunk boundaries only serve `readchunk()`, which a tapped reader never serves."""

    def end_http_chunk_receiving(self) -> None:
        """As `begin_http_chunk_receiving`."""

    def feed_eof(self) -> None:
        tap = self._detach()
        super().feed_eof()
        if tap is not None:
            tap.upstream_ended(None)

    def set_exception(
        self, exc: BaseException, exc_cause: BaseException = aiohttp.helpers._EXC_SENTINEL
    ) -> None:
        tap = self._detach()
        super().set_exception(exc, exc_cause)
        if tap is not None:
            tap.upstream_ended(exc)

    def _detach(self) -> Tap | None:
        tap = cast("Tap | None", self._waiter)
        self._waiter = None
        return tap


class Tap:
    """Delivers one stream's upstream pieces to its client, inside the upstream's callbacks.

    Observers (`feed`, `gap`, `over`) run after each piece is written; an exception in
    `feed` switches counting off for the stream but never touches the bytes.
    """

    __slots__ = (
        "_chunked",
        "_client",
        "_end",
        "_error",
        "_feed",
        "_gap",
        "_held",
        "_idle_handle",
        "_idle_s",
        "_last_at",
        "_over",
        "_reader",
        "_transport",
        "_upstream",
        "_wake",
        "_writer",
        "last",
    )

    def __init__(
        self,
        reader: aiohttp.StreamReader,
        writer: StreamWriter,
        transport: asyncio.WriteTransport,
        last: bytes,
    ) -> None:
        self._reader, self._writer, self._transport = reader, writer, transport
        self._client = writer.protocol
        self._upstream = cast(ResponseHandler, reader._protocol)
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
        self._idle_s: float | None = None
        self._idle_handle: asyncio.TimerHandle | None = None

    def watch_idle(self) -> None:
        """Take over the upstream's idle-read timeout (see the module's notes)."""
        upstream = self._upstream
        self._idle_s = upstream.read_timeout
        if self._idle_s:
            upstream.read_timeout = None
            self._arm_idle(self._idle_s)

    def observe(
        self,
        feed: Feed | None,
        gap: Callable[[float], None] | None,
        over: Callable[[], bool] | None,
    ) -> None:
        self._feed, self._gap, self._over = feed, gap, over

    # -- called by the upstream's parser, synchronously ---------------------------------------

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
        elif self._client.writing_paused and not self._held:
            self._held = True
            self._pause_upstream()
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

    def close(self) -> None:
        """Give the reader back its plain class and the upstream its idle timeout (the relay
        ended, however it ended)."""
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._idle_s:
            self._upstream.read_timeout = self._idle_s
        reader = self._reader
        if type(reader) is _TappedReader:
            reader._detach()
            _set_class(reader, aiohttp.StreamReader)
            reader._buffer = collections.deque()
            reader._http_chunk_splits = collections.deque()  # a parser may still end a chunk

    async def _drain(self, stall_s: float) -> None:
        """The client's buffer is full: wait for it to drain, then read the upstream again."""
        try:
            async with asyncio.timeout(stall_s):
                await self._writer.drain()
        except (ConnectionError, RuntimeError, TimeoutError):
            self._end = "client_gone"
            return
        self._held = False
        self._last_at = time.perf_counter()  # the idle deadline counts from here again
        if self._end is None and self._error is None and not self._reader.is_eof():
            self._upstream.resume_reading()  # may deliver held pieces, and hold again

    def _arm_idle(self, delay: float) -> None:
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """The idle timer fired: the upstream timed out if nothing came since one period."""
        self._idle_handle = None
        idle_s = self._idle_s
        if idle_s is None or self._end is not None or self._error is not None:
            return
        left = self._last_at + idle_s - time.perf_counter()
        if self._held or left > 0:
            self._arm_idle(idle_s if self._held else left)
            return
        # what aiohttp's own sock_read timer raises, through the same reader
        timeout = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
        self._reader.set_exception(timeout)

    def _stop(self, end: TapEnd) -> None:
        self._end = end
        self._pause_upstream()
        self._signal()

    def _pause_upstream(self) -> None:
        if not self._reader.is_eof() and self._upstream.transport is not None:
            self._upstream.pause_reading()

    def _signal(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)


def tap(
    resp: web.StreamResponse,
    reader: aiohttp.StreamReader,
    transport: asyncio.WriteTransport | None,
    last: bytes,
) -> tuple[Tap, list[bytes]] | None:
    """Put a tap on `reader` if both ends are plain enough for it, else None.

    Returns the tap and the pieces the reader had already buffered: the caller delivers
    them (in order, before anything the parser hands over later) with `Tap.deliver`.
    """
    writer = resp._payload_writer
    if (
        transport is None
        or transport.is_closing()
        or type(writer) is not StreamWriter
        or not _plain_writer(writer)
        or type(reader) is not aiohttp.StreamReader
        or not isinstance(reader._protocol, ResponseHandler)
        or reader.exception() is not None
        or reader._waiter is not None
    ):
        return None
    buffered = _drain_buffer(reader)
    new = Tap(reader, writer, transport, last)
    if (error := reader.exception()) is not None or reader.is_eof():
        new.upstream_ended(error)
    else:
        _set_class(reader, _TappedReader)
        reader._waiter = cast("asyncio.Future[None]", new)
        park_buffer(reader)
        new.watch_idle()
    return new, buffered


def _plain_writer(writer: StreamWriter) -> bool:
    """Headers sent, no compression, no declared length, no hooks: bytes go out as framed."""
    return (
        writer._compress is None
        and writer.length is None
        and writer._headers_buf is None
        and writer._on_chunk_sent is None
        and writer.on_body_write is None
        and writer.transport is not None
    )


_PARKABLE = (aiohttp.StreamReader, _TappedReader)


def _drain_buffer(reader: aiohttp.StreamReader) -> list[bytes]:
    """What the reader holds now; reading may resume the parser, which may add more."""
    pieces: list[bytes] = []
    while reader.exception() is None and (piece := reader.read_nowait(-1)):
        pieces.append(piece)
    return pieces


def _set_class(reader: aiohttp.StreamReader, cls: type[aiohttp.StreamReader]) -> None:
    """Switch a live reader between the plain and the tapped class (same slots, same object)."""
    reader.__class__ = cls
