"""The client's answer: its head, prepared once the upstream answered (or a keep-alive comment
is due), with the upstream's status and headers, the limits' headers and, for a stream, the SSE
headers of the contract.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .aiohttp_private import head_with_first_write
from .context import RequestContext

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def prepare_stream(
    request: web.Request,
    ctx: RequestContext,
    status: int,
    headers: Mapping[str, str],
    limit_headers: Mapping[str, str],
) -> web.StreamResponse:
    """The client's answer, prepared; its head goes out with the first write, which the caller
    makes at once (the upstream's first piece, or a keep-alive comment)."""
    resp = HeadWithFirstWrite(status=status, headers=headers)
    resp.headers.update(limit_headers)
    if ctx.stream:
        resp.headers.update(SSE_HEADERS)
    ctx.sent_status = status
    await resp.prepare(request)
    return resp


@head_with_first_write
class HeadWithFirstWrite(web.StreamResponse):
    """A streamed answer whose head waits for the first body write and leaves in the same
    `transport.write`: one TCP segment and one system call less per request.

    aiohttp buffers a prepared head and coalesces it with the first write when a private class
    attribute is off, as it is for its own `web.Response`; a `StreamResponse` sends the head
    alone at `prepare()` by default. `aiohttp_private.head_with_first_write` turns it off.
    """
