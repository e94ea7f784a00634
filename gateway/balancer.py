"""Which upstream serves a request: the one owner of that decision.

A route's `upstreams` are tiers, tried in order; the members of a tier are balanced:

    least_inflight  power of two choices on (in-flight + 1) / weight (a tier of two compares
                    both; one of one is taken)
    weighted        random, by weight
    affinity        rendezvous hashing of the request's key (the route's `affinity_header`,
                    else the body's `user` or `previous_response_id`) over the tier's usable
                    members, so a conversation keeps its replica while that one is healthy;
                    a member with more than 1.25 x the tier's mean in-flight + 1 passes the
                    request to the next member in the key's order (bounded load)

A request asks `choose` for each attempt, with what it tried so far (`Tried`): first every
usable member it has not tried, tier by tier; then, while `retry.attempts` allows, a retry of a
usable member it tried (after a backoff, see `gateway.upstream`); and if nothing at all is usable
on its first attempt, the route's least-recently-failed upstream, rather than a 503 at once.

In-flight counts whole streams, per process, on every endpoint: `start` when an attempt begins,
`end` when it fails or its answer ends (`gateway.upstream.Opened` ends it once, in every
ending). Passive health (`gateway.upstream_health`) is fed by `succeeded`, `failed` and
`asked_to_wait`; the balancer never cools down the last healthy upstream of the failing
request's route. State is kept by upstream name and survives a reload (`configure`): a changed
upstream keeps its in-flight count and its health (its address may have changed, but a
cooldown's end or its trial request will tell).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from aiolimiter import AsyncLimiter
from prometheus_client import Gauge

from .config import Balance, Retry, Route, Settings, Upstream
from .metrics import GatewayMetrics
from .upstream_health import MAX_RETRY_AFTER_S, UpstreamHealth

log = structlog.get_logger("gateway")

#: affinity's bounded load: a member above this x the tier's mean in-flight (+1) is skipped
AFFINITY_LOAD_FACTOR = 1.25
#: requests waiting for one upstream's pacing limiter, at most (past it: another member or 429)
MAX_PACE_WAITERS = 1024

#: per request, how many times each upstream was tried
Tried = dict[str, int]
_NOTHING_TRIED: Mapping[str, int] = {}


class UpstreamState:
    """One upstream as the balancer sees it: weight, in-flight streams, health, pacing."""

    __slots__ = (
        "_healthy",
        "_inflight_gauge",
        "health",
        "inflight",
        "key",
        "limiter",
        "name",
        "pace_waiters",
        "rpm",
        "weight",
    )

    def __init__(self, name: str, settings: Upstream, metrics: GatewayMetrics) -> None:
        self.name = name
        self.key = name.encode() + b"\x00"
        self.inflight = 0
        self.pace_waiters = 0
        self.health = UpstreamHealth(settings.health)
        self._inflight_gauge: Gauge = metrics.upstream_inflight.labels(name)
        self._healthy: Gauge = metrics.upstream_healthy.labels(name)
        self._healthy.set(1)
        self.rpm: float | None = None
        self.limiter: AsyncLimiter | None = None
        self.weight = 1.0
        self.reconfigure(settings)

    def reconfigure(self, settings: Upstream) -> None:
        self.weight = settings.weight
        self.health.reconfigure(settings.health)
        if settings.max_requests_per_minute != self.rpm:
            self.rpm = settings.max_requests_per_minute
            self.limiter = None if self.rpm is None else AsyncLimiter(self.rpm, 60.0)

    def start(self) -> None:
        self.inflight += 1
        self._inflight_gauge.inc()

    def end(self) -> None:
        self.inflight -= 1
        self._inflight_gauge.dec()

    def load(self) -> float:
        return (self.inflight + 1) / self.weight

    def paced_full(self) -> bool:
        return self.limiter is not None and not self.limiter.has_capacity()


class Paced(Exception):
    """An upstream's pacing limiter has no capacity within the request's wait bound."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A route's tiers and policy, computed once per configuration."""

    route: Route
    tiers: tuple[tuple[UpstreamState, ...], ...]
    members: tuple[UpstreamState, ...]
    balance: Balance
    affinity_header: str | None
    retry: Retry
    #: sends per request at most: retry.attempts, and at least one per upstream
    attempts: int
    #: the longest a request waits in all (backoffs, pacing) before its answer
    budget_s: float


class Balancer:
    """Upstream state by name, and the choice of an upstream for each attempt."""

    def __init__(
        self,
        settings: Settings,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self.upstreams: dict[str, UpstreamState] = {}
        self._plans: dict[int, RoutePlan] = {}
        self._budget_s = settings.limits.queue_timeout_s
        self.configure(settings)

    # -- configuration -------------------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Apply a (re)loaded configuration: state of upstreams it keeps is kept."""
        for name, upstream in settings.upstreams.items():
            state = self.upstreams.get(name)
            if state is None:
                self.upstreams[name] = UpstreamState(name, upstream, self._metrics)
            else:
                state.reconfigure(upstream)
        self._budget_s = settings.limits.queue_timeout_s
        self._plans = {id(route): self._plan(route) for route in settings.routes}

    def plan(self, route: Route) -> RoutePlan:
        """The route's plan (one a reload replaced is built again: rare, and cheap)."""
        found = self._plans.get(id(route))
        if found is None or found.route is not route:
            found = self._plan(route)
        return found

    def pinned(self, plan: RoutePlan, name: str) -> RoutePlan:
        """`plan` narrowed to the one upstream `name`: a request only it can answer (about a
        response it created). Retries as the route's; no failover to another upstream."""
        state = self.upstreams[name]
        return dataclasses.replace(
            plan, tiers=((state,),), members=(state,), attempts=max(plan.retry.attempts, 1)
        )

    def _plan(self, route: Route) -> RoutePlan:
        tiers = tuple(tuple(self.upstreams[name] for name in tier) for tier in route.tiers)
        members = tuple(state for tier in tiers for state in tier)
        retry = route.retry
        budget = self._budget_s if retry.budget_s is None else retry.budget_s
        return RoutePlan(
            route=route,
            tiers=tiers,
            members=members,
            balance=route.balance,
            affinity_header=route.affinity_header,
            retry=retry,
            attempts=max(retry.attempts, len(members)),
            budget_s=budget,
        )

    # -- choosing --------------------------------------------------------------------------------

    def choose(
        self,
        plan: RoutePlan,
        tried: Mapping[str, int] | None,
        key: bytes | None = None,
        sent: int = 0,
    ) -> UpstreamState | None:
        """The upstream for the next attempt, or None: nothing more to try. `tried` counts the
        request's sends by upstream (plan.attempts or more: not to be retried), `sent` all."""
        now = self._clock()
        if tried is None:
            tried = _NOTHING_TRIED
        elif sent >= plan.attempts:
            return None
        for tier in plan.tiers:
            found = self._pick(plan, tier, tried, key, now, retry=False)
            if found is not None:
                return found
        if tried:
            for tier in plan.tiers:
                found = self._pick(plan, tier, tried, key, now, retry=True)
                if found is not None:
                    return found
            return None
        return min(plan.members, key=lambda state: state.health.last_failure)

    def _pick(
        self,
        plan: RoutePlan,
        tier: tuple[UpstreamState, ...],
        tried: Mapping[str, int],
        key: bytes | None,
        now: float,
        *,
        retry: bool,
    ) -> UpstreamState | None:
        if len(tier) == 1 and not tried:  # the common case: one upstream, a first attempt
            only = tier[0]
            return only if only.health.usable(now) else None
        candidates = [
            state
            for state in tier
            if (state.name in tried) == retry
            and tried.get(state.name, 0) < plan.attempts
            and state.health.usable(now)
        ]
        if len(candidates) > 1:
            open_ = [state for state in candidates if not state.paced_full()]
            candidates = open_ or candidates
        if not candidates:
            return None
        if retry:  # the member tried least so far
            return min(candidates, key=lambda state: tried[state.name])
        return self._balance(plan, candidates, key)

    def _balance(
        self, plan: RoutePlan, candidates: list[UpstreamState], key: bytes | None
    ) -> UpstreamState:
        if len(candidates) == 1:
            return candidates[0]
        if plan.balance == "weighted":
            return self._weighted(candidates)
        if plan.balance == "affinity" and key is not None:
            return _affinity(candidates, key)
        return self._two_choices(candidates)

    def _two_choices(self, candidates: list[UpstreamState]) -> UpstreamState:
        if len(candidates) == 2:
            a, b = candidates
        else:
            i = self._rng.randrange(len(candidates))
            j = self._rng.randrange(len(candidates) - 1)
            a, b = candidates[i], candidates[j + (j >= i)]
        load_a, load_b = a.load(), b.load()
        if load_a == load_b:
            return a if self._rng.random() < 0.5 else b
        return a if load_a < load_b else b

    def _weighted(self, candidates: list[UpstreamState]) -> UpstreamState:
        point = self._rng.random() * sum(state.weight for state in candidates)
        for state in candidates:
            point -= state.weight
            if point < 0:
                return state
        return candidates[-1]

    # -- what happened ----------------------------------------------------------------------------

    def claim(self, state: UpstreamState) -> bool:
        """An attempt starts on `state`: count it in flight; whether it is the trial request
        of a half-open upstream (its verdict decides the upstream's health)."""
        state.start()
        health = state.health
        if health.half_open and not health.probing and self._clock() >= health.cooled_until:
            health.probing = True
            log.info("upstream_probing", upstream=state.name)
            return True
        return False

    def abandoned(self, state: UpstreamState, probe: bool) -> None:
        """An attempt ended with no verdict (the client left, a local limit): a trial request
        that gave no answer lets the next request try."""
        if probe:
            state.health.probing = False

    def succeeded(self, state: UpstreamState) -> None:
        if state.health.succeed():
            state._healthy.set(1)
            log.info("upstream_restored", upstream=state.name)

    def failed(self, plan: RoutePlan, state: UpstreamState, reason: str) -> None:
        """A failure before the first byte (connect, reset, timeout, 5xx...)."""
        health = state.health
        now = self._clock()
        probe_failed = health.half_open
        if health.fail(now) and (probe_failed or self._others_healthy(plan, state, now)):
            cause = "probe_failed" if probe_failed else "failures"
            self._cool(state, now, health.settings.cooldown_s, cause, trial=True, why=reason)

    def asked_to_wait(self, plan: RoutePlan, state: UpstreamState, retry_after_s: float) -> None:
        """A 429 or 503 with Retry-After: no failure, a pause of that long (capped)."""
        now = self._clock()
        if self._others_healthy(plan, state, now):
            seconds = min(retry_after_s, MAX_RETRY_AFTER_S)
            self._cool(state, now, seconds, "retry_after", trial=False, why="retry_after")
        else:  # it answered: a trial request it was is over, and the next one may try
            state.health.probing = False

    def retried(self, state: UpstreamState, reason: str) -> None:
        """Another attempt follows a failure on `state`."""
        self._metrics.upstream_retries.labels(state.name, reason).inc()

    def _others_healthy(self, plan: RoutePlan, state: UpstreamState, now: float) -> bool:
        """Never cool down the last healthy upstream of the route."""
        return any(other is not state and other.health.trusted(now) for other in plan.members)

    def _cool(
        self, state: UpstreamState, now: float, seconds: float, cause: str, *, trial: bool, why: str
    ) -> None:
        state.health.cool(now, seconds, trial=trial)
        state._healthy.set(0)
        self._metrics.upstream_cooldowns.labels(state.name, cause).inc()
        log.warning(
            "upstream_cooled_down",
            upstream=state.name,
            reason=cause,
            failure=why,
            cooldown_s=round(seconds, 3),
        )
        with_loop = _running_loop()
        if with_loop is not None:  # refresh the gauge when the cooldown ends
            with_loop.call_later(seconds, self._cooldown_over, state)

    def _cooldown_over(self, state: UpstreamState) -> None:
        health = state.health
        if self.upstreams.get(state.name) is not state or self._clock() < health.cooled_until:
            return  # removed, or cooled down again since
        if not health.half_open:
            state._healthy.set(1)
            log.info("upstream_restored", upstream=state.name)

    # -- pacing ----------------------------------------------------------------------------------

    async def pace(self, state: UpstreamState, deadline: float) -> None:
        """Pass the upstream's pacing limiter, waiting until `deadline` at most (Paced)."""
        limiter = state.limiter
        if limiter is None:
            return
        if limiter.has_capacity():
            await limiter.acquire()  # (returns at once: there is capacity)
            return
        wait_s = (state.pace_waiters + 1) * limiter.time_period / limiter.max_rate
        remaining = deadline - self._clock()
        if wait_s > remaining or state.pace_waiters >= MAX_PACE_WAITERS:
            raise Paced(wait_s)
        state.pace_waiters += 1
        try:
            async with asyncio.timeout(remaining):
                await limiter.acquire()
        except TimeoutError:
            raise Paced(wait_s) from None
        finally:
            state.pace_waiters -= 1

    def now(self) -> float:
        return self._clock()

    def retry_after(self, plan: RoutePlan) -> str:
        """Retry-After for a request none of the route's upstreams served: until the first
        cooldown ends (1 s at least)."""
        now = self._clock()
        ends = [state.health.cooled_until - now for state in plan.members]
        return str(max(1, math.ceil(min(ends))))


def affinity_key(plan: RoutePlan, headers: Mapping[str, str], doc: object) -> bytes | None:
    """The request's affinity key: the route's header, else the body's `user` or
    `previous_response_id` (None: the request is balanced as least_inflight)."""
    if plan.balance != "affinity":
        return None
    if plan.affinity_header is not None:
        value = headers.get(plan.affinity_header)
        if value:
            return value.encode()
    if isinstance(doc, dict):
        for field in ("user", "previous_response_id"):
            value = doc.get(field)
            if isinstance(value, str) and value:
                return value.encode()
    return None


def _affinity(candidates: list[UpstreamState], key: bytes) -> UpstreamState:
    """Weighted rendezvous hashing, with a bounded load."""
    ranked = sorted(candidates, key=lambda state: _score(state, key), reverse=True)
    bound = AFFINITY_LOAD_FACTOR * sum(state.inflight for state in ranked) / len(ranked) + 1
    for state in ranked:
        if state.inflight <= bound:
            return state
    return ranked[0]


def _score(state: UpstreamState, key: bytes) -> float:
    digest = hashlib.blake2b(state.key + key, digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
    return -state.weight / math.log(unit)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
