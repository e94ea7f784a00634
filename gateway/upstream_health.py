"""Passive health of one upstream: learnt from the answers real requests get, per process.

    trusted --(max_failures failures within window_s)--> cooled (cooldown_s)
    cooled  --(cooldown over)--> half-open: ONE trial request is let through
    half-open --(the trial succeeds)--> trusted      --(it fails)--> cooled again
    trusted --(429 or 503 with Retry-After)--> cooled for that long (capped), then trusted

A failure is a connect error, a reset or a protocol error, a timeout, a 5xx, or a stream broken
before its first byte. A 429 or 503 with `Retry-After` is the upstream asking for a pause, not a
failure: it cools the upstream down for that long and counts nothing. Whether an upstream may be
cooled down at all (never the last healthy member of a route) is the balancer's decision; this
class only keeps the state. Each worker process keeps its own: a cooldown is per process.
"""

from __future__ import annotations

from collections import deque

from .config import Health

#: the longest pause a `Retry-After` can impose on an upstream
MAX_RETRY_AFTER_S = 300.0


class UpstreamHealth:
    __slots__ = ("cooled_until", "failures", "half_open", "last_failure", "probing", "settings")

    def __init__(self, settings: Health) -> None:
        self.settings = settings
        #: the times of the last max_failures failures
        self.failures: deque[float] = deque(maxlen=settings.max_failures)
        #: no request before this time (monotonic seconds)
        self.cooled_until = 0.0
        #: the cooldown was for failures: one trial request decides before it is trusted again
        self.half_open = False
        #: that trial request is in flight
        self.probing = False
        self.last_failure = float("-inf")

    def reconfigure(self, settings: Health) -> None:
        """New settings (a reload): the failures seen so far and a cooldown in progress stay."""
        if settings.max_failures != self.settings.max_failures:
            self.failures = deque(self.failures, maxlen=settings.max_failures)
        self.settings = settings

    def usable(self, now: float) -> bool:
        """Whether a request may go there now (a half-open upstream takes one trial at a time)."""
        if now < self.cooled_until:
            return False
        return not (self.half_open and self.probing)

    def trusted(self, now: float) -> bool:
        """Healthy: neither cooled down nor waiting for its trial request to succeed."""
        return now >= self.cooled_until and not self.half_open

    def fail(self, now: float) -> bool:
        """Record a failure; whether the upstream should now be cooled down."""
        self.last_failure = now
        if self.half_open:
            return True
        self.failures.append(now)
        return (
            len(self.failures) == self.settings.max_failures
            and now - self.failures[0] <= self.settings.window_s
        )

    def cool(self, now: float, seconds: float, *, trial: bool) -> None:
        """No request for `seconds`; with `trial`, one request decides after that."""
        self.cooled_until = now + seconds
        self.half_open = trial
        self.probing = False
        self.failures.clear()

    def succeed(self) -> bool:
        """A usable answer; whether this ended a half-open state (the upstream is restored)."""
        restored = self.half_open
        if restored:
            self.half_open = self.probing = False
            self.failures.clear()
        return restored
