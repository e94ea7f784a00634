"""The simulator's hold on one client connection: pausing while watching it, and ending it.

Every pause goes through `pause`, which notices a client that left even when the server does
not cancel handlers on disconnect (aiohttp's default), so a stalled or slow handler never
outlives its client by more than `WATCH_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import web

#: how often a long pause looks at the connection
WATCH_INTERVAL_S = 0.05


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def pause(request: web.BaseRequest, seconds: float) -> None:
    """Sleep `seconds`; raise ConnectionResetError as soon as the client has gone."""
    if seconds <= 0:
        return
    if seconds <= WATCH_INTERVAL_S:
        await asyncio.sleep(seconds)
        return
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        if client_gone(request):
            raise ConnectionResetError("the client went away")
        await asyncio.sleep(min(left, WATCH_INTERVAL_S))


def drop(request: web.BaseRequest) -> None:
    """Close the connection mid-answer: what was written still arrives, then the TCP FIN, so a
    client sees exactly the chunks sent before the fault, then a body that never completes."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def reset(request: web.BaseRequest) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed server or a proxy does.

    A RST also discards what the client has not read yet, so use it only where nothing was
    written (`drop` is for mid-answer faults).
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
