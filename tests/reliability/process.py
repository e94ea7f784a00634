"""`python -m gateway --config FILE --port P` in its own process, for the signal tests.

Its stdout (one JSON log line per event) is read as it comes, so a test can wait for a line
("reloaded", the canonical "request" line of a stream) instead of sleeping. The process is
always stopped: SIGKILL if a test leaves it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tests.support.prometheus_server import free_port

REPO = Path(__file__).resolve().parents[2]
LogLine = dict[str, Any]


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    port: int
    config_path: Path
    lines: list[LogLine] = field(default_factory=list)
    #: stdout lines that were not JSON (tracebacks and the like), for failure messages
    other: list[bytes] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def write_config(self, config: Mapping[str, Any]) -> None:
        await write_yaml(self.config_path, config)

    async def line(self, check: Callable[[LogLine], bool], timeout_s: float = 10.0) -> LogLine:
        """The first log line for which `check` holds, once it has been written."""
        async with asyncio.timeout(timeout_s):
            while True:
                for line in self.lines:
                    if check(line):
                        return line
                self._changed.clear()
                await self._changed.wait()

    async def exit_code(self, timeout_s: float = 20.0) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.process.wait()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                self.lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self.other.append(raw)
            self._changed.set()
        self._changed.set()


async def write_yaml(path: Path, config: Mapping[str, Any]) -> None:
    await asyncio.to_thread(path.write_text, yaml.safe_dump(dict(config)), "utf-8")


@asynccontextmanager
async def gateway_process(
    config: Mapping[str, Any] | None, workdir: Path
) -> AsyncIterator[GatewayProcess]:
    """Start the gateway on a free port with `config` written to workdir (None: no --config,
    the built-in defaults); wait until it is ready."""
    port = free_port()
    path = workdir / "gateway.yaml"
    arguments = ["--port", str(port)]
    if config is not None:
        await write_yaml(path, config)
        arguments += ["--config", str(path)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *arguments,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    gateway = GatewayProcess(process, port, path)
    reader = asyncio.create_task(gateway._read())
    try:
        await _ready(gateway)
        yield gateway
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _ready(gateway: GatewayProcess, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
        while gateway.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(gateway.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway exited: {b''.join(gateway.other)[-3000:]!r}")
