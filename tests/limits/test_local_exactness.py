"""The local limiter answers exactly as the window arithmetic written the plain way.

The limiter measures each window once per admission and builds its headers straight from
the counts; the reference below keeps every slot's count forever and takes every sum anew,
so any shortcut that changes a decision, a header or a refusal shows up as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.limits import Admission, LimitSpec, LocalLimiter, RateLimited
from gateway.limits.base import Check, refusal
from gateway.limits.headers import Dimension, ResetTexts, format_duration

SLOT_MS, SLOTS = 100, 10  # a one-second window of ten slots: time passes within a test


@dataclass
class PlainWindow:
    """Every slot's count, never dropped; what is in the window is worked out each time."""

    counts: dict[int, int] = field(default_factory=dict)

    def live(self, now_ms: int) -> dict[int, int]:
        oldest = now_ms // SLOT_MS - SLOTS + 1
        return {slot: n for slot, n in sorted(self.counts.items()) if slot >= oldest}

    def used(self, now_ms: int) -> int:
        return sum(self.live(now_ms).values())

    def add(self, now_ms: int, amount: int) -> int:
        slot = now_ms // SLOT_MS
        self.counts[slot] = self.counts.get(slot, 0) + amount
        return slot

    def refund(self, now_ms: int, slot: int, amount: int) -> None:
        if slot in self.live(now_ms):
            self.counts[slot] -= min(self.counts[slot], amount)

    def retry_ms(self, now_ms: int, cost: int, limit: int) -> int:
        used = self.used(now_ms)
        if used + cost <= limit:
            return 0
        freed = 0
        for slot, n in self.live(now_ms).items():
            freed += n
            if used - freed + cost <= limit:
                return max(0, (slot + SLOTS) * SLOT_MS - now_ms)
        return SLOTS * SLOT_MS

    def reset_ms(self, now_ms: int) -> int:
        live = self.live(now_ms)
        if sum(live.values()) == 0:
            return 0
        return max(0, (max(live) + SLOTS) * SLOT_MS - now_ms)


@dataclass
class PlainLimiter:
    """One key's limits on plain windows: admit (all or nothing) and settle."""

    spec: LimitSpec
    requests: PlainWindow = field(default_factory=PlainWindow)
    tokens: PlainWindow = field(default_factory=PlainWindow)
    streams: int = 0

    def admit(self, now_ms: int, reserve: int, stream: bool) -> dict[str, str] | RateLimited:
        spec = self.spec
        if spec.tokens_per_minute is not None:
            reserve = min(reserve, spec.tokens_per_minute)
        windows: tuple[tuple[Dimension, PlainWindow, int | None, int], ...] = (
            ("requests", self.requests, spec.requests_per_minute, 1),
            ("tokens", self.tokens, spec.tokens_per_minute, reserve),
        )
        checks = [
            Check(
                dimension,
                limit,
                window.used(now_ms),
                cost,
                window.retry_ms(now_ms, cost, limit),
                window.reset_ms(now_ms),
                (now_ms // SLOT_MS + SLOTS) * SLOT_MS - now_ms,
            )
            for dimension, window, limit, cost in windows
            if limit is not None
        ]
        takes_stream = stream and spec.concurrent_streams is not None
        if takes_stream and spec.concurrent_streams is not None:
            checks.append(
                Check("concurrency", spec.concurrent_streams, self.streams, 1, 1000, 0, 0)
            )
        if any(c.used + c.cost > c.limit for c in checks):
            return refusal("team:t", checks)
        headers: dict[str, str] = {}
        for check in checks:
            if check.dimension == "concurrency":
                continue
            (self.requests if check.dimension == "requests" else self.tokens).add(
                now_ms, check.cost
            )
            used = check.used + check.cost
            headers[f"x-ratelimit-limit-{check.dimension}"] = str(check.limit)
            headers[f"x-ratelimit-remaining-{check.dimension}"] = str(max(0, check.limit - used))
            headers[f"x-ratelimit-reset-{check.dimension}"] = format_duration(
                check.admitted_reset_ms
            )
        self.streams += takes_stream
        return headers

    def settle(
        self, now_ms: int, admitted_at: int, reserve: int, stream: bool, actual: int
    ) -> None:
        spec = self.spec
        self.streams -= stream and spec.concurrent_streams is not None
        if spec.tokens_per_minute is None:
            return
        reserve = min(reserve, spec.tokens_per_minute)
        if actual < reserve:
            self.tokens.refund(now_ms, admitted_at // SLOT_MS, reserve - actual)
        elif actual > reserve:
            self.tokens.add(now_ms, actual - reserve)


limits = st.one_of(st.none(), st.integers(1, 8))
specs = st.builds(
    LimitSpec,
    requests_per_minute=limits,
    tokens_per_minute=st.one_of(st.none(), st.integers(1, 2_000)),
    concurrent_streams=limits,
)
#: (ms since the previous step, reservation, streaming, settle the oldest with this many)
steps = st.lists(
    st.tuples(
        st.integers(0, 400),
        st.integers(-5, 900),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 1_200)),
    ),
    max_size=60,
)


@settings(deadline=None)  # timing is the bench's business, not a test's
@given(specs, steps)
async def test_admissions_headers_refusals_and_settles_match_the_plain_arithmetic(
    spec: LimitSpec, script: list[tuple[int, int, bool, int | None]]
) -> None:
    now = [5_000]
    limiter = LocalLimiter(
        window_s=SLOT_MS * SLOTS / 1000, slots=SLOTS, clock=lambda: now[0] / 1000
    )
    plain = PlainLimiter(spec)
    held: list[tuple[Admission, int, int, bool]] = []
    for gap, reserve, stream, settle in script:
        now[0] += gap
        now_ms = limiter.now_ms()
        if settle is not None and held:
            admission, admitted_at, reserved, streaming = held.pop(0)
            await admission.settle(settle)
            plain.settle(now_ms, admitted_at, max(0, reserved), streaming, settle)
        expected = plain.admit(now_ms, max(0, reserve), stream)
        answer = await admit_or_refusal(limiter, spec, reserve, stream)
        assert answered(answer) == answered(expected)
        if isinstance(answer, Admission):
            held.append((answer, now_ms, reserve, stream))


async def admit_or_refusal(
    limiter: LocalLimiter, spec: LimitSpec, reserve: int, stream: bool
) -> Admission | RateLimited:
    try:
        return await limiter.admit("team:t", spec, reserve, stream)
    except RateLimited as refused:
        return refused


def answered(answer: Admission | RateLimited | dict[str, str]) -> object:
    """What a client sees: the headers (names in order), and for a refusal its message."""
    if isinstance(answer, RateLimited):
        headers = list(answer.headers.items())
        return (answer.limit, answer.retry_after_s, str(answer), headers)
    return list((answer if isinstance(answer, dict) else answer.headers).items())


def test_remembered_reset_texts_are_format_durations_own() -> None:
    texts = ResetTexts(bound=10)
    for ms in [*range(0, 2_000, 7), *range(59_000, 60_001), 3_723_000, 0, 1500]:
        assert texts.text(ms) == format_duration(ms)
        assert texts.text(ms) == format_duration(ms)  # and again, remembered or not
