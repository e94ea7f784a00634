"""Responses API streams are relayed byte for byte (no re-framing, no `[DONE]` added), however
the upstream splits them; requests about a response go to the upstream that created it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import msgspec
import orjson
import pytest
from structlog.testing import capture_logs

from gateway.config import Limits, Settings
from tests.accounting.responses_streams import (
    CORPUS,
    CUT,
    RESPONSE_ID,
    TEXT,
    body,
    message,
    response,
    text_stream,
    usage,
)
from tests.core.conftest import settings_for
from tests.core.test_byte_exact_relay import fetch
from tests.e2e_accounting.helpers import eventually
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import running_gateway
from tests.support.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

REQUEST = {"model": "test-1", "stream": True, "input": "hi"}
#: how each body goes out of the upstream: as its events, byte by byte, in 1 KiB writes
SPLITS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "events": lambda events: events,
    "bytewise": lambda events: [bytes([b]) for b in body(events)],
    "kib": lambda events: [body(events)[i : i + 1024] for i in range(0, len(body(events)), 1024)],
}


def cases() -> list[tuple[str, str]]:
    small = [name for name, events in CORPUS.items() if len(body(events)) < 10_000]
    return [
        (name, split) for name in CORPUS for split in SPLITS if split != "bytewise" or name in small
    ]


@pytest.mark.parametrize(("name", "split"), cases())
async def test_client_bytes_equal_upstream_bytes(
    upstream: FakeUpstream, name: str, split: str
) -> None:
    events = CORPUS[name]
    upstream.scripts.append(Script(SPLITS[split](events)))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        status, headers, received = await fetch(f"{gw.base_url}/responses", REQUEST)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    sent = body(events)
    if events is CUT:  # the one stream the gateway ends itself: the upstream's bytes come first
        # (then its error event; a blank line first when the last read did not show the end of
        # a frame: it dispatches nothing)
        added = received[len(sent) :].removeprefix(b"\n\n")
        assert received.startswith(sent) and added.startswith(b"event: error\n")
    else:
        assert received == sent
    assert b"[DONE]" not in received


# -- the upstream that created a response -------------------------------------------------------


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as up:
        yield up


def stored() -> Script:
    answer = response("completed", [message("stored")])
    return Script([orjson.dumps(answer)], content_type="application/json")


def refused() -> Script:
    """What the first upstream answers to the create: a 503, so the route fails over."""
    return Script([b'{"error":{"message":"busy"}}'], status=503, content_type="application/json")


async def request(session: aiohttp.ClientSession, method: str, url: str, doc: object = None) -> int:
    data = None if doc is None else orjson.dumps(doc)
    async with session.request(method, url, data=data) as resp:
        await resp.read()
        return resp.status


async def test_requests_about_a_response_go_to_the_upstream_that_created_it(
    upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.scripts.append(refused())
    second.scripts += [Script(TEXT)] + [stored() for _ in range(5)]
    async with running_gateway(settings_for(upstream.base_url, second.base_url)) as gw:
        url = f"{gw.base_url}/responses"
        async with aiohttp.ClientSession() as session:
            assert await request(session, "POST", url, REQUEST) == 200  # created on `second`
            for method, path in [
                ("GET", f"/{RESPONSE_ID}"),
                ("GET", f"/{RESPONSE_ID}/input_items"),
                ("POST", f"/{RESPONSE_ID}/cancel"),
                ("DELETE", f"/{RESPONSE_ID}"),
            ]:
                assert await request(session, method, url + path) == 200, path
            follow_up = {"model": "test-1", "input": "and?", "previous_response_id": RESPONSE_ID}
            assert await request(session, "POST", url, follow_up) == 200
        assert len(gw.components.responses) == 1
    assert [r.path for r in upstream.received] == ["/v1/responses"]  # only the refused create
    assert [(r.method, r.path) for r in second.received] == [
        ("POST", "/v1/responses"),
        ("GET", f"/v1/responses/{RESPONSE_ID}"),
        ("GET", f"/v1/responses/{RESPONSE_ID}/input_items"),
        ("POST", f"/v1/responses/{RESPONSE_ID}/cancel"),
        ("DELETE", f"/v1/responses/{RESPONSE_ID}"),
        ("POST", "/v1/responses"),
    ]


async def test_a_response_the_gateway_never_saw_goes_to_the_routes_first_upstream(
    upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.scripts.append(stored())
    async with (
        running_gateway(settings_for(upstream.base_url, second.base_url)) as gw,
        aiohttp.ClientSession() as session,
    ):
        assert await request(session, "GET", f"{gw.base_url}/responses/resp_unknown") == 200
    assert [r.path for r in upstream.received] == ["/v1/responses/resp_unknown"]
    assert second.received == []


async def test_a_whole_answers_id_is_learnt_too(
    upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.scripts.append(refused())
    second.scripts += [stored(), stored()]
    async with (
        running_gateway(settings_for(upstream.base_url, second.base_url)) as gw,
        aiohttp.ClientSession() as session,
    ):
        doc = {"model": "test-1", "input": "hi"}
        assert await request(session, "POST", f"{gw.base_url}/responses", doc) == 200
        assert await request(session, "GET", f"{gw.base_url}/responses/{RESPONSE_ID}") == 200
    assert [r.method for r in second.received] == ["POST", "GET"]


async def test_replicas_sharing_redis_limits_share_where_responses_live(
    upstream: FakeUpstream, second: FakeUpstream, redis_server: RedisServer
) -> None:
    """Created through one gateway, asked about through another: the second finds the
    upstream in Redis (one SET per response), not in its own memory."""
    upstream.scripts.append(refused())
    second.scripts += [Script(TEXT), stored()]
    base = settings_for(upstream.base_url, second.base_url)
    shared: Settings = msgspec.structs.replace(
        base, limits=Limits(backend="redis", redis_url=redis_server.url)
    )
    async with (
        running_gateway(shared) as one,
        running_gateway(shared) as two,
        aiohttp.ClientSession() as session,
    ):
        assert await request(session, "POST", f"{one.base_url}/responses", REQUEST) == 200
        assert await request(session, "GET", f"{two.base_url}/responses/{RESPONSE_ID}") == 200
        assert len(two.components.responses) == 0
    assert [r.method for r in second.received] == ["POST", "GET"]


async def test_the_drain_cuts_a_responses_stream_with_the_apis_error_event(
    upstream: FakeUpstream,
) -> None:
    """SIGTERM's grace ran out (Lifecycle.cut): the stream ends with `event: error`, numbered
    after the last event relayed, as every other way the gateway ends a Responses stream."""
    upstream.scripts.append(Script(TEXT[:5], then="hang"))
    async with (
        running_gateway(settings_for(upstream.base_url)) as gw,
        aiohttp.ClientSession() as session,
        session.post(f"{gw.base_url}/responses", data=orjson.dumps(REQUEST)) as resp,
    ):
        received = b""
        while received.count(b"\n\n") < 5:
            received += await resp.content.readany()
        assert gw.components.lifecycle.cut() == 1
        received += await resp.content.read()
    assert received.startswith(body(TEXT[:5]))
    added = received[len(body(TEXT[:5])) :]
    assert added.startswith(b"event: error\ndata: ")
    data = orjson.loads(added.split(b"data: ", 1)[1])
    assert (data["type"], data["code"], data["sequence_number"]) == ("error", "gateway_shutdown", 5)


async def test_an_event_past_the_meters_cap_is_relayed_whole_and_counted_as_an_error(
    upstream: FakeUpstream,
) -> None:
    """A 9 MiB terminal event (over MAX_EVENT_BYTES): the client gets every byte, the meter
    skips it with a counted, logged error, and the stream is not taken for a truncated one."""
    events = text_stream(["Hi"], used=usage(3, 1), instructions="x" * (9 << 20))
    events[:2] = text_stream(["Hi"], used=None)[:2]  # a small response.created, in_progress
    sent = body(events)
    upstream.scripts.append(Script([sent[i : i + 65536] for i in range(0, len(sent), 65536)]))
    with capture_logs() as logs:
        async with running_gateway(settings_for(upstream.base_url)) as gw:
            status, _, received = await fetch(f"{gw.base_url}/responses", REQUEST)
            assert (status, received == sent) == (200, True)
            await eventually(lambda: any(e.get("event") == "request" for e in logs))
            assert gw.metric("gateway_sse_decode_errors_total", model="test-*") == 1
    (line,) = [e for e in logs if e.get("event") == "request"]
    assert (line["end"], line["completion_tokens"], line["usage_source"]) == (
        "completed",
        1,
        "estimate",
    )
    assert [e["events"] for e in logs if e.get("event") == "sse_event_too_large"] == [1]


async def test_usage_inject_leaves_a_responses_request_body_untouched(
    upstream: FakeUpstream,
) -> None:
    """`include_usage` is chat's: the Responses API refuses it, and always sends its usage."""
    upstream.scripts.append(Script(TEXT))
    raw = orjson.dumps(REQUEST)
    async with (
        running_gateway(settings_for(upstream.base_url, usage="inject")) as gw,
        aiohttp.ClientSession() as session,
        session.post(f"{gw.base_url}/responses", data=raw) as resp,
    ):
        assert await resp.read() == body(TEXT)
    assert upstream.received[0].body == raw
