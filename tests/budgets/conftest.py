"""Fixtures of the budget tests: a real redis-server (tests/support/redis_server)."""

from __future__ import annotations

from tests.support.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]
