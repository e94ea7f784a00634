"""The bench upstream: a raw-asyncio HTTP/1.1 server that streams pre-serialised SSE.

`python -m bench.upstream [--port 0]` prints `{"port": N}` once it listens, then serves until
SIGTERM. A chat completion with `"stream": true`, and any POST to /v1/responses (Responses
API events), streams the events its body asks for (see `bench.sse`), each event in its own
`transport.write` with chunked transfer encoding, paced on the loop's clock, so a proxy
receives one event per read as it would from a real model. Pacing uses one timer callback per
event rather than a coroutine, and writes respect flow control, so this process stays far
from the bottleneck. A chat completion without `"stream": true`, and an embeddings request,
get one pre-built JSON answer with its `usage` (see `bench.calls`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import msgspec

from bench import calls, runtime
from bench.http1 import HEAD_END, MAX_HEAD, BodyDecoder, FramingError, Head, body_decoder
from bench.http1 import parse_head as parse_http_head
from bench.sse import LAST_CHUNK, PATHS, Api, StreamSpec, chunked_frames, parse_request_body

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Listening(msgspec.Struct):
    """The line the upstream prints once it accepts connections."""

    port: int


class StreamServer(asyncio.Protocol):
    """One client connection: read a request, stream its answer, repeat (keep-alive)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending = b""
        self._head: Head | None = None
        self._body: BodyDecoder | None = None
        self._body_parts: list[bytes] = []
        self._frames: tuple[bytes, ...] = ()
        self._next = 0
        self._start = 0.0
        self._delay_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._streaming = False
        self._paused = False
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._streaming and self._timer is None:
            self._send_due()

    def data_received(self, data: bytes) -> None:
        self._pending += data
        if not self._streaming:
            try:
                self._read_request()
            except (FramingError, ValueError):
                self._reject()

    def _reject(self) -> None:
        """Answer 400 and close: the bench never sends a malformed request on purpose."""
        if self._transport is not None:
            self._transport.write(BAD_REQUEST)
            self._transport.close()

    def _read_request(self) -> None:
        """Advance through head and body of the next request; start streaming once whole."""
        if self._head is None:
            end = self._pending.find(HEAD_END)
            if end < 0:
                if len(self._pending) > MAX_HEAD:
                    raise FramingError("request head too large")
                return
            self._head = parse_http_head(self._pending[:end])
            self._body = body_decoder(self._head)
            self._body_parts = []
            self._pending = self._pending[end + len(HEAD_END) :]
        assert self._body is not None
        self._body_parts += self._body.feed(self._pending)
        self._pending = b""
        if self._body.done:
            self._pending = self._body.tail
            self._respond(self._head, b"".join(self._body_parts))

    def _respond(self, head: Head, body: bytes) -> None:
        """Stream what the request asks for, or 404 anything but a chat completion or a
        Responses request."""
        assert self._transport is not None
        self._head = None
        self._keep_alive = head.keep_alive()
        if head.start[0] == "POST" and (call := calls.call_for(head.start[1], body)) is not None:
            self._transport.write(calls.answer(call))  # a short call: one JSON answer
            self._finish()
            return
        api = _api(head.start[1]) if head.start[0] == "POST" else None
        if api is None:
            self._transport.write(NOT_FOUND)
            self._finish()
            return
        spec: StreamSpec = parse_request_body(body, api)
        self._frames = chunked_frames(spec.events, spec.api)
        self._delay_s = spec.delay_ms / 1000
        self._next = 0
        self._start = self._loop.time()
        self._streaming = True
        self._transport.write(STREAM_HEAD)
        self._send_due()

    def _send_due(self) -> None:
        """Write every event whose time has come, one write each; schedule the next one."""
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        frames = self._frames
        while self._next < len(frames) and not self._paused:
            transport.write(frames[self._next])
            self._next += 1
            if self._delay_s and self._next < len(frames):
                due = self._start + self._next * self._delay_s
                self._timer = self._loop.call_at(due, self._send_due)
                return
        if self._next == len(frames) and not self._paused:
            transport.write(LAST_CHUNK)
            self._streaming = False
            self._finish()

    def _finish(self) -> None:
        """After a response: close if asked to, else serve a request that already arrived."""
        if self._transport is None:
            return
        if not self._keep_alive:
            self._transport.close()
        elif self._pending:
            self.data_received(b"")


def _api(target: str) -> Api | None:
    """Which API a request target asks for (its path, before any query), if any."""
    path = target.partition("?")[0]
    return next((api for api, suffix in PATHS.items() if path.endswith(suffix)), None)


async def serve(host: str, port: int) -> None:
    """Listen, announce the port, and serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StreamServer, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime.emit(Listening(port=server.sockets[0].getsockname()[1]))
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m bench.upstream --host 127.0.0.1 --port 0`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    runtime.raise_nofile_limit()
    runtime.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
