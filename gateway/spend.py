"""Spend and budgets: what each team and key used per calendar day and month, and the cap.

    admission   `check`: a team or key whose budget of this period is spent is refused,
                429 insufficient_quota, Retry-After until the period resets (and
                `x-should-retry: false`, so the OpenAI SDKs do not retry it)
    plan        `open`: the request's bill, fed by the ledger's LiveCount
    every tick  (~250 ms) the growth of every bill in flight since the last tick: into
                `gateway_cost_usd_total` and, as one batch, into the spend store; a stream
                whose team or key went over budget is marked for the cut policy
    settle      the exact remainder: the final tally (the upstream's usage when it sent one)
                minus what the ticks charged; a cut, disconnected or failed stream is charged
                what was counted

A request is charged to its team and, for a named key, to the key as well; each charge goes
to the day and the month it falls in. Nothing here runs per event: LiveCount's counts are
read at each tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from .config import Settings, Team, TeamKey, named_keys
from .errors import QuotaExceeded, ServiceUnavailable
from .periods import Now, Periods
from .pricing import Pricing, Rates
from .spend_store import LocalStore, RedisStore, SpendStore

if TYPE_CHECKING:
    from .ledger import LiveCount
    from .metrics import GatewayMetrics

log = structlog.get_logger("gateway.spend")

#: how often the live growth of the streams in flight is charged
TICK_S = 0.25
#: every this many ticks (a second), the budget gauges are read afresh
REFRESH_TICKS = 4
#: budget name -> (period kind, 0 for tokens or 1 for USD)
_BUDGET_AXES = {
    "tokens_per_day": ("day", 0),
    "tokens_per_month": ("month", 0),
    "usd_per_day": ("day", 1),
    "usd_per_month": ("month", 1),
}


@dataclass(frozen=True, slots=True, eq=False)
class Subject:
    """Whom spend is charged to: a team, or one of its named keys."""

    id: str
    team: str
    key: str  # the key's name, or "none" for the team itself
    caps: dict[str, float]

    @classmethod
    def of(cls, team: Team, key: TeamKey | None) -> Subject:
        if key is None:
            return cls(f"team:{team.name}", team.name, "none", team.budgets.caps())
        return cls(f"team:{team.name}:key:{key.name}", team.name, key.name, key.budgets.caps())

    def store_key(self, now: Now, kind: str) -> str:
        return f"{self.id}|{now.of(kind).id}"


def subjects_of(team: Team, key: TeamKey | None) -> tuple[Subject, ...]:
    """The team, and the named key if there is one."""
    if key is None:
        return (Subject.of(team, None),)
    return (Subject.of(team, None), Subject.of(team, key))


class Bill:
    """One request's running bill: what the ticks charged so far, from its live count."""

    __slots__ = ("charged_tokens", "charged_usd", "cost", "live", "prompt", "rates", "subjects")

    def __init__(
        self,
        live: LiveCount,
        prompt: int,
        rates: Rates | None,
        subjects: tuple[Subject, ...],
        cost: Any,
    ) -> None:
        self.live, self.prompt, self.rates, self.subjects = live, prompt, rates, subjects
        self.cost = cost  # the DebtCounter of gateway_cost_usd_total{team, model}
        self.charged_tokens = 0
        self.charged_usd = 0.0

    def growth(self) -> tuple[int, float]:
        """What the live count added since the last charge."""
        completion = self.live.completion
        tokens = self.prompt + completion
        usd = 0.0 if self.rates is None else self.rates.cost(self.prompt, 0, completion)
        return tokens - self.charged_tokens, usd - self.charged_usd


class SpendBook:
    """The process's spend: bills in flight, the periods, the store, the pricing table."""

    def __init__(
        self,
        settings: Settings,
        store: SpendStore,
        periods: Periods,
        metrics: GatewayMetrics,
    ) -> None:
        self.store = store
        self.periods = periods
        self.metrics = metrics
        self.configure(settings)
        self._bills: set[Bill] = set()
        self._ticker: asyncio.Task[None] | None = None

    def configure(self, settings: Settings) -> None:
        """New prices and policies apply to new requests (a reload); spend is kept."""
        self.pricing = Pricing(settings)
        self.fail_open = settings.limits.on_backend_error == "fail_open"
        self.cut = settings.limits.on_token_budget_exceeded == "cut"
        #: every team and named key with a budget: their gauges follow the periods
        self.capped = [
            subject
            for team in settings.teams
            for key in (None, *named_keys(team))
            if (subject := Subject.of(team, key)).caps
        ]

    @property
    def degraded(self) -> bool:
        return self.store.degraded

    async def start(self) -> None:
        await self.store.start()
        self._ticker = asyncio.create_task(self._tick_every())

    async def aclose(self) -> None:
        """Charge what the bills in flight counted, then close the store."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._charge_growth()
        await self.store.aclose()

    # -- admission ---------------------------------------------------------------------------

    async def check(self, subjects: tuple[Subject, ...]) -> None:
        """Refuse (QuotaExceeded) when a budget of a subject is spent for this period."""
        capped = [s for s in subjects if s.caps]
        if not capped:
            return
        now = self.periods.now()
        await self.store.load(k for s in capped for k in _keys(s, now))
        if self.store.degraded:
            if self.fail_open:
                return
            raise ServiceUnavailable(
                "The shared limits backend is unreachable.",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            )
        for subject in capped:
            self._update_ratios(subject, now)
            for budget, cap in subject.caps.items():
                used = self._used(subject, now, budget)
                if used >= cap:
                    self.metrics.rate_limited.labels(subject.team, "budget").inc()
                    raise _refusal(subject, budget, cap, used, now, self.periods)

    def _used(self, subject: Subject, now: Now, budget: str) -> float:
        kind, axis = _BUDGET_AXES[budget]
        return self.store.known(subject.store_key(now, kind))[axis]

    def _update_ratios(self, subject: Subject, now: Now) -> None:
        gauge = self.metrics.budget_used_ratio
        for budget, cap in subject.caps.items():
            used = self._used(subject, now, budget)
            gauge.labels(subject.team, subject.key, budget).set(used / cap)

    # -- bills ------------------------------------------------------------------------------

    def rates_for(self, model: str | None) -> Rates | None:
        return None if model is None else self.pricing.rates_for(model)

    def open(
        self,
        live: LiveCount,
        prompt: int,
        rates: Rates | None,
        subjects: tuple[Subject, ...],
        labels: tuple[str, str],
    ) -> Bill:
        """A request's bill, charged from `live` at each tick until `settle`."""
        bill = Bill(live, prompt, rates, subjects, self.metrics.settled_cost.labels(*labels))
        self._bills.add(bill)
        return bill

    async def settle(self, bill: Bill, prompt: int, cached: int, completion: int) -> float:
        """Charge the exact remainder of the final tally; the request's cost, in USD."""
        self._bills.discard(bill)
        usd = 0.0 if bill.rates is None else bill.rates.cost(prompt, cached, completion)
        bill.cost.settle(usd, bill.charged_usd)
        self._charge(bill, prompt + completion - bill.charged_tokens, usd - bill.charged_usd)
        if any(subject.caps for subject in bill.subjects):
            await self._push(bill.subjects)  # the next admission decides on it: now
        return usd  # (spend with no budget on it goes with the next tick's batch)

    def _charge(self, bill: Bill, tokens: int, usd: float) -> None:
        bill.charged_tokens += tokens
        bill.charged_usd += usd
        if tokens or usd:
            now = self.periods.now()
            for subject in bill.subjects:
                self._add(subject, tokens, usd, now)

    def _add(self, subject: Subject, tokens: int, usd: float, now: Now) -> None:
        """Queue a charge to the subject's day and month."""
        for period in (now.day, now.month):
            self.store.add(f"{subject.id}|{period.id}", tokens, usd, period.ends_at)

    def _charge_growth(self) -> list[Subject]:
        """The live growth of every bill in flight since the last tick, summed per subject
        into one charge each; the subjects charged."""
        sums: dict[str, tuple[Subject, int, float]] = {}
        for bill in self._bills:
            tokens, usd = bill.growth()
            if not tokens and not usd:
                continue
            if usd > 0:
                bill.cost.inc(usd)
            bill.charged_tokens += tokens
            bill.charged_usd += usd
            for subject in bill.subjects:
                _, summed_tokens, summed_usd = sums.get(subject.id, (subject, 0, 0.0))
                sums[subject.id] = (subject, summed_tokens + tokens, summed_usd + usd)
        now = self.periods.now()
        for subject, tokens, usd in sums.values():
            self._add(subject, tokens, usd, now)
        return [subject for subject, _, _ in sums.values()]

    async def _tick_every(self) -> None:
        for n in itertools.count(1):
            await asyncio.sleep(TICK_S)
            try:
                await self.tick(refresh=n % REFRESH_TICKS == 0)
            except Exception:
                log.exception("spend_tick_failed")

    async def tick(self, refresh: bool = True) -> None:
        """Charge the live growth as one batch; mark streams over a budget for the cut.

        With `refresh`, read every budgeted subject's spend (one Redis call; other replicas
        charge too) and set every `gateway_budget_used_ratio`, so a gauge drops to 0 when a
        period ends even if nothing is charged in the new one."""
        await self.store.recover()
        await self._push(self._charge_growth())
        if refresh and self.capped:
            now = self.periods.now()
            await self.store.load(k for s in self.capped for k in _keys(s, now))
            for subject in self.capped:
                self._update_ratios(subject, now)

    async def _push(self, touched: Iterable[Subject]) -> None:
        await self.store.flush()
        now = self.periods.now()
        over: set[str] = set()
        for subject in touched:
            if not subject.caps:
                continue
            self._update_ratios(subject, now)
            if any(self._used(subject, now, b) >= cap for b, cap in subject.caps.items()):
                over.add(subject.id)
        if over and self.cut:
            for bill in self._bills:
                if any(s.id in over for s in bill.subjects):
                    bill.live.over = True

    # -- the usage view ---------------------------------------------------------------------

    async def usage(self, team: Team, key: TeamKey | None) -> dict[str, Any]:
        """The caller's team's and key's spend and remaining budget per period, as JSON."""
        subjects = subjects_of(team, key)
        now = self.periods.now()
        await self.store.flush()
        await self.store.load(k for s in subjects for k in _keys(s, now))
        return {
            "team": team.name,
            "key": None if key is None else key.name,
            "timezone": str(self.periods.zone),
            "degraded": self.store.degraded,
            "team_usage": self._report(subjects[0], now),
            "key_usage": self._report(subjects[1], now) if key is not None else None,
        }

    def _report(self, subject: Subject, now: Now) -> dict[str, Any]:
        periods: dict[str, Any] = {}
        for kind in ("day", "month"):
            period = now.of(kind)
            tokens, usd = self.store.known(subject.store_key(now, kind))
            budgets = {}
            for budget, cap in subject.caps.items():
                if _BUDGET_AXES[budget][0] == kind:
                    used = (tokens, usd)[_BUDGET_AXES[budget][1]]
                    budgets[budget] = {"limit": cap, "remaining": max(0.0, cap - used)}
            periods[kind] = {
                "period": period.id[1:],
                "resets_at": _iso(period.ends_at, self.periods),
                "tokens": tokens,
                "usd": round(usd, 9),
                "budgets": budgets,
            }
        return periods


def store_params(settings: Settings) -> tuple[object, ...]:
    """What decides the store: a reload that changes any of it starts a new one."""
    limits = settings.limits
    if limits.backend == "redis":
        return ("redis", limits.redis_url)
    return ("local", limits.state_file if settings.budgets_enabled else None)


def create_store(settings: Settings) -> SpendStore:
    """Redis with the redis backend; else memory, kept in the state file when a budget is
    configured (and only then)."""
    kind, where = store_params(settings)
    if kind == "redis":
        assert isinstance(where, str)
        return RedisStore(where)
    return LocalStore(None if where is None else Path(str(where)))


async def create_spend_book(settings: Settings, metrics: GatewayMetrics) -> SpendBook:
    """The book, its store started (from the event loop; the zone is read in a thread)."""
    zone = await asyncio.to_thread(ZoneInfo, settings.limits.budget_timezone)
    book = SpendBook(settings, create_store(settings), Periods(zone), metrics)
    await book.start()
    return book


def _keys(subject: Subject, now: Now) -> list[str]:
    return [subject.store_key(now, "day"), subject.store_key(now, "month")]


def _iso(at: float, periods: Periods) -> str:
    return datetime.fromtimestamp(at, periods.zone).isoformat()


def _refusal(
    subject: Subject, budget: str, cap: float, used: float, now: Now, periods: Periods
) -> QuotaExceeded:
    period = now.of(_BUDGET_AXES[budget][0])
    whose = f"team {subject.team}" + ("" if subject.key == "none" else f", key {subject.key}")
    retry_s = max(1, math.ceil(period.ends_at - now.at))
    shown = f"{used:.6g} of {cap:.6g}"
    return QuotaExceeded(
        f"You exceeded your budget {budget} ({whose}): used {shown}. "
        f"It resets at {_iso(period.ends_at, periods)}.",
        headers={"Retry-After": str(retry_s), "x-should-retry": "false"},
    )


__all__ = ["Bill", "QuotaExceeded", "SpendBook", "Subject", "subjects_of"]
