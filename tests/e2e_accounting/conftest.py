"""A gateway in-process with its structlog events captured, for the tests of this folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from structlog.testing import capture_logs

from gateway.config import Settings
from tests.e2e_accounting.helpers import LogEvent
from tests.support.gateway import RunningGateway, running_gateway


@dataclass
class Observed:
    """A running gateway and every structlog event it emitted so far."""

    gw: RunningGateway
    logs: list[LogEvent]


@asynccontextmanager
async def observed_gateway(settings: Settings) -> AsyncIterator[Observed]:
    with capture_logs() as logs:
        async with running_gateway(settings) as gw:
            yield Observed(gw, logs)
