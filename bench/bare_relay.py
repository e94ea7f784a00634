"""A bare aiohttp relay: the floor of the gateway's fixed stack (aiohttp server and client).

`python -m bench.bare_relay --port P --upstream http://127.0.0.1:U` serves until SIGTERM. Each
request goes to the upstream through one aiohttp `ClientSession` (a pool sized for the bench,
no total timeout); the answer's status and Content-Type come back, and each piece of its body
is written to the client with `StreamResponse.write` as it arrives (`iter_any`). Nothing else:
no parsing, no routing, no limits, no metering, no metrics, no log line. Whatever the gateway
spends beyond this, per event or per request, is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench import runtime

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
#: as many upstream connections as the bench holds streams (the gateway's max_connections)
POOL_SIZE = 20000


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the request; stream the answer back piece by piece."""
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=body, headers=headers
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        if (content_type := upstream.headers.get("Content-Type")) is not None:
            response.headers["Content-Type"] = content_type
        await response.prepare(request)
        async for piece in upstream.content.iter_any():
            await response.write(piece)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        app[SESSION] = session
        yield


def create_app(upstream: str) -> web.Application:
    """One catch-all route to `relay`."""
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    """Listen and serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(create_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m bench.bare_relay --port P --upstream http://127.0.0.1:U`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's origin, no path")
    args = parser.parse_args(argv)
    runtime.raise_nofile_limit()
    runtime.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
