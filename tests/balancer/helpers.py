"""What the balancing tests share: simulator replicas, a balanced route, SDK traffic, log lines."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import openai
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import Health, Retry, Route, Settings, Upstream
from gateway.sim import SIM_STATE, SimDefaults, SimState, start_sim
from tests.reliability.helpers import LogEvent, request_lines
from tests.support.clients import async_openai

MODEL = "llama-1"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass
class Replica:
    """One simulator replica on its own port; `stop` and `start` it again on the same port."""

    name: str
    options: SimDefaults
    runner: web.AppRunner | None = None
    port: int = 0
    #: every SimState it had (one per start)
    states: list[SimState] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def received(self) -> int:
        return sum(state.requests_received for state in self.states)

    async def start(self) -> None:
        self.runner, self.port = await start_sim("127.0.0.1", self.port, self.options)
        self.states.append(self.runner.app[SIM_STATE])

    async def kill(self) -> None:
        """Stop at once: every open connection reset, streams in flight cut mid-way."""
        if self.runner is not None and self.runner.server is not None:
            for connection in list(self.runner.server.connections):
                if connection.transport is not None:
                    connection.transport.abort()
        await self.stop()

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


@asynccontextmanager
async def replicas(**options: SimDefaults) -> AsyncIterator[dict[str, Replica]]:
    """Simulator replicas by name, each started on a free port, stopped at the end."""
    found = {name: Replica(name, opts) for name, opts in options.items()}
    async with AsyncExitStack() as stack:
        for replica in found.values():
            await replica.start()
            stack.push_async_callback(replica.stop)
        yield found


def fast(chunks: int = 4, delay_ms: float = 5, ttft_ms: float = 5) -> SimDefaults:
    return SimDefaults(chunks=chunks, delay_ms=delay_ms, ttft_ms=ttft_ms)


def balanced_settings(
    urls: Mapping[str, str],
    *,
    weights: Mapping[str, float] | None = None,
    tiers: tuple[str | tuple[str, ...], ...] | None = None,
    health: Health | None = None,
    rpm: Mapping[str, float] | None = None,
    **route: Any,
) -> Settings:
    """`llama-*` routed to the given upstreams, one balanced tier unless `tiers` says."""
    upstreams = {
        name: Upstream(
            base_url=url,
            weight=(weights or {}).get(name, 1.0),
            health=health or Health(),
            max_requests_per_minute=(rpm or {}).get(name),
        )
        for name, url in urls.items()
    }
    route.setdefault("retry", Retry())
    routes = (
        Route(
            models=("llama-*",),
            upstreams=tiers if tiers is not None else (tuple(urls),),
            tokenizer="chunks",
            **route,
        ),
    )
    return Settings(upstreams=upstreams, routes=routes)


async def sdk(base_url: str) -> openai.AsyncOpenAI:
    """The official SDK, no retries: each call is one request to the gateway."""
    return await async_openai(base_url, max_retries=0)


async def stream_once(client: openai.AsyncOpenAI, **kwargs: Any) -> int:
    """One streamed chat completion read to its end; the content chunks received."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, **kwargs
    )
    chunks = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
    return chunks


async def run_many(total: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    """`one(i)` for i in range(total), `concurrency` at a time."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def inflight_time_shares(logs: list[LogEvent]) -> dict[str, float]:
    """Each upstream's share of the time requests spent in flight (from the log lines)."""
    time_by: dict[str, float] = defaultdict(float)
    for line in request_lines(logs):
        time_by[line["upstream"]] += line["duration_ms"]
    total = sum(time_by.values())
    return {name: spent / total for name, spent in time_by.items()}


def request_shares(logs: list[LogEvent]) -> dict[str, float]:
    counts = Counter(line["upstream"] for line in request_lines(logs))
    total = sum(counts.values())
    return {name: count / total for name, count in counts.items()}


def events(logs: list[LogEvent], name: str, upstream: str) -> list[LogEvent]:
    return [e for e in logs if e.get("event") == name and e.get("upstream") == upstream]
