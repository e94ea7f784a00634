"""Calendar periods of budgets: the day and the month now, in the budget time zone.

A day is a calendar day in `limits.budget_timezone` (UTC by default): it starts at local
midnight, so a day of a DST change is 23 or 25 hours long. A month starts at local midnight on
its 1st. The clock is injectable (`clock`: seconds since the epoch), so tests move time to
the edge of a period; the boundaries are computed once per period, not per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Period:
    """One day or month: its name in keys (`d2026-12-04`, `m2026-12`) and when it ends."""

    kind: str  # "day" or "month"
    id: str
    starts_at: float
    ends_at: float  # seconds since the epoch: when the next period starts


@dataclass(frozen=True, slots=True)
class Now:
    day: Period
    month: Period
    at: float

    def of(self, kind: str) -> Period:
        return self.day if kind == "day" else self.month


class Periods:
    """The current day and month in `zone`, by `clock`."""

    def __init__(self, zone: tzinfo, clock: Clock = time.time) -> None:
        self.zone = zone
        self.clock = clock
        self._now: Now | None = None

    def now(self) -> Now:
        at = self.clock()
        current = self._now
        if current is None or not (current.day.starts_at <= at < current.day.ends_at):
            current = self._now = self._compute(at)
        return Now(current.day, current.month, at)

    def _compute(self, at: float) -> Now:
        today = datetime.fromtimestamp(at, self.zone).date()
        first = today.replace(day=1)
        next_first = (first + timedelta(days=32)).replace(day=1)
        day = Period(
            "day",
            f"d{today.isoformat()}",
            self._midnight(today),
            self._midnight(today + timedelta(days=1)),
        )
        month = Period(
            "month", f"m{first:%Y-%m}", self._midnight(first), self._midnight(next_first)
        )
        return Now(day, month, at)

    def _midnight(self, day: date) -> float:
        """When `day` starts in the zone (midnight; the first instant after a skipped one)."""
        return datetime(day.year, day.month, day.day, tzinfo=self.zone).timestamp()
