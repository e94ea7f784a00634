"""Slow clients: their backpressure reaches their own upstream read, and nobody else's.

The gateway awaits every write to the client, so a client that reads slowly makes the gateway
read its upstream slowly; nothing queues in between. Measured from outside: the gateway runs
as `python -m gateway` and its resident memory (VmRSS) is read while a client reads one byte
every 10 ms from a 125 MiB stream and 200 fast streams run beside it. A client that stops
reading entirely is cut off after `write_stall_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson

from gateway.config import Limits
from tests.deploy.gateway_process import GatewayProcess, gateway_process
from tests.support.gateway import running_gateway

from .held_upstream import HeldUpstream, held_upstream
from .helpers import (
    TEAM,
    TEAM_KEY,
    TEST_LABEL,
    TEST_MODEL,
    UPSTREAM_KEY,
    Reply,
    auth,
    bulk_session,
    chat,
    eventually,
    post,
    team,
    upstream_settings,
)

FAST_STREAMS, FAST_CHUNKS = 200, 100
SLOW_CHUNKS, SLOW_PAD = 16000, 8192  # 125 MiB: more than any kernel buffers hold
SLOW_BYTES = SLOW_CHUNKS * SLOW_PAD
#: how much the gateway's memory may grow while the slow stream is open beside the fast ones
RSS_BOUND = 24 * 1024 * 1024
MiB = 1024 * 1024


def gateway_config(upstream: HeldUpstream) -> dict[str, Any]:
    return {
        "shutdown_grace_s": 1,
        "upstreams": {"up": {"base_url": upstream.base_url, "api_key": UPSTREAM_KEY}},
        "routes": [{"models": [TEST_LABEL], "upstreams": ["up"], "tokenizer": "chunks"}],
        "teams": [{"name": TEAM, "keys": [TEAM_KEY]}],
    }


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def rss(gateway: GatewayProcess) -> int:
    return await asyncio.to_thread(_rss_bytes, gateway.process.pid)


class RssPeak:
    """Samples a process's VmRSS every 50 ms while the block runs; `peak` is the highest."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self._gateway = gateway
        self.peak = 0

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, await rss(self._gateway))
            await asyncio.sleep(0.05)

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sample())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.peak = max(self.peak, await rss(self._gateway))


def raw_request(body: dict[str, Any], key: str = TEAM_KEY) -> bytes:
    payload = orjson.dumps(body)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


@dataclass
class Progress:
    """What a raw slow client has read so far, and whether the gateway ended its stream."""

    read: int = 0
    eof: bool = False


@asynccontextmanager
async def slow_client(
    url: str, body: dict[str, Any], read_every_s: float | None
) -> AsyncIterator[Progress]:
    """A raw socket with a 4 KiB receive buffer that sends `body`, then reads one byte every
    `read_every_s` (or nothing at all, with None) until the block ends."""
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    progress = Progress()

    async def trickle() -> None:
        while read_every_s is not None:
            if not await loop.sock_recv(sock, 1):
                progress.eof = True
                return
            progress.read += 1
            await asyncio.sleep(read_every_s)

    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, raw_request(body))
        task = asyncio.create_task(trickle())
        try:
            yield progress
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        sock.close()


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body, decoded (the gateway frames what it relays as it reads it)."""
    out, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


async def fast_stream(session: aiohttp.ClientSession, url: str) -> float:
    """One whole fast stream; checks it is complete and returns how long it took."""
    started = time.perf_counter()
    reply: Reply = await post(session, url, chat(TEST_MODEL, stream=True, chunks=FAST_CHUNKS))
    assert reply.status == 200
    assert reply.body.count(b'"content":"tok"') == FAST_CHUNKS
    assert reply.body.endswith(b"data: [DONE]\n\n")
    return time.perf_counter() - started


async def fast_streams(url: str) -> list[float]:
    async with bulk_session() as session:
        session.headers.update(auth())
        return await asyncio.gather(*(fast_stream(session, url) for _ in range(FAST_STREAMS)))


async def test_a_slow_reader_holds_bounded_memory_while_200_fast_streams_complete(
    tmp_path: Path,
) -> None:
    slow_body = chat(TEST_MODEL, stream=True, chunks=SLOW_CHUNKS, pad=SLOW_PAD, tag="slow")
    async with held_upstream() as up, gateway_process(gateway_config(up), tmp_path) as gw:
        up.release.set()
        alone = await fast_streams(gw.url)  # warm-up: the memory 200 streams need
        baseline = await rss(gw)
        async with slow_client(gw.url, slow_body, read_every_s=0.01) as progress:
            await eventually(lambda: up.sent.get("slow", 0) > 0)
            peak = RssPeak(gw)
            async with peak.watching():
                durations = await fast_streams(gw.url)
            pushed = up.sent["slow"]
            assert not progress.eof, "the slow stream is still open, its client still reading"
        print(
            f"\nbackpressure: gateway RSS {baseline / MiB:.1f} MiB after warm-up, peak"
            f" {peak.peak / MiB:.1f} MiB with a 1 B/10 ms reader beside {FAST_STREAMS} fast"
            f" streams (median {statistics.median(durations) * 1000:.0f} ms, max"
            f" {max(durations) * 1000:.0f} ms; without it median"
            f" {statistics.median(alone) * 1000:.0f} ms); the slow stream's upstream could push"
            f" {pushed / MiB:.1f} of {SLOW_BYTES / MiB:.1f} MiB, its client read {progress.read} B"
        )
        assert peak.peak - baseline < RSS_BOUND
        assert pushed < SLOW_BYTES / 2  # the upstream is held back, not drained into memory


async def test_a_client_that_stops_reading_is_cut_after_the_write_stall_timeout(
    logs: list[MutableMapping[str, Any]],
) -> None:
    stalled = chat(TEST_MODEL, stream=True, chunks=SLOW_CHUNKS, pad=SLOW_PAD, tag="stalled")
    limits = Limits(write_stall_timeout_s=0.3)
    async with held_upstream() as up:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url, team(), limits=limits)) as gw:
            async with slow_client(gw.url, stalled, read_every_s=None):
                await eventually(
                    lambda: any(entry.get("event") == "request" for entry in logs), timeout_s=5
                )
            (line,) = [entry for entry in logs if entry.get("event") == "request"]
            assert line["end"] == "client_disconnect"
            assert line["status"] == 200
            disconnects = gw.metric("gateway_client_disconnects_total", team=TEAM, model=TEST_LABEL)
            assert disconnects == 1
            assert up.sent["stalled"] < SLOW_BYTES / 2


async def test_a_client_pausing_longer_than_the_upstream_idle_timeout_still_gets_it_all(
    logs: list[MutableMapping[str, Any]],
) -> None:
    """While the gateway holds the upstream back for a slow client, the upstream is not idle:
    its read timeout only counts the upstream's own silence."""
    chunks, pad = 4000, 8192  # 32 MiB: the kernel buffers fill and the gateway must hold
    body = chat(TEST_MODEL, stream=True, chunks=chunks, pad=pad, tag="paused")
    async with held_upstream() as up:
        up.release.set()
        settings = upstream_settings(up.base_url, team(), limits=Limits(write_stall_timeout_s=10))
        upstream = msgspec.structs.replace(settings.upstreams["up"], read_idle_timeout_s=0.3)
        settings = msgspec.structs.replace(settings, upstreams={"up": upstream})
        async with running_gateway(settings) as gw:
            loop = asyncio.get_running_loop()
            host, port = gw.url.removeprefix("http://").split(":")
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, int(port)))
                await loop.sock_sendall(sock, raw_request(body))
                await eventually(lambda: up.sent.get("paused", 0) > 0)
                await asyncio.sleep(1.5)  # five idle timeouts long, reading nothing
                assert up.sent["paused"] < chunks * pad / 2  # held back, not finished
                received = bytearray()
                while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                    piece = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
                    assert piece, "the gateway closed the stream"
                    received += piece
            await eventually(lambda: any(entry.get("event") == "request" for entry in logs))
        head, _, chunked = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
        assert dechunk(chunked).count(b"x" * pad) == chunks
        (line,) = [entry for entry in logs if entry.get("event") == "request"]
        assert line["end"] == "completed", line
