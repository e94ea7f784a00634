"""The client's answer: its head, prepared once the upstream answered (or a keep-alive comment
is due), with the upstream's status and headers, the limits' headers and, for a stream, the SSE
headers of the contract. A whole (non-SSE) 2xx answer keeps the upstream's Content-Length, and
the relay writes exactly that many bytes; everything else goes out chunked.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .aiohttp_private import head_with_first_write
from .context import RequestContext
from .upstream import ResponseHeaders

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
    else:
        resp.content_length = _kept_length(status, headers)
    ctx.sent_status = status
    await resp.prepare(request)
    return resp


def _kept_length(status: int, headers: Mapping[str, str]) -> int | None:
    """The upstream's Content-Length, for a whole 2xx answer with a body that is not SSE."""
    if not isinstance(headers, ResponseHeaders) or not 200 <= status < 300 or status == 204:
        return None
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        return None
    return headers.declared_length


@head_with_first_write
class HeadWithFirstWrite(web.StreamResponse):
    """A streamed answer whose head waits for the first body write and leaves in the same
    `transport.write`: one TCP segment and one system call less per request.

    aiohttp buffers a prepared head and coalesces it with the first write when a private class
    attribute is off, as it is for its own `web.Response`; a `StreamResponse` sends the head
    alone at `prepare()` by default. `aiohttp_private.head_with_first_write` turns it off.
    """
