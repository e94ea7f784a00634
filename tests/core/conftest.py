from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.config import Route, Settings, Upstream
from tests.support.fake_upstream import FakeUpstream, fake_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as up:
        yield up


def settings_for(*base_urls: str, **upstream_options: object) -> Settings:
    """A gateway routing `test-*` to the given upstreams, in failover order."""
    upstreams = {
        f"up{i}": Upstream(base_url=url, api_key=f"upstream-key-{i}", **upstream_options)  # type: ignore[arg-type]
        for i, url in enumerate(base_urls)
    }
    route = Route(models=("test-*",), upstreams=tuple(upstreams), tokenizer="chunks")
    return Settings(upstreams=upstreams, routes=(route,))
