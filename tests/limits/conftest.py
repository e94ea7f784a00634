"""Fixtures for the limits tests: a real redis-server, and limiters of either backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.limits import Limiter, LocalLimiter, RedisLimiter
from tests.support.redis_server import private_redis_server, redis_server, redis_url

__all__ = ["private_redis_server", "redis_server", "redis_url"]


class MakeLimiter:
    """Makes limiters of one backend and closes them all after the test.

    Keyword arguments go to the backend's constructor (``window_s``, ``slots``, ...);
    :meth:`redis_only` wraps options only the Redis backend takes.
    """

    def __init__(self, backend: str, redis_url: str) -> None:
        self.backend = backend
        self._redis_url = redis_url
        self.made: list[Limiter] = []

    def __call__(self, **options: Any) -> Limiter:
        limiter: Limiter
        if self.backend == "local":
            limiter = LocalLimiter(**options)
        else:
            on_error = options.pop("on_backend_error", "fail_closed")
            limiter = RedisLimiter(self._redis_url, on_error, **options)
        self.made.append(limiter)
        return limiter

    def redis_only(self, **options: Any) -> dict[str, Any]:
        """``options`` for the Redis backend, nothing for the local one."""
        return options if self.backend == "redis" else {}


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def backend_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The backend to test and its Redis URL; sync, so the server starts off the loop."""
    url: str = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return request.param, url


@pytest.fixture
async def make_limiter(backend_url: tuple[str, str]) -> AsyncIterator[MakeLimiter]:
    """A limiter factory for one backend: each test using it runs against both."""
    factory = MakeLimiter(*backend_url)
    yield factory
    for limiter in factory.made:
        await limiter.aclose()
