"""What both backends share: the admission object, the limiter protocol, the verdict.

A backend measures each limited dimension as a :class:`Check` (atomically: in one event-loop
step locally, in one Lua script on Redis), then :func:`verdict` turns the checks into either
the response headers of an admitted request or the :class:`RateLimited` to raise. Keeping the
verdict here is what gives both backends the same answers, messages and headers.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Protocol

from gateway.limits.errors import LimitName, RateLimited
from gateway.limits.headers import (
    Dimension,
    ResetTexts,
    Usage,
    add_usage,
    format_duration,
    refusal_headers,
)
from gateway.limits.spec import LimitSpec

_UNITS: dict[LimitName, str] = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent streams",
}


class Check(NamedTuple):
    """One limited dimension, measured just before the admission would count.

    ``used`` excludes this request's ``cost``; ``retry_ms`` is how long until ``cost`` fits
    (0 when it fits now); ``reset_ms`` is how long until the window is empty as things stand,
    ``admitted_reset_ms`` the same if this request is counted. (A named tuple: immutable, and
    built in one call where a frozen dataclass sets each field through ``object.__setattr__``.)
    """

    dimension: LimitName
    limit: int
    used: int
    cost: int
    retry_ms: int
    reset_ms: int
    admitted_reset_ms: int

    @property
    def fits(self) -> bool:
        """Whether this dimension has room for the request."""
        return self.used + self.cost <= self.limit


def admitted_headers(checks: list[Check], texts: ResetTexts) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of an admitted request, this request counted."""
    headers: dict[str, str] = {}
    for check in checks:
        if check.dimension != "concurrency":  # no OpenAI header for it
            reset = texts.text(check.admitted_reset_ms)
            add_usage(headers, check.dimension, check.limit, check.used + check.cost, reset)
    return headers


def verdict(key: str, checks: list[Check], texts: ResetTexts) -> RateLimited | dict[str, str]:
    """Return the admitted request's headers, or the refusal when any check does not fit.

    The refusal names the first full dimension (requests, tokens, concurrency) and waits for
    the slowest of the full ones, so a retry after ``retry_after_s`` fits every one of them.
    """
    for check in checks:
        if not check.fits:
            return refusal(key, checks)
    return admitted_headers(checks, texts)


def refusal(key: str, checks: list[Check]) -> RateLimited:
    """The :class:`RateLimited` for checks of which at least one does not fit."""
    full = [check for check in checks if not check.fits]
    retry_after_s = max(check.retry_ms for check in full) / 1000
    first = full[0]
    message = (
        f"Rate limit reached for {key} on {_UNITS[first.dimension]}: Limit {first.limit}, "
        f"Used {first.used}, Requested {first.cost}. "
        f"Please try again in {format_duration(round(retry_after_s * 1000))}."
    )
    headers = refusal_headers(_usages(checks), retry_after_s)
    return RateLimited(message, first.dimension, retry_after_s, headers)


def _usages(checks: list[Check]) -> dict[Dimension, Usage]:
    """Per-minute dimensions as a refusal's header usages (concurrency has no OpenAI header)."""
    usages: dict[Dimension, Usage] = {}
    for check in checks:
        if check.dimension != "concurrency":
            usages[check.dimension] = Usage(check.limit, check.used, check.reset_ms)
    return usages


class TokenLedger:
    """One admission's token account: the reservation and what was generated against it.

    ``charge`` only adds; the backend decides when to count the overage (tokens beyond the
    reservation) in the shared window, recording it in ``applied``.
    """

    __slots__ = ("applied", "reserved", "slot", "used")

    def __init__(self, reserved: int, slot: int, used: int) -> None:
        self.reserved = reserved
        self.slot = slot
        self.used = used
        self.applied = 0

    @property
    def pending(self) -> int:
        """Overage not yet counted in the window (0 while within the reservation)."""
        return max(0, self.used - self.reserved - self.applied)

    def settle_delta(self, actual_tokens: int) -> int:
        """How far the window's count for this request is from the true usage."""
        return actual_tokens - self.reserved - self.applied


class Admission(abc.ABC):
    """One admitted request; the app calls ``charge`` per chunk and ``settle`` once at the end.

    ``headers`` are the ``x-ratelimit-*`` headers for the response (empty when the key is not
    limited, or when a fail-open backend admitted without being able to count).
    """

    __slots__ = ("headers",)

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    @abc.abstractmethod
    def charge(self, tokens: int) -> bool:
        """Count ``tokens`` just generated; True once this stream pushed the budget over.

        Synchronous and cheap: it runs once per streamed chunk.
        """

    @abc.abstractmethod
    async def settle(self, actual_tokens: int) -> None:
        """Record the true usage, return the unused reservation, free the stream slot.

        Idempotent, and safe to await from a ``finally`` after cancellation.
        """


class UnlimitedAdmission(Admission):
    """An admission with nothing to count: no limits, or a fail-open backend that is down."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__({})

    def charge(self, tokens: int) -> bool:
        """Nothing is counted, so the budget is never exceeded."""
        return False

    async def settle(self, actual_tokens: int) -> None:
        """Nothing to return."""


class Limiter(Protocol):
    """The per-team limiter the app holds, one per process, created by ``create_limiter``."""

    @property
    def degraded(self) -> bool:
        """True while the backend is unreachable (the app exports it as a gauge)."""
        ...

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        reserve_tokens: int,
        stream: bool,
        *,
        prompt_tokens: int = 0,
    ) -> Admission:
        """Admit a request at once or raise ``RateLimited`` at once; never wait for capacity.

        ``reserve_tokens`` (prompt estimate + max_tokens or a default cap) is counted against
        tokens per minute now; ``prompt_tokens``, when given, starts the stream's own count so
        ``charge`` compares prompt + completion with the reservation. A concurrency slot is
        taken only when ``stream`` is true.
        """
        ...

    async def aclose(self) -> None:
        """Finish background work and release connections."""
        ...
