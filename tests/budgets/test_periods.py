"""Budgets reset exactly when their calendar period ends, in UTC or the configured zone.

A day budget resets at local midnight (also on the days a DST change makes 23 or 25 hours
long); a month budget on the 1st at local midnight, February included. Time is a clock the
test sets, so each check stands a microsecond either side of the boundary.
"""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.periods import Periods
from gateway.spend import QuotaExceeded, subjects_of

from .helpers import Clock, at, book_on, budget_team, settings_with, spend

TICK = timedelta(microseconds=1)


def test_a_day_is_the_calendar_day_in_utc() -> None:
    clock = Clock(at("UTC", 2026, 12, 4, 18, 0).timestamp())
    now = Periods(ZoneInfo("UTC"), clock).now()
    assert now.day.id == "d2026-12-04" and now.month.id == "m2026-12"
    assert now.day.ends_at == at("UTC", 2026, 12, 5).timestamp()
    assert now.month.ends_at == at("UTC", 2027, 1, 1).timestamp()


@pytest.mark.parametrize(
    ("day", "hours"),
    [((2026, 3, 29), 23), ((2026, 10, 25), 25), ((2026, 6, 1), 24)],
    ids=["dst-starts", "dst-ends", "summer"],
)
def test_a_berlin_day_runs_from_local_midnight_to_local_midnight(
    day: tuple[int, int, int], hours: int
) -> None:
    start = at("Europe/Berlin", *day)
    clock = Clock((start + timedelta(hours=12)).timestamp())
    now = Periods(ZoneInfo("Europe/Berlin"), clock).now()
    assert now.day.starts_at == start.timestamp()
    assert now.day.ends_at - now.day.starts_at == hours * 3600


@pytest.mark.parametrize(("month", "days"), [((2027, 2), 28), ((2028, 2), 29), ((2026, 12), 31)])
def test_a_month_runs_from_the_first_to_the_next_first(month: tuple[int, int], days: int) -> None:
    clock = Clock(at("UTC", *month, 10, 8).timestamp())
    now = Periods(ZoneInfo("UTC"), clock).now()
    assert now.month.starts_at == at("UTC", *month, 1).timestamp()
    assert now.month.ends_at - now.month.starts_at == days * 86400


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("UTC", (2026, 12, 4)),
        ("Europe/Berlin", (2026, 12, 4)),
        ("Europe/Berlin", (2026, 3, 29)),  # 23 hours: the clocks go forward at 02:00
        ("Europe/Berlin", (2026, 10, 25)),  # 25 hours: the clocks go back at 03:00
    ],
)
async def test_a_spent_day_budget_admits_again_exactly_at_local_midnight(
    zone: str, day: tuple[int, int, int]
) -> None:
    team = budget_team(tokens_per_day=100)
    after = at(zone, *day).date() + timedelta(days=1)
    midnight = at(zone, after.year, after.month, after.day)  # wall-clock midnight, next day
    clock = Clock(at(zone, *day, 0, 0, 1).timestamp())
    book = book_on(settings_with(team, zone=zone), clock)
    subjects = subjects_of(team, None)
    await spend(book, team, 100)
    clock.set(midnight - TICK)
    with pytest.raises(QuotaExceeded) as refused:
        await book.check(subjects)
    assert "tokens_per_day" in refused.value.message
    assert midnight.isoformat() in refused.value.message
    assert refused.value.headers["Retry-After"] == "1"
    clock.set(midnight)
    await book.check(subjects)  # a new day: admitted


@pytest.mark.parametrize(
    ("zone", "month"),
    [("UTC", (2027, 2)), ("UTC", (2028, 2)), ("Europe/Berlin", (2026, 3)), ("UTC", (2026, 12))],
)
async def test_a_spent_month_budget_admits_again_exactly_on_the_first(
    zone: str, month: tuple[int, int]
) -> None:
    team = budget_team(usd_per_month=1.0, tokens_per_month=50)
    year, number = month
    first_next = at(zone, year + number // 12, number % 12 + 1, 1)
    clock = Clock(at(zone, year, number, 1, 0, 0, 1).timestamp())
    book = book_on(settings_with(team, zone=zone), clock)
    subjects = subjects_of(team, None)
    await spend(book, team, 30)
    clock.set(at(zone, year, number, 20))
    await spend(book, team, 30)  # the same month: 60 of 50
    clock.set(first_next - TICK)
    with pytest.raises(QuotaExceeded) as refused:
        await book.check(subjects)
    assert "tokens_per_month" in refused.value.message
    clock.set(first_next)
    await book.check(subjects)


async def test_the_budget_gauge_drops_to_zero_at_midnight_with_no_request_in_the_new_day() -> None:
    team = budget_team(tokens_per_day=100)
    clock = Clock(at("Europe/Berlin", 2026, 10, 25, 23, 0).timestamp())
    book = book_on(settings_with(team, zone="Europe/Berlin"), clock)
    await spend(book, team, 80)
    labels = {"team": "search", "key": "none", "budget": "tokens_per_day"}
    registry = book.metrics.registry
    assert registry.get_sample_value("gateway_budget_used_ratio", labels) == 0.8
    clock.set(at("Europe/Berlin", 2026, 10, 26))
    await book.tick()
    assert registry.get_sample_value("gateway_budget_used_ratio", labels) == 0
