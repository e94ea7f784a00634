"""Per-team limits (requests, tokens and concurrent streams per minute) and the in-flight gate.

The app holds one :class:`Limiter` per process, made by :func:`create_limiter` from the
``limits`` configuration, and one :class:`InflightGate`. For each request::

    async with gate:                                   # QueueTimeout -> 503
        admission = await limiter.admit(key, spec, reserve_tokens, stream)  # RateLimited -> 429
        try:
            for chunk in stream:                       # (inside the relay)
                if admission.charge(tokens_in(chunk)) and policy == "cut":
                    ...                                # end the stream with an SSE error event
        finally:
            await admission.settle(prompt_tokens + completion_tokens)

Semantics (both backends): a sliding window of 60 one-second slots; see ``window.py`` for
why it is exact where a token bucket is not. Exceptions: see ``errors.py``.
"""

from __future__ import annotations

from typing import Literal

from gateway.limits.base import Admission, Limiter, UnlimitedAdmission
from gateway.limits.errors import (
    BackendUnavailable,
    LimitsError,
    QueueFull,
    QueueTimeout,
    RateLimited,
)
from gateway.limits.gate import InflightGate
from gateway.limits.local import LocalLimiter
from gateway.limits.redis_backend import OnBackendError, RedisLimiter
from gateway.limits.spec import LimitSpec

__all__ = [
    "Admission",
    "BackendUnavailable",
    "InflightGate",
    "LimitSpec",
    "Limiter",
    "LimitsError",
    "LocalLimiter",
    "QueueFull",
    "QueueTimeout",
    "RateLimited",
    "RedisLimiter",
    "UnlimitedAdmission",
    "create_limiter",
]


def create_limiter(
    backend: Literal["local", "redis"],
    redis_url: str,
    on_backend_error: OnBackendError,
    *,
    window_s: float = 60.0,
    slots: int = 60,
) -> Limiter:
    """Build the limiter the ``limits`` configuration asks for.

    ``redis_url`` and ``on_backend_error`` only matter for ``backend="redis"``; the local
    backend has nothing that can fail. Call from the event loop that will use the limiter,
    and ``await limiter.aclose()`` at shutdown.
    """
    if backend == "local":
        return LocalLimiter(window_s=window_s, slots=slots)
    if backend == "redis":
        return RedisLimiter(redis_url, on_backend_error, window_s=window_s, slots=slots)
    raise ValueError(f"limits.backend must be 'local' or 'redis', got {backend!r}")
