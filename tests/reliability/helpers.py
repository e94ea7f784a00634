"""What the reliability tests share: a gateway in front of the simulator, raw HTTP, log lines.

Every fault test checks three things: what the client got, what the metrics counted and what
the one canonical log line (event "request") says. The log line is written after the last
byte went to the client, so tests wait for it (`request_line`), bounded in time.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import orjson
from prometheus_client import CollectorRegistry

from gateway.app import SIM_RUNNERS
from gateway.app_state import ClientTimeouts
from gateway.config import Listen, Route, Settings, SimulatorSettings, Upstream
from gateway.server import bound_port, start_server
from gateway.sim import SIM_STATE, SimState
from tests.support.gateway import RunningGateway

LogEvent = MutableMapping[str, Any]
MESSAGES = [{"role": "user", "content": "hi"}]
#: the label of the route every `sim-*` model matches
SIM = "sim-*"


def sim_settings(
    *,
    read_idle_timeout_s: float = 5.0,
    keepalive_comment_s: float | None = None,
    max_connections: int = 8,
    chunks: int = 4,
    **settings: Any,
) -> Settings:
    """The built-in simulator behind `sim-*`, fast by default; `keepalive_comment_s` on it."""
    upstream = Upstream(
        simulator=SimulatorSettings(chunks=chunks, delay_ms=0, ttft_ms=0),
        read_idle_timeout_s=read_idle_timeout_s,
        max_connections=max_connections,
        pool_timeout_s=1.0,
    )
    route = Route(
        models=(SIM,),
        upstreams=("sim",),
        tokenizer="chunks",
        keepalive_comment_s=keepalive_comment_s,
    )
    return Settings(upstreams={"sim": upstream}, routes=(route,), **settings)


FINAL = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'


def content_event(text: str) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(delta) + b"\n\n"


def parses(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return data == b"[DONE]"
    return True


def fake_settings(*base_urls: str) -> Settings:
    upstreams = {f"up{i}": Upstream(base_url=url) for i, url in enumerate(base_urls)}
    route = Route(models=("test-*",), upstreams=tuple(upstreams), tokenizer="chunks")
    return Settings(upstreams=upstreams, routes=(route,))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def gateway(
    settings: Settings, timeouts: ClientTimeouts | None = None
) -> AsyncIterator[RunningGateway]:
    """The gateway in-process on a free loopback port, with the given client timeouts."""
    settings = msgspec.structs.replace(settings, listen=Listen(host="127.0.0.1", port=0))
    registry = CollectorRegistry()
    runner = await start_server(settings, registry=registry, timeouts=timeouts)
    try:
        yield RunningGateway(runner, registry, f"http://127.0.0.1:{bound_port(runner)}")
    finally:
        await runner.cleanup()


def port_of(gw: RunningGateway) -> int:
    return bound_port(gw.runner)


def sim_state(gw: RunningGateway) -> SimState:
    (runner,) = gw.runner.app[SIM_RUNNERS]
    return runner.app[SIM_STATE]


def chat(sim: dict[str, Any] | None = None, *, stream: bool = True, model: str = "sim-1") -> bytes:
    body: dict[str, Any] = {"model": model, "stream": stream, "messages": MESSAGES}
    if sim:
        body["sim"] = sim
    return orjson.dumps(body)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    #: how reading the body ended, when it did not end cleanly
    error: BaseException | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[bytes]:
        """The `data:` payloads of an SSE body, in order (comments and blank lines left out)."""
        lines = self.body.replace(b"\r\n", b"\n").split(b"\n")
        return [line[5:].strip() for line in lines if line.startswith(b"data:")]


async def post(
    gw: RunningGateway,
    body: bytes,
    *,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST and read the whole answer; a connection that breaks mid-body is reported, not raised."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(gw.url + path, data=body, headers=sent) as resp,
    ):
        received = bytearray()
        error: BaseException | None = None
        try:
            async for piece in resp.content.iter_any():
                received += piece
        except aiohttp.ClientError as exc:
            error = exc
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return Answer(resp.status, headers, bytes(received), error)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `check()` holds; fail after timeout_s (what settles after the last byte)."""
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 (a condition on gateway state, no event to await)
            await asyncio.sleep(0.01)


def request_lines(logs: list[LogEvent]) -> list[LogEvent]:
    """The canonical log lines (event "request") among captured structlog events."""
    return [entry for entry in logs if entry.get("event") == "request"]


async def request_line(logs: list[LogEvent], count: int = 1, timeout_s: float = 5.0) -> LogEvent:
    """The `count`-th canonical log line, once it has been written."""
    await eventually(lambda: len(request_lines(logs)) >= count, timeout_s)
    return request_lines(logs)[count - 1]


def assert_openai_error(answer: Answer, status: int, code: str) -> None:
    """An error before the stream began: the status, and OpenAI's JSON shape with this code."""
    assert answer.status == status, answer.body[:500]
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


def sse_error(answer: Answer) -> dict[str, Any]:
    """The error object of the stream's last event, which must be an error event."""
    last = orjson.loads(answer.events()[-1])
    assert isinstance(last, dict) and "error" in last, answer.events()[-1][:300]
    error: dict[str, Any] = last["error"]
    return error


def pool_idle(gw: RunningGateway) -> bool:
    """Every upstream's pool slots are free again."""
    return all(
        client.slots._value == client.settings.max_connections
        for client in gw.components.upstreams.values()
    )


async def settled(gw: RunningGateway, timeout_s: float = 5.0) -> None:
    """Wait until nothing is in flight: no request task, pools free, the simulator idle."""
    lifecycle = gw.components.lifecycle
    await eventually(
        lambda: (
            not lifecycle.running() and pool_idle(gw) and not gw.metric("gateway_inflight_requests")
        ),
        timeout_s,
    )
    async with asyncio.timeout(timeout_s):
        for runner in gw.runner.app[SIM_RUNNERS]:
            await runner.app[SIM_STATE].wait_for(lambda s: s.active_requests == 0)


async def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    finally:
        writer.close()
