"""What the end-to-end limits tests share: teams, settings, bulk requests, polling, metrics.

Every test here goes through a real gateway (in-process on port 0, or `python -m gateway`
subprocesses), with teams configured by key, exactly as a user would configure them.
The gateway settles a request (returns the unused token reservation, frees the stream slot,
counts `gateway_requests_total`) just after the client got its last byte, so a test that
depends on that settlement waits for it with `settled`, bounded in time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import CollectorRegistry

from gateway.config import Limits, Route, Settings, SimulatorSettings, Team, TeamLimits, Upstream
from gateway.limits import create_limiter
from gateway.tokens import estimate_prompt_tokens, load_tokenizer
from tests.support.gateway import RunningGateway

#: a team's gateway key (what clients send) and the upstream's key (what the gateway sends)
TEAM_KEY = "sk-gw-limits-team-7c1e52"
UPSTREAM_KEY = "sk-upstream-limits-94ab07"
TEAM = "search"
#: the simulator serves `sim-*`; a fake upstream serves `test-*` (both labelled by pattern)
SIM_MODEL, SIM_LABEL = "sim-1", "sim-*"
TEST_MODEL, TEST_LABEL = "test-1", "test-*"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]


def team(name: str = TEAM, key: str = TEAM_KEY, **limits: int) -> Team:
    """A team with one plaintext key and the given per-minute limits."""
    return Team(name=name, keys=(key,), limits=TeamLimits(**limits))


def sim_settings(*teams: Team, limits: Limits | None = None, chunks: int = 4) -> Settings:
    """The built-in simulator behind `sim-*`, answering at once; `chunks` tokenizer."""
    upstream = Upstream(
        simulator=SimulatorSettings(chunks=chunks, delay_ms=0, ttft_ms=0), api_key=UPSTREAM_KEY
    )
    route = Route(models=(SIM_LABEL,), upstreams=("sim",), tokenizer="chunks")
    return Settings(
        upstreams={"sim": upstream}, routes=(route,), teams=teams, limits=limits or Limits()
    )


def upstream_settings(base_url: str, *teams: Team, limits: Limits | None = None) -> Settings:
    """A test upstream (fake or held) behind `test-*`; `chunks` tokenizer."""
    upstream = Upstream(base_url=base_url, api_key=UPSTREAM_KEY)
    route = Route(models=(TEST_LABEL,), upstreams=("up",), tokenizer="chunks")
    return Settings(
        upstreams={"up": upstream}, routes=(route,), teams=teams, limits=limits or Limits()
    )


def sim_config(redis_url: str, requests_per_minute: int) -> dict[str, Any]:
    """The YAML configuration of a gateway process sharing its limits through Redis."""
    return {
        "shutdown_grace_s": 1,
        "upstreams": {"sim": {"simulator": {"chunks": 2, "delay_ms": 0, "ttft_ms": 0}}},
        "routes": [{"models": [SIM_LABEL], "upstreams": ["sim"], "tokenizer": "chunks"}],
        "teams": [
            {
                "name": TEAM,
                "keys": [TEAM_KEY],
                "limits": {"requests_per_minute": requests_per_minute},
            }
        ],
        "limits": {"backend": "redis", "redis_url": redis_url, "on_backend_error": "fail_open"},
    }


def chat(model: str = SIM_MODEL, *, stream: bool = False, **fields: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": model, "messages": MESSAGES, "stream": stream, **fields}


def reservation(body: dict[str, Any]) -> int:
    """What the gateway reserves at admission: its prompt estimate plus `max_tokens`."""
    return estimate_prompt_tokens(body, load_tokenizer("chunks")) + int(body["max_tokens"])


def auth(key: str = TEAM_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, read whole."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def bulk_session(timeout_s: float = 60.0) -> aiohttp.ClientSession:
    """A client session with no connection cap: a thousand requests really go at once."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST /v1/chat/completions to the gateway at `url`; read the whole answer."""
    async with session.post(
        f"{url}/v1/chat/completions", data=orjson.dumps(body), headers=headers
    ) as resp:
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


async def post_all(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    count: int,
    body: dict[str, Any],
    key: str = TEAM_KEY,
) -> list[Reply]:
    """`count` requests at once, spread round-robin over the gateways at `urls`."""
    return await asyncio.gather(
        *(post(session, urls[i % len(urls)], body, auth(key)) for i in range(count))
    )


def by_status(replies: Sequence[Reply]) -> Counter[int]:
    return Counter(reply.status for reply in replies)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `check()` holds; fail after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - metrics and counters have no event to await
            await asyncio.sleep(0.01)


def metric_sum(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of every sample called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def settled(registry: CollectorRegistry, requests: int, timeout_s: float = 5.0) -> None:
    """Wait until the gateway has finished (settled, counted) `requests` requests in all."""
    await eventually(lambda: metric_sum(registry, "gateway_requests_total") >= requests, timeout_s)


def use_short_window(gw: RunningGateway, window_s: float, slots: int) -> None:
    """Give a running in-process gateway a local limiter whose window is `window_s` long.

    The window is 60 s in production and not a setting; a test that waits for capacity to
    come back swaps the app's limiter for one built by the same factory with a shorter window.
    The app closes whichever limiter it holds at shutdown.
    """
    comp = gw.components
    assert comp.settings.limits.backend == "local"
    comp.limiter = create_limiter("local", "", "fail_open", window_s=window_s, slots=slots)
