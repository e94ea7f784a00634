"""Start the gateway in-process, on a free loopback port, exactly as `python -m gateway` does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app_state import COMPONENTS, Components
from gateway.config import Listen, Settings
from gateway.server import bound_port, start_server


@dataclass
class RunningGateway:
    runner: web.AppRunner
    registry: CollectorRegistry
    url: str  # http://127.0.0.1:PORT

    @property
    def base_url(self) -> str:
        """What an OpenAI SDK client takes as base_url."""
        return f"{self.url}/v1"

    @property
    def components(self) -> Components:
        return self.runner.app[COMPONENTS]

    def metric(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when the series does not exist yet)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    settings = msgspec.structs.replace(settings, listen=Listen(host="127.0.0.1", port=0))
    registry = CollectorRegistry()
    runner = await start_server(settings, registry=registry)
    try:
        yield RunningGateway(runner, registry, f"http://127.0.0.1:{bound_port(runner)}")
    finally:
        await runner.cleanup()


GatewayFactory = Callable[[Settings], "AsyncIterator[RunningGateway]"]
