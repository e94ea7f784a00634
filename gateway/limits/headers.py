"""OpenAI's rate-limit headers: names and value formats.

OpenAI sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; the reset values are
durations written the way Go prints them (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1.5s"``),
meaning "time until this limit is back to its initial state". Clients and dashboards that
already parse OpenAI's headers then read ours unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gateway.limits.errors import retry_after_header

Dimension = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Usage:
    """One dimension's state after an admission decision."""

    limit: int
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        """What is left in the window, never negative."""
        return max(0, self.limit - self.used)


def format_duration(ms: int) -> str:
    """Render milliseconds like Go's ``time.Duration``: ``0s``, ``250ms``, ``1.5s``, ``6m0s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def usage_headers(usages: dict[Dimension, Usage]) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers for the limited dimensions, in OpenAI's format."""
    headers: dict[str, str] = {}
    for dimension, usage in usages.items():
        headers[f"x-ratelimit-limit-{dimension}"] = str(usage.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(usage.remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = format_duration(usage.reset_ms)
    return headers


def refusal_headers(usages: dict[Dimension, Usage], retry_after_s: float) -> dict[str, str]:
    """Headers for a 429: the usage headers plus ``retry-after-ms`` and ``Retry-After``.

    ``retry-after-ms`` is what the OpenAI SDKs read first, so their built-in retry waits
    exactly as long as needed instead of rounding up to whole seconds.
    """
    headers = usage_headers(usages)
    headers["retry-after-ms"] = str(math.ceil(retry_after_s * 1000))
    headers["Retry-After"] = retry_after_header(retry_after_s)
    return headers
