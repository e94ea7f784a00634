"""Admission and charging: whether a request may start, and what it reserves.

    the process-wide gate (max_inflight: a bounded wait, then 503 gateway_overloaded)
      -> the prompt estimate (in a thread past ESTIMATE_IN_THREAD_BYTES)
      -> the team's and the key's budgets of this day and month (429 insufficient_quota)
      -> the team's limits, the team's limits for this model, the key's own limits: all or
         nothing (429 rate_limit_exceeded; 503 limits_unavailable when the shared backend is
         down)

An `Admitted` request holds its limiter admissions: the ledger charges them as tokens are
counted (`Admission.charge`, once per metered piece) and `settle` returns what the request did
not use. Refusals raise the error the client is told about; `gateway.outcome` reads the ending
from it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from .app_state import Components
from .auth import Caller
from .config import Team, TeamKey, TeamLimits
from .context import RequestContext
from .errors import RateLimitExceeded, ServiceUnavailable
from .limits import (
    Admission,
    BackendUnavailable,
    InflightGate,
    LimitSpec,
    QueueTimeout,
    RateLimited,
)
from .pricing import Rates
from .routing import RouteMatch
from .spend import Subject
from .tokens import Tokenizer, estimate_prompt_tokens

#: above this many body bytes, the prompt estimate runs in a thread, off the event loop
ESTIMATE_IN_THREAD_BYTES = 64 * 1024


class Admitted:
    """A request past its team's limits: its prompt estimate and its limiter admissions."""

    __slots__ = ("admissions", "prompt_estimate", "rates", "subjects")

    def __init__(
        self,
        prompt_estimate: int,
        admissions: list[Admission],
        subjects: tuple[Subject, ...] = (),
        rates: Rates | None = None,
    ) -> None:
        self.prompt_estimate = prompt_estimate
        #: the team's, and the team's for this model if it has limits of its own: each is
        #: charged, so the cut policy sees whichever budget is crossed first
        self.admissions = admissions
        #: whom the request's spend is charged to (its team, its named key), at what prices
        self.subjects = subjects
        self.rates = rates

    @property
    def limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for admission in self.admissions:
            headers.update(admission.headers)
        return headers

    async def settle(self, used_tokens: int) -> None:
        """Record what the request used; the rest of each reservation goes back."""
        for admission in self.admissions:
            await admission.settle(used_tokens)


async def enter_gate(comp: Components, ctx: RequestContext) -> InflightGate:
    """The process-wide max_inflight bound: a bounded wait, then 503. Returns the gate to leave
    with `leave_gate` (a reload may swap the gate meanwhile)."""
    gate = comp.inflight
    try:
        await gate.__aenter__()
    except QueueTimeout as exc:
        comp.metrics.rate_limited.labels(ctx.team, "inflight").inc()
        retry = str(max(1, round(exc.retry_after_s)))
        raise ServiceUnavailable(
            "The gateway is at capacity; retry shortly.",
            code="gateway_overloaded",
            headers={"Retry-After": retry},
        ) from None
    comp.metrics.inflight.inc()
    return gate


async def leave_gate(comp: Components, gate: InflightGate) -> None:
    comp.metrics.inflight.dec()
    await gate.__aexit__(None, None, None)


async def admit(
    comp: Components,
    ctx: RequestContext,
    caller: Caller | None,
    match: RouteMatch,
    doc: dict[str, Any] | None,
    body: bytes,
) -> Admitted:
    """Estimate the prompt and, for a team's caller, reserve it and the answer against its
    limits."""
    estimate = await _estimate(doc, body, comp.tokenizers[match.route.tokenizer])
    model = doc.get("model") if doc is not None else None
    rates = comp.spend.rates_for(model if isinstance(model, str) else None)
    if caller is None:
        return Admitted(estimate, [], rates=rates)
    await comp.spend.check(caller.subjects)
    reserve = estimate + _max_tokens(doc, comp.settings.limits.default_max_tokens)
    admissions = await _admit_team(comp, ctx, caller.team, caller.key, match, reserve, estimate)
    return Admitted(estimate, admissions, caller.subjects, rates)


async def _estimate(doc: dict[str, Any] | None, body: bytes, tokenizer: Tokenizer) -> int:
    if doc is None:
        return 0
    if len(body) > ESTIMATE_IN_THREAD_BYTES:
        return await asyncio.to_thread(estimate_prompt_tokens, doc, tokenizer)
    return estimate_prompt_tokens(doc, tokenizer)


def _max_tokens(doc: dict[str, Any] | None, default: int) -> int:
    if doc is None:
        return 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default


async def _admit_team(
    comp: Components,
    ctx: RequestContext,
    team: Team,
    key: TeamKey | None,
    match: RouteMatch,
    reserve: int,
    prompt_tokens: int,
) -> list[Admission]:
    """The team's limits, then the team's limits for this model, then the key's own, if any;
    all or nothing."""
    specs = [(f"team:{team.name}", team.limits)]
    model_limits = team.model_limits.get(match.label)
    if model_limits is not None:
        specs.append((f"team:{team.name}:model:{match.label}", model_limits))
    if key is not None:
        specs.append((f"team:{team.name}:key:{key.name}", key.limits))
    admissions: list[Admission] = []
    try:
        for bucket, limits in specs:
            admissions.append(
                await comp.limiter.admit(
                    bucket, _spec_of(limits), reserve, ctx.stream, prompt_tokens=prompt_tokens
                )
            )
    except RateLimited as limited:
        await Admitted(0, admissions).settle(0)
        comp.metrics.rate_limited.labels(ctx.team, limited.limit).inc()
        raise RateLimitExceeded(str(limited), headers=limited.headers) from None
    except BackendUnavailable:
        await Admitted(0, admissions).settle(0)
        raise ServiceUnavailable(
            "The shared limits backend is unreachable.",
            code="limits_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    return admissions


@functools.lru_cache(maxsize=1024)
def _spec_of(limits: TeamLimits) -> LimitSpec:
    """The limiter's spec for configured limits, built once per distinct value (the configs'
    structs are frozen, so equal limits share one spec, across reloads too)."""
    return LimitSpec(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        concurrent_streams=limits.concurrent_streams,
    )
