"""The local backend keeps spend in its state file: a crash loses at most the last second.

A gateway under load is killed outright (SIGKILL): the spend in its SQLite state file equals
the log lines' total less at most the charges of the last second before the kill (the file
is written every second), and a restarted gateway goes on from there. A clean SIGTERM loses
nothing. Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from gateway.spend_store import read_state_file
from tests.deploy.gateway_process import GatewayProcess, gateway_process
from tests.e2e_limits.helpers import bulk_session

from .processes import (
    TEAM,
    TEAM_KEY,
    read_log,
    request_lines,
    sim_config,
    stop,
    stream,
    tokens,
)

IN_FLIGHT = 20
#: the file is written every second; the write itself and the log line's own timestamp
#: (taken before the settle's charge) get this much on top
SLACK_S = 0.25


async def disk_tokens(path: Path) -> int:
    totals = await asyncio.to_thread(read_state_file, path)
    return sum(t for key, (t, _) in totals.items() if key.startswith(f"team:{TEAM}|d"))


async def load(url: str, stop_at: asyncio.Event) -> None:
    """IN_FLIGHT streams at a time, one after another, until `stop_at` is set."""

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop_at.is_set():
            with contextlib.suppress(aiohttp.ClientError):
                await stream(session, url)

    async with bulk_session() as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))


def logged_at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


async def usage_tokens(gateway: GatewayProcess) -> int:
    headers = {"Authorization": f"Bearer {TEAM_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/gateway/usage", headers=headers) as resp:
            view = await resp.json()
    return int(view["team_usage"]["day"]["tokens"])


async def test_a_killed_gateway_loses_at_most_its_last_second_and_sigterm_loses_nothing(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.db"
    config = sim_config({"state_file": str(state)}, {"tokens_per_day": 10**9})
    async with gateway_process(config, tmp_path / "first") as gateway:
        done = asyncio.Event()
        loading = asyncio.create_task(load(gateway.url, done))
        await asyncio.sleep(2.5)  # several writes of the file
        killed_at = time.time()
        await stop(gateway, signal.SIGKILL)
        done.set()
        await loading
        lines = request_lines(await read_log(gateway))
    on_disk = await disk_tokens(state)
    logged = tokens(lines)
    recent = tokens([line for line in lines if logged_at(line) > killed_at - 1.0 - SLACK_S])
    print(
        f"\ndurability, SIGKILL under load: {len(lines)} requests logged, {logged} tokens;"
        f" on disk {on_disk}; lost {logged - on_disk} (the last second held {recent})"
    )
    assert len(lines) > 100
    assert logged - recent <= on_disk <= logged + 2 * IN_FLIGHT * 15

    async with gateway_process(config, tmp_path / "second") as gateway:
        assert await usage_tokens(gateway) == on_disk  # a restart goes on from the file
        async with bulk_session() as session:
            statuses = await asyncio.gather(*(stream(session, gateway.url) for _ in range(50)))
        assert set(statuses) == {200}
        await stop(gateway, signal.SIGTERM)
        after = request_lines(await read_log(gateway))
    assert await disk_tokens(state) == on_disk + tokens(after)  # SIGTERM: nothing lost
