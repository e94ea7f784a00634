"""Per-team limits, the same behaviour pinned on both backends (local and a real Redis)."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.limits import (
    Admission,
    LimitSpec,
    LocalLimiter,
    RateLimited,
    RedisLimiter,
    UnlimitedAdmission,
    create_limiter,
)
from tests.limits.conftest import MakeLimiter


async def admit_all(
    make_limiter: MakeLimiter, count: int, spec: LimitSpec, reserve: int = 0
) -> list[Admission | BaseException]:
    """Fire ``count`` admissions at once at one limiter."""
    limiter = make_limiter(**make_limiter.redis_only(op_timeout_s=5.0))
    return await asyncio.gather(
        *(limiter.admit("team:t", spec, reserve, False) for _ in range(count)),
        return_exceptions=True,
    )


def split(results: list[Admission | BaseException]) -> tuple[list[Admission], list[RateLimited]]:
    """Admissions and refusals; anything else fails the test."""
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) + len(refused) == len(results), results
    return admitted, refused


async def test_a_thousand_simultaneous_requests_admit_exactly_the_per_minute_limit(
    make_limiter: MakeLimiter,
) -> None:
    results = await admit_all(make_limiter, 1000, LimitSpec(requests_per_minute=100))
    admitted, refused = split(results)
    assert (len(admitted), len(refused)) == (100, 900)
    assert {r.limit for r in refused} == {"requests"}


async def test_concurrent_reservations_never_sum_past_the_token_budget(
    make_limiter: MakeLimiter,
) -> None:
    # 200 at once share the Redis pool's 32 connections: a generous per-call timeout, as in
    # admit_all, so a loaded machine cannot turn a slow call into a backend error
    limiter = make_limiter(**make_limiter.redis_only(op_timeout_s=5.0))
    spec = LimitSpec(tokens_per_minute=10_000)
    sizes = [(n * 7919) % 1500 + 1 for n in range(200)]
    results = await asyncio.gather(
        *(limiter.admit("team:t", spec, size, False) for size in sizes), return_exceptions=True
    )
    _, refused = split(results)
    total = sum(size for size, r in zip(sizes, results, strict=True) if isinstance(r, Admission))
    assert total <= 10_000
    assert refused
    assert {r.limit for r in refused} == {"tokens"}
    smallest_refused = min(
        s for s, r in zip(sizes, results, strict=True) if not isinstance(r, Admission)
    )
    assert total + smallest_refused > 10_000  # and no room was left unused


async def test_settle_returns_the_unused_reservation_so_a_later_request_fits(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    spec = LimitSpec(tokens_per_minute=1000)
    first = await limiter.admit("team:t", spec, 600, True)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("team:t", spec, 600, True)
    assert refused.value.limit == "tokens"
    await first.settle(100)
    second = await limiter.admit("team:t", spec, 600, True)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"


async def test_settle_counts_usage_beyond_the_reservation(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    spec = LimitSpec(tokens_per_minute=1000)
    admission = await limiter.admit("team:t", spec, 100, True)
    await admission.settle(700)
    await admission.settle(0)  # idempotent: the second call changes nothing
    with pytest.raises(RateLimited):
        await limiter.admit("team:t", spec, 301, True)
    fits = await limiter.admit("team:t", spec, 300, True)
    assert fits.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_charge_reports_the_budget_crossed_only_by_tokens_beyond_the_reservation(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(**make_limiter.redis_only(charge_batch_tokens=1))
    spec = LimitSpec(tokens_per_minute=100)
    streaming = await limiter.admit("team:t", spec, 50, True, prompt_tokens=10)
    await limiter.admit("team:t", spec, 50, True)  # the window is now full
    assert streaming.charge(30) is False
    assert streaming.charge(10) is False  # 10 prompt + 40 generated: within the reservation
    crossed = False
    for _ in range(200):  # Redis learns the others' usage from the pushed overage's reply
        if streaming.charge(1):
            crossed = True
            break
        await asyncio.sleep(0.01)
    assert crossed
    assert streaming.charge(0) is True  # and it stays crossed
    await streaming.settle(60)


async def test_a_reservation_larger_than_the_budget_runs_alone(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    spec = LimitSpec(tokens_per_minute=1000)
    big = await limiter.admit("team:t", spec, 50_000, True)
    assert big.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):
        await limiter.admit("team:t", spec, 1, True)


async def test_the_stream_after_the_cap_is_refused_until_one_settles(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    spec = LimitSpec(concurrent_streams=2)
    first = await limiter.admit("team:t", spec, 0, True)
    await limiter.admit("team:t", spec, 0, True)
    await limiter.admit("team:t", spec, 0, False)  # not a stream: no slot taken
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("team:t", spec, 0, True)
    assert refused.value.limit == "concurrency"
    assert refused.value.headers["Retry-After"] == "1"
    await first.settle(0)
    await limiter.admit("team:t", spec, 0, True)


async def test_a_settle_cancelled_in_a_finally_still_frees_the_slot(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    spec = LimitSpec(concurrent_streams=1, tokens_per_minute=100)
    admission = await limiter.admit("team:t", spec, 100, True)
    settling = asyncio.ensure_future(admission.settle(0))
    await asyncio.sleep(0)
    settling.cancel()
    admitted = None
    for _ in range(200):
        try:
            admitted = await limiter.admit("team:t", spec, 100, True)
            break
        except RateLimited:
            await asyncio.sleep(0.01)
    assert admitted is not None


async def test_waiting_retry_after_then_retrying_succeeds(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(window_s=1.0, slots=10)
    spec = LimitSpec(requests_per_minute=3, tokens_per_minute=300)
    for _ in range(3):
        await limiter.admit("team:t", spec, 50, False)
        await asyncio.sleep(0.05)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("team:t", spec, 50, False)
    limited = refused.value
    assert limited.limit == "requests"
    assert 0 < limited.retry_after_s <= 1.0
    assert limited.headers["Retry-After"] == str(max(1, math.ceil(limited.retry_after_s)))
    assert limited.headers["retry-after-ms"] == str(math.ceil(limited.retry_after_s * 1000))
    await asyncio.sleep(limited.retry_after_s)
    await limiter.admit("team:t", spec, 50, False)


async def test_admission_headers_use_openais_names_and_formats(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    spec = LimitSpec(requests_per_minute=100, tokens_per_minute=5000)
    admission = await limiter.admit("team:t", spec, 1200, False)
    headers = admission.headers
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-limit-tokens"] == "5000"
    assert headers["x-ratelimit-remaining-tokens"] == "3800"
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert headers[name].endswith("s")  # e.g. "59.998s", "1m0s"


async def test_refusal_carries_openais_headers_and_a_message_naming_the_limit(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    spec = LimitSpec(requests_per_minute=1)
    await limiter.admit("team:t", spec, 0, False)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("team:t", spec, 0, False)
    headers = refused.value.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["Retry-After"]) >= 1
    assert "requests per minute" in str(refused.value)
    assert "team:t" in str(refused.value)


async def test_keys_are_limited_independently(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    spec = LimitSpec(requests_per_minute=1)
    await limiter.admit("team:a", spec, 0, False)
    await limiter.admit("team:b", spec, 0, False)
    with pytest.raises(RateLimited):
        await limiter.admit("team:a", spec, 0, False)


async def test_an_unlimited_spec_admits_without_headers(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    admission = await limiter.admit("team:t", LimitSpec(), 10**9, True)
    assert isinstance(admission, UnlimitedAdmission)
    assert admission.headers == {}
    assert admission.charge(10**9) is False
    assert limiter.degraded is False


async def test_create_limiter_builds_the_configured_backend() -> None:
    local = create_limiter("local", "redis://127.0.0.1:1/0", "fail_open")
    assert isinstance(local, LocalLimiter)
    shared = create_limiter("redis", "redis://127.0.0.1:1/0", "fail_closed")
    assert isinstance(shared, RedisLimiter)
    await shared.aclose()
    with pytest.raises(ValueError, match=r"limits\.backend"):
        create_limiter("memcached", "", "fail_open")  # type: ignore[arg-type]
