"""A tiny HTTP CONNECT proxy on 127.0.0.1, in front of an upstream: it records each CONNECT
(its authority and Proxy-Authorization) and pipes bytes both ways once it answered 200, or
answers `refuse` (a status line such as "407 Proxy Authentication Required") instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TunnelProxy:
    """The proxy's settings and what it saw."""

    refuse: str | None = None
    port: int = 0
    connects: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, authority, _ = request_line.split(" ")
            assert method == "CONNECT", request_line
            self.connects.append(authority)
            auth = [
                v.strip()
                for k, _, v in (x.partition(":") for x in lines)
                if k.lower() == "proxy-authorization"
            ]
            self.authorizations.append(auth[0] if auth else None)
            if self.refuse is not None:
                writer.write(f"HTTP/1.1 {self.refuse}\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
                return
            host, _, port = authority.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def tunnel_proxy(refuse: str | None = None) -> AsyncIterator[TunnelProxy]:
    proxy = TunnelProxy(refuse)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        proxy.tasks.add(task)
        await proxy.on_connect(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for task in proxy.tasks:
            task.cancel()
        await asyncio.gather(*proxy.tasks, return_exceptions=True)
        await server.wait_closed()
