"""Fixtures for the simulator's tests: a simulator on a free port, a client session, the SDK."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from openai import AsyncOpenAI

from gateway.sim import RunningSim, running_sim


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with running_sim() as running:
        yield running


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on now (bound and released, outside the event loop)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def openai_client(sim: RunningSim) -> AsyncIterator[AsyncOpenAI]:
    # Building the client loads certificates and imports its transport: blocking work, kept
    # off the event loop as an application would.
    client = await asyncio.to_thread(AsyncOpenAI, base_url=sim.base_url, api_key="x", max_retries=0)
    async with client:
        yield client
