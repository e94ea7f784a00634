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


#: each dimension's header names: limit, remaining, reset
HEADER_NAMES: dict[Dimension, tuple[str, str, str]] = {
    dimension: (
        f"x-ratelimit-limit-{dimension}",
        f"x-ratelimit-remaining-{dimension}",
        f"x-ratelimit-reset-{dimension}",
    )
    for dimension in ("requests", "tokens")
}


def add_usage(
    headers: dict[str, str], dimension: Dimension, limit: int, used: int, reset: str
) -> None:
    """Write one dimension's three headers (remaining never below 0); ``reset`` is formatted."""
    limit_name, remaining_name, reset_name = HEADER_NAMES[dimension]
    headers[limit_name] = str(limit)
    headers[remaining_name] = str(limit - used) if used < limit else "0"
    headers[reset_name] = reset


class ResetTexts:
    """``format_duration`` of an admitted request's reset, remembered per value.

    An admitted request resets its windows when the slot it was counted in leaves, between
    ``window - slot`` and ``window`` milliseconds from now: at most ``slot_ms`` distinct
    values (1,000 with the default shape), so after a warm-up every admission finds its text
    here instead of formatting it. ``bound`` caps the memory for a shape with long slots.
    """

    __slots__ = ("_bound", "_texts")

    def __init__(self, bound: int = 4096) -> None:
        self._bound = bound
        self._texts: dict[int, str] = {}

    def text(self, ms: int) -> str:
        """The same as ``format_duration(ms)``."""
        texts = self._texts
        if ms in texts:
            return texts[ms]
        text = format_duration(ms)
        if len(texts) < self._bound:
            texts[ms] = text
        return text


def usage_headers(usages: dict[Dimension, Usage]) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers for the limited dimensions, in OpenAI's format."""
    headers: dict[str, str] = {}
    for dimension, usage in usages.items():
        add_usage(headers, dimension, usage.limit, usage.used, format_duration(usage.reset_ms))
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
