"""Hostile or broken clients: bad bodies, slow senders, idle crowds, early leavers, tricks.

What a client can do wrong is answered with an OpenAI-shaped 4xx before anything goes
upstream, or bounded by a timeout; a client that leaves cancels its upstream request and
leaves nothing behind (tasks, pool slots, upstream connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from gateway.app_state import ClientTimeouts
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import RunningGateway

from .helpers import (
    SIM,
    Answer,
    assert_openai_error,
    chat,
    eventually,
    fake_settings,
    gateway,
    port_of,
    post,
    raw_exchange,
    request_line,
    request_lines,
    settled,
    sim_settings,
    sim_state,
)


def requests_counted(gw: RunningGateway, code: str, model: str = "other") -> float:
    return gw.metric(
        "gateway_requests_total", team="anonymous", model=model, upstream="none", code=code
    )


# -- bodies -----------------------------------------------------------------------------------

MALFORMED = {
    "truncated": b'{"model": "sim-1", "messages": [',
    "not_an_object": b'[{"model": "sim-1"}]',
    "null": b"null",
    "model_not_a_string": b'{"model": 7, "messages": []}',
    "invalid_utf8": b'{"model": "sim-\xff", "messages": []}',
    "deeply_nested": b'{"model": "sim-1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_json_is_an_openai_shaped_400(name: str) -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, MALFORMED[name])
            line = await request_line(logs)
        assert requests_counted(gw, "400") == 1
        assert sim_state(gw).requests_received == 0
    assert_openai_error(answer, 400, "invalid_request")
    assert (line["end"], line["status"]) == ("rejected", 400)


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
async def test_a_body_over_max_request_bytes_is_413(framing: str) -> None:
    limit = 256 * 1024
    huge = b'{"model": "sim-1", "messages": [{"role": "user", "content": "' + b"a" * limit + b'"}]}'
    async with gateway(sim_settings(max_request_bytes=limit)) as gw:
        data = huge if framing == "content_length" else chunked(huge)
        with capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{gw.base_url}/chat/completions", data=data) as resp,
            ):
                answer = Answer(resp.status, dict(resp.headers), await resp.read())
            line = await request_line(logs)
        assert requests_counted(gw, "413") == 1
        assert sim_state(gw).requests_received == 0
    assert_openai_error(answer, 413, "request_too_large")
    assert (line["end"], line["status"]) == ("rejected", 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_json_body_under_another_content_type_goes_upstream_as_json(
    content_type: str,
) -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, chat(), headers={"Content-Type": content_type})
            line = await request_line(logs)
        received = sim_state(gw).requests[-1]
        assert gw.metric(
            "gateway_requests_total", team="anonymous", model=SIM, upstream="sim", code="200"
        )
    assert answer.status == 200 and answer.events()[-1] == b"[DONE]"
    assert received.headers["Content-Type"] == "application/json"
    assert received.body == chat()  # the body itself is untouched
    assert line["end"] == "completed"


async def test_a_form_body_is_an_openai_shaped_400() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(
                gw,
                b"model=sim-1&stream=true",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            line = await request_line(logs)
        assert requests_counted(gw, "400") == 1
    assert_openai_error(answer, 400, "invalid_request")
    assert line["status"] == 400


async def test_a_gzip_request_body_is_decoded_and_goes_upstream_plain() -> None:
    async with gateway(sim_settings()) as gw:
        answer = await post(gw, gzip.compress(chat()), headers={"Content-Encoding": "gzip"})
        received = sim_state(gw).requests[-1]
    assert answer.status == 200
    assert received.body == chat() and "Content-Encoding" not in received.headers


async def test_a_body_that_does_not_match_its_content_encoding_is_400() -> None:
    async with gateway(sim_settings()) as gw:
        with capture_logs() as logs:
            answer = await post(gw, b"\x00\x00 not gzip", headers={"Content-Encoding": "gzip"})
            line = await request_line(logs)
        assert requests_counted(gw, "400") == 1
        assert sim_state(gw).requests_received == 0
    assert_openai_error(answer, 400, "invalid_request_body")
    assert answer.headers["connection"] == "close"  # the rest of the body cannot be read
    assert (line["end"], line["status"]) == ("rejected", 400)


@pytest.mark.parametrize("path", ["/v1/models", "/healthz"])
async def test_an_unread_body_that_cannot_be_decoded_does_not_break_the_next_request(
    path: str,
) -> None:
    """Found by the fuzz test: a body sent to an endpoint that reads none was decoded by
    aiohttp after the answer, failed, and the connection was dropped under the client's
    next request. The answer now closes the connection itself."""
    async with gateway(sim_settings()) as gw, aiohttp.ClientSession() as session:
        url = gw.url + path
        headers = {"Content-Encoding": "gzip"}
        async with session.get(url, data=b"\x00\x00 not gzip", headers=headers) as first:
            assert first.status == 200
            assert first.headers["Connection"] == "close"
            await first.read()
        async with session.get(url) as second:  # on a new connection, not the dropped one
            assert second.status == 200


# -- slow clients -----------------------------------------------------------------------------


async def drip(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send `data` one byte at a time: a slowloris client."""
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(every_s)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await task


async def test_slowloris_headers_are_cut_by_the_idle_timeout() -> None:
    """A request head that never completes holds a connection no longer than idle_s."""
    async with gateway(sim_settings(), ClientTimeouts(idle_s=0.5)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 400
        with capture_logs() as logs:
            dripping = asyncio.create_task(drip(writer, head, 0.02))  # 8 s to send it all
            async with asyncio.timeout(5):
                closed = await reader.read()  # EOF: the server closed the connection
            await stop(dripping)
        writer.close()
    assert closed == b""
    assert request_lines(logs) == []  # no request ever began: nothing to log or count


async def test_a_slowloris_body_is_408_after_the_body_timeout() -> None:
    async with gateway(sim_settings(), ClientTimeouts(body_s=0.5)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        body = chat()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        writer.write(head)
        with capture_logs() as logs:
            dripping = asyncio.create_task(drip(writer, body, 0.05))
            async with asyncio.timeout(5):
                head, answer = await read_response(reader)
            line = await request_line(logs)
            await stop(dripping)
        writer.close()
        assert requests_counted(gw, "408") == 1
        assert sim_state(gw).requests_received == 0
    assert head.startswith(b"HTTP/1.1 408")
    assert b"\r\nConnection: close\r\n" in head  # the rest of the body never came
    assert orjson.loads(answer)["error"]["code"] == "request_timeout"
    assert (line["end"], line["status"]) == ("rejected", 408)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: its head and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def test_thousands_of_idle_keepalive_connections_are_served_then_closed() -> None:
    """2,000 kept-alive connections sit idle: the gateway still answers, and closes them all
    once they have been idle for idle_s."""
    count = 2000
    async with gateway(sim_settings(), ClientTimeouts(idle_s=2.0)) as gw:
        port = port_of(gw)
        connections = await asyncio.gather(*(keep_alive(port) for _ in range(count)))
        server = gw.runner.server
        assert server is not None and len(server.connections) >= count
        answer = await post(gw, chat())  # served while the crowd waits
        assert answer.status == 200 and answer.events()[-1] == b"[DONE]"
        async with asyncio.timeout(15):
            ends = await asyncio.gather(*(reader.read() for reader, _ in connections))
        for _, writer in connections:
            writer.close()
        await eventually(lambda: not server.connections)
    assert ends == [b""] * count


async def keep_alive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that made one request, got its answer, and stays open, idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    return reader, writer


# -- clients that leave -----------------------------------------------------------------------

#: stage -> (steering, bytes to read before leaving, log status, whether a stream began)
STAGES = {
    "before_the_body_ends": (None, 0, 499),
    "waiting_for_upstream_headers": ({"headers_delay_ms": 5000}, 0, 499),
    "waiting_for_the_first_byte": ({"ttft_ms": 5000}, 0, 499),
    "mid_stream": ({"chunks": 2000, "delay_ms": 5}, 300, 200),
    "during_keepalive_comments": ({"ttft_ms": 5000}, 20, 200),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
async def test_a_client_leaving_at_any_stage_cancels_the_upstream_and_leaks_nothing(
    stage: str,
) -> None:
    steer, read_first, status = STAGES[stage]
    settings = sim_settings(keepalive_comment_s=0.05 if stage.startswith("during") else None)
    async with gateway(settings) as gw:
        state = sim_state(gw)
        tasks_before = len(asyncio.all_tasks())
        body = chat(steer)
        sent = body[:20] if steer is None else body
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        with capture_logs() as logs:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + sent
            )
            await writer.drain()
            if read_first:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(read_first)
            elif steer is not None:
                await state.wait_for(lambda s: s.active_requests == 1)
            else:
                await eventually(lambda: bool(gw.components.lifecycle.running()))
            writer.transport.abort()
            line = await request_line(logs)
        await settled(gw)  # no request task, every pool slot back, the simulator idle
        await eventually(lambda: state.connections_open == 0)  # upstream requests were dropped
        await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before)
        model = "other" if steer is None else SIM
        assert gw.metric("gateway_active_streams", team="anonymous", model=model) == 0
        if steer is not None:
            assert gw.metric("gateway_client_disconnects_total", team="anonymous", model=model) == 1
    assert (line["end"], line["status"]) == ("client_disconnect", status)
    assert state.requests_received == (0 if steer is None else 1)


# -- header and path tricks -------------------------------------------------------------------

SMUGGLING = {
    "cr_in_value": b"X-Evil: a\rInjected: 1",
    "lf_in_value": b"X-Evil: a\nInjected: 1",
    "nul_in_value": b"X-Evil: a\x00b",
    "obs_fold": b"X-Evil: a\r\n Injected: 1",
    "space_before_colon": b"X-Evil : a",
    "two_content_lengths": b"Content-Length: 2\r\nContent-Length: 40",
    "length_and_chunked": b"Transfer-Encoding: chunked\r\nContent-Length: 2",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_header_injection_is_refused_before_anything_goes_upstream(
    upstream: FakeUpstream, name: str
) -> None:
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await raw_exchange(
                port_of(gw),
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + SMUGGLING[name]
                + b"\r\nConnection: close\r\n\r\n{}",
            )
        total = sum(
            sample.value
            for metric in gw.registry.collect()
            if metric.name == "gateway_requests"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert upstream.received == [] and upstream.connections_opened == 0
    assert request_lines(logs) == [] and total == 0  # refused by the HTTP parser: no request


async def test_forwarded_headers_carry_no_client_secret_and_no_nominated_hop_header(
    upstream: FakeUpstream,
) -> None:
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await post(
                gw,
                chat(model="test-1"),
                headers={
                    "Authorization": "Bearer client-secret",
                    "X-Api-Key": "client-secret",
                    "Cookie": "session=client-secret",
                    "Connection": "keep-alive, X-Internal-Route",
                    "X-Internal-Route": "admin",
                    "X-Request-Id": 'abc"; injected=1',
                    "X-Forwarded-Host": "evil.example",
                },
            )
            line = await request_line(logs)
    (seen,) = upstream.received
    forwarded = {k.lower(): v for k, v in seen.headers.items()}
    assert answer.status == 200
    assert "client-secret" not in str(forwarded)
    assert "x-internal-route" not in forwarded
    assert forwarded["host"] == upstream.url.removeprefix("http://")
    assert forwarded["x-request-id"] == line["request_id"] != 'abc"; injected=1'
    assert answer.headers["x-request-id"] == line["request_id"]


CLOSE = b"Connection: close\r\n\r\n"
TRAVERSAL = [
    "/v1/../admin",
    "/v1/%2e%2e/admin",
    "/v1/..%2fadmin",
    "/v1/a/..%2F..%2Fadmin",
    "/v1/%2E%2E%2F%2E%2E%2Fadmin",
    "/v1/./models",
    "/v1/x%00y",
    "/v1/x%0d%0aX-Injected:%201",
]


@pytest.mark.parametrize("path", TRAVERSAL)
async def test_path_traversal_in_the_pass_through_route_is_refused(
    upstream: FakeUpstream, path: str
) -> None:
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await raw_exchange(
                port_of(gw), f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            line = await request_line(logs)
        status = int(answer.split(b" ", 2)[1])
        assert requests_counted(gw, str(status)) == 1
    assert status in (400, 404)  # a path with CR/LF matches no route at all
    body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert upstream.received == []
    assert (line["status"], line["end"]) == (status, "rejected")


#: request target -> the path (decoded) and query the configured upstream must receive
ABSOLUTE = {
    "/v1/http://evil.example/x": ("/v1/http://evil.example/x", ""),
    "/v1//evil.example/x": ("/v1//evil.example/x", ""),
    "/v1/%2F%2Fevil.example/x": ("/v1///evil.example/x", ""),
    "/v1/@evil.example/x": ("/v1/@evil.example/x", ""),
    "http://evil.example/v1/models/x": ("/v1/models/x", ""),
    "/v1/x%3Fadmin=1?keep=a%26b": ("/v1/x?admin=1", "keep=a%26b"),
    "/v1/x%23fragment": ("/v1/x#fragment", ""),
    "/v1/caf%C3%A9": ("/v1/café", ""),
}


@pytest.mark.parametrize("target", sorted(ABSOLUTE))
async def test_absolute_url_tricks_only_ever_reach_the_configured_upstream(
    upstream: FakeUpstream, target: str
) -> None:
    upstream.scripts.append(Script([b'{"ok": true}'], content_type="application/json"))
    async with gateway(fake_settings(upstream.base_url)) as gw:
        with capture_logs() as logs:
            answer = await raw_exchange(
                port_of(gw),
                f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n".encode() + CLOSE,
            )
            line = await request_line(logs)
        assert gw.metric(
            "gateway_requests_total", team="anonymous", model="other", upstream="up0", code="200"
        )
    (seen,) = upstream.received
    assert answer.startswith(b"HTTP/1.1 200")  # served, so by the only upstream there is
    assert (seen.path, seen.query) == ABSOLUTE[target]
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    assert (line["upstream"], line["status"]) == ("up0", 200)


async def test_after_every_trick_the_gateway_still_serves(upstream: FakeUpstream) -> None:
    upstream.scripts.append(Script([b"data: [DONE]\n\n"]))
    async with gateway(fake_settings(upstream.base_url)) as gw:
        for path in [*TRAVERSAL, *ABSOLUTE]:
            await raw_exchange(
                port_of(gw), f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
        answer = await post(gw, chat(model="test-1"))
        await settled(gw)
    assert answer.status == 200
