"""Fixtures of the budget tests: a real redis-server (tests/support/redis_server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.redis_server import redis_server, redis_url


@pytest.fixture(autouse=True)
def state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default state file (gateway-state.db, under the working directory) in tmp_path:
    an in-process gateway with a budget writes it there, not into the repository."""
    monkeypatch.chdir(tmp_path)


__all__ = ["redis_server", "redis_url"]
