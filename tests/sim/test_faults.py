"""Each `fault` does what its name says, streamed and (where it applies) not."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from yarl import URL

from gateway.sim import RunningSim

from .helpers import chat, o200k, sse_data, sse_json


def stream_body(fault: str | None = None, **sim: Any) -> dict[str, Any]:
    if fault is not None:
        sim["fault"] = fault
    return chat(stream=True, sim=sim)


async def read_until_error(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    received = bytearray()
    try:
        async for data in resp.content.iter_any():
            received += data
    except aiohttp.ClientError as exc:
        return bytes(received), exc
    return bytes(received), None


async def read_for(resp: aiohttp.ClientResponse, seconds: float) -> bytes:
    """What arrives within `seconds`, which must run out before the body ends."""
    received = bytearray()
    with pytest.raises(TimeoutError):  # noqa: PT012 (the timeout is raised by the async with)
        async with asyncio.timeout(seconds):
            async for data in resp.content.iter_any():
                received += data
    return bytes(received)


async def test_reset_before_headers_drops_the_connection(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    url = sim.base_url + "/chat/completions"
    with pytest.raises(aiohttp.ClientConnectionError):
        await session.post(url, json=stream_body("reset_before_headers"))
    assert sim.state.requests_received == 1


async def test_reset_before_headers_is_a_connection_error_for_the_sdk(
    openai_client: AsyncOpenAI,
) -> None:
    with pytest.raises(openai.APIConnectionError):
        await openai_client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"sim": {"fault": "reset_before_headers"}},
        )


async def test_reset_mid_stream_cuts_after_fail_after_chunks(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("reset_mid_stream", fail_after=2)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)

    assert isinstance(error, aiohttp.ClientPayloadError)
    events = [orjson.loads(d) for d in sse_data(received)]
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""},
        {"content": "The"},
        {"content": " quick"},
    ]


async def test_reset_mid_body_of_a_whole_answer(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = chat(sim={"fault": "reset_mid_stream"})
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_stall_goes_silent_and_ends_when_the_client_leaves(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("stall", fail_after=1)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        await resp.content.readuntil(b"\n\n")  # the role chunk
        assert b'"content":"The"' in await resp.content.readuntil(b"\n\n")
        assert await read_for(resp, 0.3) == b""
        assert sim.state.active_requests == 1
    resp.close()

    async with asyncio.timeout(1):
        await sim.state.wait_for(lambda s: s.active_requests == 0 and s.connections_open == 0)


async def test_stall_of_a_whole_answer_sends_headers_only(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = chat(sim={"fault": "stall"})
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert await read_for(resp, 0.2) == b""
    async with asyncio.timeout(1):
        await sim.state.wait_for(lambda s: s.active_requests == 0)


async def test_html_500(session: aiohttp.ClientSession, sim: RunningSim) -> None:
    async with session.post(sim.base_url + "/chat/completions", json=stream_body("html_500")) as r:
        assert r.status == 500
        assert r.content_type == "text/html"
        assert (await r.read()).startswith(b"<html>")


async def test_invalid_json_spoils_one_event_and_the_stream_goes_on(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("invalid_json", fail_after=1, chunks=3)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        data = sse_data(await resp.read())

    assert data[-1] == b"[DONE]"
    broken = []
    for d in data[:-1]:
        try:
            orjson.loads(d)
        except orjson.JSONDecodeError:
            broken.append(d)
    assert len(broken) == 1
    assert data.index(broken[0]) == 2  # after the role chunk and one content chunk
    assert len(data) == 1 + 1 + 3 + 1 + 1  # role, broken, content, finish, [DONE]


async def test_invalid_json_whole_answer_is_not_json(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = chat(sim={"fault": "invalid_json"})
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await resp.read())


async def test_no_done_ends_the_body_cleanly_without_done(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("no_done", chunks=2)
    body["stream_options"] = {"include_usage": True}
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        data = sse_data(await resp.read())

    assert b"[DONE]" not in data
    assert orjson.loads(data[-1])["usage"]["completion_tokens"] == 2


async def test_big_line_sends_one_data_line_of_big_bytes(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("big_line", fail_after=1, chunks=2)
    body["stream_options"] = {"include_usage": True}
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        raw = await resp.read()

    lines = raw.split(b"\n\n")
    big = [line for line in lines if len(line) > 1000]
    assert [len(line) for line in big] == [2 * 1024 * 1024]
    events = sse_json(raw)
    big_text = events[2]["choices"][0]["delta"]["content"]
    assert set(big_text) == {"x"}
    # the two pieces are a token each; the big chunk counts what the gateway counts for it
    assert events[-1]["usage"]["completion_tokens"] == 2 + o200k(big_text)


async def test_big_line_size_is_steerable(session: aiohttp.ClientSession, sim: RunningSim) -> None:
    body = stream_body("big_line", big_bytes=70_000)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        raw = await resp.read()

    assert max(len(line) for line in raw.split(b"\n\n")) == 70_000


async def test_redirect_points_elsewhere(session: aiohttp.ClientSession, sim: RunningSim) -> None:
    url = sim.base_url + "/chat/completions"
    async with session.post(url, json=stream_body("redirect"), allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    async with session.get(resp.url.join(URL(location))) as target:
        assert target.status == 200
        assert (await target.json())["object"] == "sim.redirected"


async def test_gzip_encodes_a_whole_answer(sim: RunningSim) -> None:
    body = chat(sim={"fault": "gzip", "chunks": 2})
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw_session,
        raw_session.post(sim.base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        answer = orjson.loads(gzip.decompress(await resp.read()))
    assert answer["choices"][0]["message"]["content"] == "The quick"


async def test_gzip_answer_reads_through_the_sdk(openai_client: AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"sim": {"fault": "gzip", "chunks": 1}},
    )
    assert answer.choices[0].message.content == "The"


async def test_crlf_ends_every_line_with_crlf(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    async with session.post(sim.base_url + "/chat/completions", json=stream_body("crlf")) as resp:
        raw = await resp.read()

    assert raw.count(b"\n") == raw.count(b"\r\n") > 0
    assert len(sse_json(raw.replace(b"\r\n", b"\n"))) == 1 + 16 + 1


async def test_crlf_stream_reads_through_the_sdk(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"fault": "crlf", "chunks": 3}},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "The quick brown"


async def test_split_writes_fragments_cut_inside_utf8_characters(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("split", chunks=4)
    reads: list[bytes] = []
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        async for data in resp.content.iter_any():
            reads.append(data)

    events = sse_json(b"".join(reads))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "Ünïcödé café naïve résumé"
    assert len(reads) > len(events) + 1
    assert any(not _is_utf8(r) for r in reads), "no read ended inside a character"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


async def test_split_stream_reads_through_the_sdk(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"fault": "split", "text": "日本語 🙂 ok"}},
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "日本語 🙂 ok"


async def test_error_event_ends_the_stream_and_the_sdk_raises(
    session: aiohttp.ClientSession, sim: RunningSim, openai_client: AsyncOpenAI
) -> None:
    body = stream_body("error_event", fail_after=2)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        data = sse_data(await resp.read())
    assert len(data) == 4  # role, 2 content, the error; no [DONE]
    assert orjson.loads(data[-1])["error"]["code"] == "sim_error_event"

    stream = await openai_client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"fault": "error_event", "fail_after": 2}},
    )
    with pytest.raises(openai.APIError, match="injected error event"):
        async for _ in stream:
            pass


async def test_fault_past_the_last_chunk_strikes_before_the_finish(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body("error_event", fail_after=99, chunks=2)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        data = sse_data(await resp.read())
    assert len(data) == 4  # role, 2 content, the error


async def test_status_answers_an_openai_error_with_retry_after(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    body = stream_body(status=429, retry_after=2)
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded"


async def test_status_without_retry_after(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await openai_client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"sim": {"status": 503}},
        )
    assert caught.value.status_code == 503
    assert "retry-after" not in caught.value.response.headers


async def test_status_applies_to_embeddings(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await openai_client.embeddings.create(
            model="sim-embed", input="x", extra_body={"sim": {"status": 429}}
        )


async def test_delays_hold_at_least_as_long_as_asked(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    # lower bounds only: how fast the machine is belongs to the benchmarks
    body = stream_body(headers_delay_ms=100, ttft_ms=100, delay_ms=50, chunks=3)
    started = time.monotonic()
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        headers_at = time.monotonic()
        first = await resp.content.readuntil(b"\n\n")
        first_at = time.monotonic()
        await resp.read()
        done_at = time.monotonic()

    assert b'"role":"assistant"' in first
    assert headers_at - started >= 0.1
    assert first_at - headers_at >= 0.1
    assert done_at - first_at >= 0.1  # two gaps between three content chunks
