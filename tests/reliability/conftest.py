from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.fake_upstream import FakeUpstream, fake_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A verbatim-bytes upstream on a free loopback port."""
    async with fake_upstream() as up:
        yield up
