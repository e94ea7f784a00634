"""The SSE fast path: after the first chunk, the relay writes each upstream piece from inside
the upstream's read callback, and a full client buffer pauses the upstream's reading."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct

import msgspec
import orjson
import pytest

from gateway import upstream_http
from gateway.config import Settings
from gateway.ledger import Ledger
from gateway.meter import StreamMeter
from gateway.relay_tap import Tap
from tests.core.conftest import settings_for
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"
BODY = {"model": "test-1", "stream": True, "messages": []}


async def test_paced_events_each_reach_the_client_before_the_next_is_sent(
    upstream: FakeUpstream,
) -> None:
    """Every event the upstream sends reaches the client whole and in order while the
    upstream is still streaming: none waits for a later one (the upstream sends 40 and then
    nothing more, yet the client has all 40), and a finished stream arrives byte for byte.
    (What the fast path saves per event, CPU, is measured in bench/.)"""
    events = [EVENT.replace(b"tok", b"tok%02d" % i) for i in range(40)]
    upstream.scripts += [
        Script(events, pause_s=0.002, then="hang"),
        Script([*events, DONE], pause_s=0.002),
    ]
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        reader, writer = await _request(gw.url)
        try:
            got = await _read_body_until(reader, len(b"".join(events)))
        finally:
            writer.close()
        finished = await _exchange(gw.url, pause_s=0)
    assert got == b"".join(events)
    assert _dechunk(finished.partition(b"\r\n\r\n")[2]) == b"".join([*events, DONE])


async def test_a_client_that_stops_reading_pauses_the_upstream_and_still_gets_every_byte(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 32_000 + b'"}}]}\n\n'
    pieces = [big] * 256 + [DONE]  # 8 MiB: more than the socket buffers hold
    upstream.scripts.append(Script(pieces))
    pauses = 0
    pause_reading = upstream_http.Response.pause_reading

    def counted(self: upstream_http.Response) -> None:
        nonlocal pauses
        pauses += 1
        pause_reading(self)

    monkeypatch.setattr(upstream_http.Response, "pause_reading", counted)
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        raw = await _exchange(gw.url, pause_s=0.5)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert _dechunk(chunked) == b"".join(pieces)
    assert pauses > 0


#: how a request ends: what the upstream does, and how long the client reads (None: to the end)
ENDINGS = {
    "completed": (Script([EVENT] * 5 + [DONE], pause_s=0.002), None),
    "upstream_breaks_off": (Script([EVENT] * 5, pause_s=0.002, then="abort"), None),
    "client_leaves": (Script([EVENT] * 5, pause_s=0.002, then="hang"), 0.05),
    "upstream_answers_500": (
        Script([b'{"error": {"message": "down"}}'], status=500, content_type="application/json"),
        None,
    ),
    # keep-alive comments went out, then the upstream's silence ends the stream with an error
    "upstream_silent_after_comments": (Script([EVENT], headers_delay_s=0.4), None),
}


def _settings_for_ending(ending: str, base_url: str) -> Settings:
    settings = settings_for(base_url)
    if ending != "upstream_silent_after_comments":
        return settings
    up = msgspec.structs.replace(settings.upstreams["up0"], read_idle_timeout_s=0.1)
    route = msgspec.structs.replace(settings.routes[0], keepalive_comment_s=0.02)
    return msgspec.structs.replace(settings, upstreams={"up0": up}, routes=(route,))


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_a_finished_request_leaves_nothing_for_the_garbage_collector(
    upstream: FakeUpstream, ending: str
) -> None:
    """However a request ends, its tap, meter, ledger and upstream answer are freed by
    reference counting: only the garbage collector could free a reference cycle among them
    (an exception's traceback holds the frames it went through), and a collection stops
    every stream in flight."""
    script, read_for_s = ENDINGS[ending]
    requests = 3
    upstream.scripts.extend([Script([EVENT, DONE])] + [script] * requests)

    def alive() -> int:
        kinds = (Tap, upstream_http.Response, StreamMeter, Ledger)
        return sum(isinstance(o, kinds) for o in gc.get_objects())

    async with running_gateway(_settings_for_ending(ending, upstream.base_url)) as gw:
        await _exchange(gw.url, pause_s=0)  # what the first request sets up for good
        gc.collect()
        gc.disable()
        try:
            before = alive()
            for _ in range(requests):
                if read_for_s is None:
                    assert (await _exchange(gw.url, pause_s=0)).startswith(b"HTTP/1.1 ")
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(read_for_s):
                            await _exchange(gw.url, pause_s=0)
            await asyncio.sleep(0.1)  # the meter's batch, the requests' ends have run
            assert alive() == before
        finally:
            gc.enable()


async def test_the_head_reaches_the_client_together_with_the_first_event(
    upstream: FakeUpstream,
) -> None:
    """The response head is not sent alone: the first TCP segment the client receives holds
    the head and the first event whole (the client's own kernel counts the segments; on
    loopback one write is one segment), the rest follows."""
    pieces = [EVENT, DONE]
    upstream.scripts.append(Script(pieces, pause_s=0.5))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        reader, writer = await _request(gw.url)
        try:
            async with asyncio.timeout(20):
                first = await reader.read(1 << 16)
                segments_before_done = _data_segments_received(writer)
                rest = await reader.read()
        finally:
            writer.close()
    assert segments_before_done == 1
    head, _, body = first.partition(b"\r\n\r\n")
    # the gateway's head (the fake upstream's own does not say X-Accel-Buffering)
    assert head.startswith(b"HTTP/1.1 200") and b"X-Accel-Buffering" in head
    assert body == b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    assert _dechunk(body + rest) == b"".join(pieces)


async def _request(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection with one streamed request sent on it."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = orjson.dumps(BODY)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload)
    )
    return reader, writer


def _data_segments_received(writer: asyncio.StreamWriter) -> int:
    """Linux's count of TCP segments with data this connection received (tcp_info's
    tcpi_data_segs_in)."""
    info = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= _TCPI_DATA_SEGS_IN + 4, "a kernel without tcpi_data_segs_in (Linux 4.6)"
    count: int = struct.unpack_from("I", info, _TCPI_DATA_SEGS_IN)[0]
    return count


#: the offset of tcpi_data_segs_in in struct tcp_info (linux/tcp.h, stable since Linux 4.6)
_TCPI_DATA_SEGS_IN = 152


async def _read_body_until(reader: asyncio.StreamReader, size: int) -> bytes:
    """Read until the (chunked) body holds `size` bytes in complete chunks; returns them."""
    raw = b""
    async with asyncio.timeout(20):
        while len(body := _dechunk(raw.partition(b"\r\n\r\n")[2], partial=True)) < size:
            piece = await reader.read(1 << 16)
            assert piece, f"the connection closed after {len(body)} body bytes"
            raw += piece
    return body


async def _exchange(url: str, pause_s: float) -> bytes:
    """One streamed request over a raw connection; nothing is read for `pause_s` at first."""
    reader, writer = await _request(url)
    await asyncio.sleep(pause_s)  # reading nothing meanwhile: the gateway's writes back up
    try:
        async with asyncio.timeout(20):
            return await reader.read()
    finally:
        writer.close()


def _dechunk(data: bytes, partial: bool = False) -> bytes:
    """A chunked body's bytes; with `partial`, those of its complete chunks so far."""
    out = bytearray()
    while True:
        size_line, crlf, rest = data.partition(b"\r\n")
        if partial and (not crlf or len(rest) < int(size_line, 16) + 2):
            return bytes(out)
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        data = rest[size + 2 :]
