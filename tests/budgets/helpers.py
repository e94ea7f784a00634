"""What the budget tests share: a spend book on a controllable clock, teams with budgets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from gateway.config import Budgets, Limits, Settings, Team, TeamKey
from gateway.ledger import LiveCount
from gateway.metrics import GatewayMetrics
from gateway.periods import Periods
from gateway.spend import SpendBook, subjects_of
from gateway.spend_store import LocalStore, SpendStore


@dataclass
class Clock:
    """Seconds since the epoch, set by the test."""

    at: float

    def __call__(self) -> float:
        return self.at

    def set(self, when: datetime) -> None:
        self.at = when.timestamp()


def at(zone: str, *fields: int) -> datetime:
    """A wall-clock time in `zone` (year, month, day, hour, minute, second, microsecond)."""
    return datetime(*fields, tzinfo=ZoneInfo(zone))  # type: ignore[arg-type,misc]


def book_on(
    settings: Settings, clock: Callable[[], float], store: SpendStore | None = None
) -> SpendBook:
    """A spend book with its own registry, on `clock`, in the settings' time zone."""
    metrics = GatewayMetrics(CollectorRegistry())
    zone = ZoneInfo(settings.limits.budget_timezone)
    return SpendBook(settings, store or LocalStore(None), Periods(zone, clock), metrics)


def budget_team(name: str = "search", key: TeamKey | None = None, **budgets: float) -> Team:
    keys: tuple[str | TeamKey, ...] = (f"sk-{name}-plain",) + (() if key is None else (key,))
    return Team(name=name, keys=keys, budgets=Budgets(**budgets))  # type: ignore[arg-type]


def settings_with(*teams: Team, zone: str = "UTC") -> Settings:
    return Settings(teams=teams, limits=Limits(budget_timezone=zone))


async def spend(book: SpendBook, team: Team, tokens: int, key: TeamKey | None = None) -> None:
    """A request of `tokens` completion tokens (no prompt), settled at once."""
    metrics = book.metrics
    live = LiveCount(
        metrics.settled_tokens.labels(team.name, "m", "completion"),
        metrics.settled_tokens.labels(team.name, "m", "reasoning"),
        [],
    )
    bill = book.open(live, 0, None, subjects_of(team, key), (team.name, "m"))
    await book.settle(bill, 0, 0, tokens)
