"""Gateway processes for the budget tests, and their canonical log lines, read from file."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from tests.deploy.gateway_process import GatewayProcess

TEAM, TEAM_KEY = "search", "sk-budget-search-5d1e"
BODY = {"model": "sim-1", "messages": [{"role": "user", "content": "Tell me a story"}]}


def sim_config(limits: dict[str, Any], budgets: dict[str, Any], chunks: int = 4) -> dict[str, Any]:
    """One team with `budgets`, the simulator behind `sim-*` (short streams)."""
    return {
        "shutdown_grace_s": 5,
        "upstreams": {"sim": {"simulator": {"chunks": chunks, "delay_ms": 2, "ttft_ms": 0}}},
        "routes": [{"models": ["sim-*"], "upstreams": ["sim"], "tokenizer": "chunks"}],
        "teams": [{"name": TEAM, "keys": [TEAM_KEY], "budgets": budgets}],
        "limits": limits,
    }


async def stream(session: aiohttp.ClientSession, url: str) -> int:
    """One streamed chat completion read to its end; its status."""
    body = orjson.dumps({**BODY, "stream": True})
    headers = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": "application/json"}
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


def request_lines(log: str) -> list[dict[str, Any]]:
    """The canonical `request` lines of a gateway's JSON log."""
    lines = []
    for raw in log.splitlines():
        if raw.startswith("{"):
            line = orjson.loads(raw)
            if line.get("event") == "request" and line.get("path") == "/v1/chat/completions":
                lines.append(line)
    return lines


def tokens(lines: Sequence[dict[str, Any]]) -> int:
    return sum(line["prompt_tokens"] + line["completion_tokens"] for line in lines)


async def stop(gateway: GatewayProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process and wait for it to exit (in a thread: Popen.wait blocks)."""
    gateway.process.send_signal(sig)
    try:
        await asyncio.to_thread(gateway.process.wait, 20)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        await asyncio.to_thread(gateway.process.wait, 10)


async def read_log(gateway: GatewayProcess) -> str:
    return await asyncio.to_thread(Path(gateway.log_path).read_text, "utf-8")


async def redis_team_tokens(redis_url: str, period: str, team: str = TEAM) -> int:
    """A team's spend in Redis over every key of `period` kind ("d" days, "m" months)."""
    redis = Redis.from_url(redis_url, driver_info=None)  # no metadata read on the loop
    try:
        total = 0
        async for key in redis.scan_iter(f"gw:spend:team:{team}|{period}*"):
            total += int(await redis.hget(key, "tokens") or 0)
        return total
    finally:
        await redis.aclose()
