"""`python -m gateway.sim --port P` serves the simulator and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import orjson

from .helpers import chat, sse_json

REPO = Path(__file__).resolve().parents[2]


async def test_cli_serves_streams_with_its_flags_and_exits_on_sigterm(free_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim", "--port", str(free_port), "--chunks", "3",
        "--delay-ms", "1", "--ttft-ms", "1",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = await proc.stdout.readline()
        assert line.decode().strip() == f"gateway.sim serving on http://127.0.0.1:{free_port}"

        base = f"http://127.0.0.1:{free_port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as r:
                events = sse_json(await r.read())
            async with session.get(base + "/sim/state") as r:
                state = orjson.loads(await r.read())

        assert [e["choices"][0]["delta"].get("content") for e in events[1:4]] == [
            "The", " quick", " brown",
        ]  # fmt: skip
        assert state["requests_received"] == 1
        assert state["connections_opened"] == 1

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert stderr == b""  # no access log, no traceback
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
