"""The gateway as operators run it: `python -m gateway --config FILE` in its own process.

The live-scrape test needs what Prometheus sees from the real entry point (the command line,
the config loader, the `/metrics` handler of a started server), so it starts a subprocess on a
free loopback port and stops it with SIGTERM, as an orchestrator would. Blocking: use from
synchronous fixtures only.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.assets import REPO
from tests.support.prometheus_server import free_port


class GatewayStartError(Exception):
    """The gateway exited or never became ready; the message holds its output."""


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        """host:port, as a Prometheus scrape target."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_ready(gateway: GatewayProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise GatewayStartError(f"the gateway exited:\n{gateway.log()[-4000:]}")
        if _ready(gateway.url):
            return
        time.sleep(0.1)
    raise GatewayStartError(f"the gateway was not ready in {timeout_s} s:\n{gateway.log()[-4000:]}")


def _stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM (the gateway drains), then SIGKILL past the grace; always reaps."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def running_gateway_process(
    config: Mapping[str, Any], workdir: Path, ready_timeout_s: float = 30.0
) -> Iterator[GatewayProcess]:
    """Write `config` (its listen port replaced by a free one), start the gateway, yield it."""
    port = free_port()
    config_path = workdir / "gateway.yaml"
    listen = {"host": "127.0.0.1", "port": port}
    config_path.write_text(yaml.safe_dump({**config, "listen": listen}), encoding="utf-8")
    log_path = workdir / "gateway.log"
    command = [sys.executable, "-m", "gateway", "--config", str(config_path)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(process, port, log_path)
    try:
        _wait_ready(gateway, ready_timeout_s)
        yield gateway
    finally:
        _stop(process, float(config.get("shutdown_grace_s", 30)) + 5)


@contextlib.contextmanager
def running_gateway_processes(
    config: Mapping[str, Any], workdir: Path, count: int
) -> Iterator[list[GatewayProcess]]:
    """`count` gateways on one configuration, each with its own port and a folder of its own
    below `workdir` (replicas sharing a backend)."""
    with contextlib.ExitStack() as stack:
        gateways = []
        for i in range(count):
            folder = workdir / f"gateway{i}"
            folder.mkdir()
            gateways.append(stack.enter_context(running_gateway_process(config, folder)))
        yield gateways


@contextlib.asynccontextmanager
async def gateway_process(
    config: Mapping[str, Any], workdir: Path
) -> AsyncIterator[GatewayProcess]:
    """`running_gateway_process` (blocking: it waits for readiness and for the exit) entered
    and left in a thread, so an async test's event loop never blocks; `workdir` is made if
    missing."""
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    manager = running_gateway_process(config, workdir)
    gateway = await asyncio.to_thread(manager.__enter__)
    try:
        yield gateway
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
