"""Fixtures of the end-to-end limits tests: a real redis-server, and captured log lines."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support.redis_server import private_redis_server, redis_server, redis_url

__all__ = ["logs", "private_redis_server", "redis_server", "redis_url"]


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event of the in-process gateway (kept off stdout, so `pytest -s`
    shows the figures the tests print rather than a thousand request lines)."""
    with capture_logs() as captured:
        yield captured
