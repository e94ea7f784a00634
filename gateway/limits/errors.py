"""The exceptions the limits package raises, and what the app answers for each.

::

    LimitsError                  base of every refusal this package makes
    ├── RateLimited              a team's requests, tokens or concurrent streams are full: 429
    ├── BackendUnavailable       the shared backend (Redis) is unreachable, fail_closed: 503
    └── QueueTimeout             the process-wide in-flight gate stayed full too long: 503
        └── QueueFull            ... and its bounded wait queue was already full: 503 at once

Each carries ``retry_after_s``, the delay after which a retry is expected to succeed; the app
puts it, rounded up to whole seconds, in ``Retry-After``.
"""

from __future__ import annotations

import math
from typing import Literal

LimitName = Literal["requests", "tokens", "concurrency"]


def retry_after_header(retry_after_s: float) -> str:
    """Render ``Retry-After`` in whole seconds, rounded up so a client never retries early."""
    return str(max(1, math.ceil(retry_after_s)))


class LimitsError(Exception):
    """Base class: a request this package refused, and when to try again."""

    retry_after_s: float

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(LimitsError):
    """A team limit is full; raised by ``Limiter.admit`` at once, never after a wait.

    ``limit`` names the first full limit (requests, then tokens, then concurrency);
    ``retry_after_s`` covers every full limit, so a retry after it fits all of them.
    ``headers`` holds the ``x-ratelimit-*`` headers, ``retry-after-ms`` (read first by
    the OpenAI SDKs) and ``Retry-After``.
    """

    limit: LimitName
    headers: dict[str, str]

    def __init__(
        self, message: str, limit: LimitName, retry_after_s: float, headers: dict[str, str]
    ) -> None:
        super().__init__(message, retry_after_s)
        self.limit = limit
        self.headers = headers


class BackendUnavailable(LimitsError):
    """The shared backend cannot be reached and ``on_backend_error`` is ``fail_closed``."""


class QueueTimeout(LimitsError):
    """The process held ``max_inflight`` requests for all of ``queue_timeout_s``."""


class QueueFull(QueueTimeout):
    """The in-flight gate's wait queue is at its bound: refused without waiting."""
