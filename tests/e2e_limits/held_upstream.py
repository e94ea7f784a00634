"""An OpenAI-like upstream that holds its streams open until the test lets them go.

Limits are decided at admission and settled at the end of a stream, so a test of what is
admitted while other streams run needs those streams to be running, for certain, when the
next request arrives. This upstream answers a streamed chat request with its headers and a
first (role) chunk at once, so the gateway has started relaying, then waits for `release`
before it sends the rest:

- `chunks` content chunks (body field `chunks`, default 5), each "tok" or `pad` x's long,
  `pause_ms` apart (default none, as a model trickles its tokens); with `split`, pairs of
  chunks go in three writes cut inside their JSON, as TCP may deliver them;
- the finish chunk, a usage chunk (`PROMPT_TOKENS` + one completion token per content
  chunk), and `[DONE]`.

A non-streamed request waits for `release` too, then gets one JSON answer with usage.
It records the headers of every request, so tests can see what the gateway sent upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

PROMPT_TOKENS = 10
_ID = {"id": "chatcmpl-held", "created": 1700000000, "model": "test-1"}


@dataclass(eq=False)
class HeldUpstream:
    url: str = ""
    #: set: streams run to the end; clear: new streams wait after their first chunk
    release: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[dict[str, str]] = field(default_factory=list)
    #: requests that arrived and are waiting for `release` now
    waiting: int = 0
    #: content bytes each stream's writes have handed to the socket, by body field `tag`
    sent: dict[str, int] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(dict(request.headers))
        body: dict[str, Any] = orjson.loads(await request.read())
        if body.get("stream") is not True:
            await self._hold()
            answer = _whole(int(body.get("chunks", 5)))
            return web.json_response(answer, dumps=lambda o: orjson.dumps(o).decode())
        return await self._stream(request, body)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        chunks = int(body.get("chunks", 5))
        pause_s = float(body.get("pause_ms", 0)) / 1000
        tag = str(body.get("tag", ""))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": ""}))
        await self._hold()
        event = _chunk({"content": "x" * int(body["pad"]) if "pad" in body else "tok"})
        pieces = _split_pairs(event, chunks) if body.get("split") is True else [event] * chunks
        for piece in pieces:
            if pause_s:
                await asyncio.sleep(pause_s)
            await resp.write(piece)
            self.sent[tag] = self.sent.get(tag, 0) + len(piece)
        await resp.write(_chunk({}, finish="stop"))
        await resp.write(_event({**_ID, "object": "chat.completion.chunk", "choices": [],
                                 "usage": _usage(chunks)}))  # fmt: skip
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _hold(self) -> None:
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1


def _split_pairs(event: bytes, count: int) -> list[bytes]:
    """`count` copies of `event`, two by two in three writes: the middle write ends the first
    event and begins the second, so a reader that gets one write per read finishes the first
    event of each pair in a read that ends inside the second."""
    head, tail = event[:40], event[40:]
    pieces = [head, tail + head, tail] * (count // 2)
    return pieces + [event] * (count % 2)


def _usage(completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _event({**_ID, "object": "chat.completion.chunk", "choices": [choice]})


def _whole(completion: int) -> dict[str, object]:
    message = {"role": "assistant", "content": "tok" * completion}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {**_ID, "object": "chat.completion", "choices": [choice], "usage": _usage(completion)}


@asynccontextmanager
async def held_upstream() -> AsyncIterator[HeldUpstream]:
    """The upstream on a loopback port; streams are held until `release` is set."""
    upstream = HeldUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield upstream
    finally:
        upstream.release.set()
        await runner.cleanup()
