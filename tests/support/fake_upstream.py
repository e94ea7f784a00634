"""A real aiohttp server on port 0 that replays verbatim bytes, for byte-exactness tests.

Each response is a `Script`: status, headers and the body as a list of pieces, each written
with its own write (optionally after a pause), so tests control exactly how the upstream
splits its stream. It records what it received and counts TCP connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Script:
    pieces: list[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    pause_s: float = 0.0
    #: after the pieces: "eof" ends the body, "abort" resets the connection, "hang" stalls
    then: str = "eof"
    headers_delay_s: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    url: str = ""
    scripts: list[Script] = field(default_factory=list)
    default: Script = field(default_factory=lambda: Script([b"data: [DONE]\n\n"]))
    received: list[Received] = field(default_factory=list)
    #: when each request arrived (time.monotonic())
    received_at: list[float] = field(default_factory=list)
    connections_opened: int = 0
    connections_closed: int = 0
    closed_events: asyncio.Queue[float] = field(default_factory=asyncio.Queue)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def next_script(self) -> Script:
        return self.scripts.pop(0) if self.scripts else self.default

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received_at.append(time.monotonic())
        self.received.append(
            Received(
                request.method, request.path, request.query_string, dict(request.headers), body
            )
        )
        script = self.next_script()
        if script.headers_delay_s:
            await asyncio.sleep(script.headers_delay_s)
        resp = web.StreamResponse(status=script.status, headers=script.headers)
        resp.content_type = script.content_type
        await resp.prepare(request)
        for piece in script.pieces:
            if script.pause_s:
                await asyncio.sleep(script.pause_s)
            await resp.write(piece)
        if script.then == "abort":
            assert request.transport is not None
            request.transport.abort()
            return resp
        if script.then == "hang":
            await asyncio.sleep(3600)
        await resp.write_eof()
        return resp


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    server = runner.server
    assert server is not None
    original = server.connection_made, server.connection_lost

    def made(handler: object, transport: asyncio.BaseTransport) -> None:
        upstream.connections_opened += 1
        original[0](handler, transport)  # type: ignore[arg-type]

    def lost(handler: object, exc: BaseException | None) -> None:
        upstream.connections_closed += 1
        upstream.closed_events.put_nowait(asyncio.get_running_loop().time())
        original[1](handler, exc)  # type: ignore[arg-type]

    server.connection_made, server.connection_lost = made, lost  # type: ignore[method-assign,assignment]
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        await runner.cleanup()
