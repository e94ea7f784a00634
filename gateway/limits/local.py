"""The in-process backend: exact limits for one process, no I/O.

Every admission decision runs in one event-loop step with no ``await`` between measuring
and counting, so concurrent requests cannot both see the last unit of capacity: 1,000
simultaneous requests against 100 per minute admit exactly 100.

Why not aiolimiter here: ``aiolimiter.AsyncLimiter`` is a leaky bucket that drips capacity
back continuously and makes callers wait in an unbounded queue. Both contradict the
contract: a minute's budget would refill during the minute (more than 100 per minute pass),
and a full limit must answer 429 at once rather than wait. The sliding window in
``window.py`` gives exact per-minute counts and an exact ``Retry-After``, and is the same
arithmetic the Redis backend runs in Lua, so switching backends changes no answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from gateway.limits.base import Admission, Check, TokenLedger, UnlimitedAdmission, refusal
from gateway.limits.headers import ResetTexts, add_usage
from gateway.limits.spec import LimitSpec
from gateway.limits.window import SlidingWindow, WindowShape


class _Bucket:
    """Everything counted for one key. Keys come from configuration, so buckets are few."""

    __slots__ = ("requests", "streams", "tokens")

    def __init__(self, shape: WindowShape) -> None:
        self.requests = SlidingWindow(shape)
        self.tokens = SlidingWindow(shape)
        self.streams = 0


class LocalLimiter:
    """Per-process limits with the sliding-window semantics described in ``window.py``.

    :param window_s: the window the per-minute limits apply to; 60 s in production, shorter
        in tests that need a window to pass.
    :param slots: how many slots the window is cut into (capacity returns slot by slot).
    :param concurrency_retry_after_s: the ``Retry-After`` for a full concurrent-stream cap,
        a guess since nobody knows when a stream ends.
    :param clock: seconds on a monotonic clock; injectable so tests can move time.
    """

    def __init__(
        self,
        *,
        window_s: float = 60.0,
        slots: int = 60,
        concurrency_retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shape = WindowShape.of(window_s, slots)
        self._window_ms = self._shape.window_ms
        self._slot_ms = self._shape.slot_ms
        self._reset_texts = ResetTexts()
        self._concurrency_retry_ms = round(concurrency_retry_after_s * 1000)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def degraded(self) -> bool:
        """Never: there is no backend to lose."""
        return False

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        reserve_tokens: int,
        stream: bool,
        *,
        prompt_tokens: int = 0,
    ) -> Admission:
        """Measure and count in one step; raise ``RateLimited`` when anything is full.

        Each limited window is measured once (and expired at most once); only a refusal
        works out every dimension's ``Retry-After`` and reset (``_checks``).
        """
        if spec.unlimited:
            return UnlimitedAdmission()
        now_ms = self.now_ms()
        bucket = self._buckets.get(key) or self._buckets.setdefault(key, _Bucket(self._shape))
        reserve = clamp_reservation(spec, reserve_tokens)
        rpm, tpm, cap = spec.requests_per_minute, spec.tokens_per_minute, spec.concurrent_streams
        takes_stream = stream and cap is not None
        requests_used = 0 if rpm is None else bucket.requests.used(now_ms)
        tokens_used = 0 if tpm is None else bucket.tokens.used(now_ms)
        if (  # the same test as each Check.fits: used + cost <= limit
            (rpm is not None and requests_used + 1 > rpm)
            or (tpm is not None and tokens_used + reserve > tpm)
            or (cap is not None and stream and bucket.streams + 1 > cap)
        ):
            raise refusal(key, self._checks(bucket, spec, reserve, takes_stream, now_ms))
        # counted now, every window resets when the current slot leaves it
        reset = self._reset_texts.text(self._window_ms - now_ms % self._slot_ms)
        headers: dict[str, str] = {}
        if rpm is not None:
            bucket.requests.add(now_ms, 1)
            add_usage(headers, "requests", rpm, requests_used + 1, reset)
        slot = 0
        if tpm is not None:
            slot = bucket.tokens.add(now_ms, reserve)
            add_usage(headers, "tokens", tpm, tokens_used + reserve, reset)
        bucket.streams += takes_stream
        ledger = TokenLedger(reserve, slot, prompt_tokens)
        return LocalAdmission(self, bucket, tpm, ledger, takes_stream, headers)

    async def aclose(self) -> None:
        """Nothing to release."""

    def now_ms(self) -> int:
        """The clock in whole milliseconds."""
        return int(self._clock() * 1000)

    def _checks(
        self, bucket: _Bucket, spec: LimitSpec, reserve: int, takes_stream: bool, now_ms: int
    ) -> list[Check]:
        """Measure each limited dimension of ``bucket`` for this request."""
        checks: list[Check] = []
        if spec.requests_per_minute is not None:
            checks.append(
                _window_check("requests", bucket.requests, spec.requests_per_minute, 1, now_ms)
            )
        if spec.tokens_per_minute is not None:
            checks.append(
                _window_check("tokens", bucket.tokens, spec.tokens_per_minute, reserve, now_ms)
            )
        if takes_stream and spec.concurrent_streams is not None:
            checks.append(
                Check(
                    "concurrency",
                    spec.concurrent_streams,
                    bucket.streams,
                    1,
                    self._concurrency_retry_ms,
                    0,
                    0,
                )
            )
        return checks


def clamp_reservation(spec: LimitSpec, reserve_tokens: int) -> int:
    """Cap a reservation at the whole budget, so a large ``max_tokens`` can still run.

    A request that asks for more than a minute's budget is admitted when the window is
    empty, holding all of it; what it really generates is counted at ``settle``.
    """
    reserve = max(0, reserve_tokens)
    if spec.tokens_per_minute is None:
        return reserve
    return min(reserve, spec.tokens_per_minute)


def _window_check(
    dimension: Literal["requests", "tokens"],
    window: SlidingWindow,
    limit: int,
    cost: int,
    now_ms: int,
) -> Check:
    """One sliding-window dimension as a :class:`Check`."""
    shape = window.shape
    return Check(
        dimension,
        limit,
        window.used(now_ms),
        cost,
        window.retry_after_ms(now_ms, cost, limit),
        window.reset_ms(now_ms),
        shape.expires_at_ms(shape.slot_of(now_ms)) - now_ms,
    )


class LocalAdmission(Admission):
    """An admission counted in this process's windows."""

    __slots__ = (
        "_bucket",
        "_exceeded",
        "_ledger",
        "_limiter",
        "_settled",
        "_stream",
        "_token_limit",
    )

    def __init__(
        self,
        limiter: LocalLimiter,
        bucket: _Bucket,
        token_limit: int | None,
        ledger: TokenLedger,
        stream: bool,
        headers: dict[str, str],
    ) -> None:
        super().__init__(headers)
        self._limiter = limiter
        self._bucket = bucket
        self._token_limit = token_limit
        self._ledger = ledger
        self._stream = stream
        self._exceeded = False
        self._settled = False

    def charge(self, tokens: int) -> bool:
        """Add to the ledger; count any overage in the window right away."""
        ledger = self._ledger
        ledger.used += tokens
        if self._token_limit is None or self._settled:
            return self._exceeded
        over = ledger.pending
        if over > 0:
            now_ms = self._limiter.now_ms()
            self._bucket.tokens.add(now_ms, over)
            ledger.applied += over
            self._exceeded |= self._bucket.tokens.used(now_ms) > self._token_limit
        return self._exceeded

    async def settle(self, actual_tokens: int) -> None:
        """Correct the window to ``actual_tokens`` and free the stream slot, once."""
        if self._settled:
            return
        self._settled = True
        if self._stream:
            self._bucket.streams -= 1
        if self._token_limit is None:
            return
        delta = self._ledger.settle_delta(actual_tokens)
        now_ms = self._limiter.now_ms()
        if delta < 0:
            reserved = self._ledger.reserved
            self._bucket.tokens.refund(
                now_ms, self._ledger.slot, -delta if -delta < reserved else reserved
            )
        elif delta > 0:
            self._bucket.tokens.add(now_ms, delta)
