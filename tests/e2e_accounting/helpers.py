"""What the end-to-end accounting tests share: gateway settings, SSE bytes, polling, logs.

The gateway settles a request (final tally, log line, end-of-request metrics) after the last
byte has gone to the client, so a test that has read a whole answer polls with `eventually`
for what the settlement writes, bounded in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import openai
import orjson
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gateway.config import (
    Route,
    Settings,
    SimulatorSettings,
    Team,
    TeamLimits,
    TokenizerName,
    Upstream,
)
from tests.support.clients import async_openai
from tests.support.gateway import RunningGateway, running_gateway

#: secrets that must never reach a log line
TEAM_KEY = "sk-team-e2e-3f9a1c7d"
UPSTREAM_KEY = "sk-upstream-e2e-b2d84e60"
#: the model a route lists exactly (label: itself) and a pattern (label: the pattern)
EXACT_MODEL = "sim-exact"
PATTERN = "sim-*"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]

LogEvent = MutableMapping[str, Any]


def sim_settings(
    tokenizer: TokenizerName = "chunks",
    *,
    teams: tuple[Team, ...] = (),
    usage: str = "passthrough",
) -> Settings:
    """The built-in simulator behind `sim-exact` and `sim-*`, answering at once by default."""
    upstream = Upstream(
        simulator=SimulatorSettings(chunks=8, delay_ms=0, ttft_ms=0),
        api_key=UPSTREAM_KEY,
        usage=usage,  # type: ignore[arg-type]
    )
    routes = (
        Route(models=(EXACT_MODEL,), upstreams=("sim",), tokenizer=tokenizer),
        Route(models=(PATTERN,), upstreams=("sim",), tokenizer=tokenizer),
    )
    return Settings(upstreams={"sim": upstream}, routes=routes, teams=teams)


def team(name: str = "search", key: str = TEAM_KEY, **limits: int) -> Team:
    return Team(name=name, keys=(key,), limits=TeamLimits(**limits))


def fake_settings(
    base_url: str, *, usage: str = "passthrough", tokenizer: TokenizerName = "chunks"
) -> Settings:
    """A fake upstream (verbatim bytes) behind `test-*`."""
    upstream = Upstream(base_url=base_url, api_key=UPSTREAM_KEY, usage=usage)  # type: ignore[arg-type]
    route = Route(models=("test-*",), upstreams=("fake",), tokenizer=tokenizer)
    return Settings(upstreams={"fake": upstream}, routes=(route,))


async def client(base_url: str, key: str = "anything") -> openai.AsyncOpenAI:
    """The official SDK, with no retries: each call is exactly one request to the gateway.

    Built in a thread: the SDK's HTTP client reads CA certificates (and imports lazily) when
    it is constructed, which would block the event loop.
    """
    return await async_openai(base_url, key, max_retries=0)


@dataclass
class Observed:
    """A running gateway and every structlog event it emitted so far."""

    gw: RunningGateway
    logs: list[LogEvent]


@asynccontextmanager
async def observed_gateway(settings: Settings) -> AsyncIterator[Observed]:
    """The gateway in-process on a free port, its structlog events captured."""
    with capture_logs() as logs:
        async with running_gateway(settings) as gw:
            yield Observed(gw, logs)


# -- verbatim upstream bytes ------------------------------------------------------------------


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    """One chat.completion.chunk event, as OpenAI writes it."""
    delta: dict[str, str] = {} if content is None else {"content": content}
    return event({
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })  # fmt: skip


def usage_event(prompt: int, completion: int, cached: int | None = None) -> bytes:
    """The usage-only event (`choices` empty) that `include_usage` adds before `[DONE]`;
    `cached`: the prompt tokens the upstream read from its cache, when it says so."""
    usage: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return event({
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [],
        "usage": usage,
    })  # fmt: skip


async def stream_then_leave(sdk: openai.AsyncOpenAI, model: str, after: int = 3) -> None:
    """Stream a slow simulator answer and hang up after `after` content chunks."""
    answer = await sdk.chat.completions.create(
        model=model,
        messages=MESSAGES,
        stream=True,
        extra_body={"sim": {"chunks": 40, "delay_ms": 50}},
    )
    seen = 0
    async for part in answer:
        seen += bool(part.choices and part.choices[0].delta.content)
        if seen == after:
            break
    await answer.close()


DONE = b"data: [DONE]\n\n"


# -- waiting and reading ----------------------------------------------------------------------


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `check()` holds; fail after timeout_s (what settles after the last byte)."""
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 (a condition on gateway state, no event to await)
            await asyncio.sleep(0.005)


def request_lines(logs: list[LogEvent]) -> list[LogEvent]:
    """The canonical log lines (event "request") among captured structlog events."""
    return [entry for entry in logs if entry.get("event") == "request"]


async def one_request_line(logs: list[LogEvent]) -> LogEvent:
    """The single canonical line of the single request a test sent, once it is written."""
    await eventually(lambda: bool(request_lines(logs)))
    (line,) = request_lines(logs)
    return line


def series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample the registry exports, by name and labels (what Prometheus would store)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in registry.collect()
        for sample in family.samples
    }
