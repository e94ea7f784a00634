"""What only the shared backend has: replicas, leases, scripts, keys, and Redis going away."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.limits import (
    Admission,
    BackendUnavailable,
    LimitSpec,
    RateLimited,
    RedisLimiter,
    UnlimitedAdmission,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
PER_MINUTE_100 = LimitSpec(requests_per_minute=100)


@asynccontextmanager
async def limiters(url: str, count: int, **options: Any) -> AsyncIterator[list[RedisLimiter]]:
    """``count`` independent limiters on ``url``, closed on exit."""
    made = [RedisLimiter(url, options.pop("on_backend_error", "fail_closed"), **options)
            for _ in range(count)]  # fmt: skip
    try:
        yield made
    finally:
        for limiter in made:
            await limiter.aclose()


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Redis]:
    """A plain client to look at what the limiter wrote."""
    client = Redis.from_url(url, driver_info=None)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(attempt: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> bool:
    """Retry ``attempt`` every 20 ms until it returns True or ``within_s`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        if await attempt():
            return True
        await asyncio.sleep(0.02)
    return False


async def worker(*args: str) -> asyncio.subprocess.Process:
    """Start ``tests/limits/redis_worker.py`` as a separate OS process."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.limits.redis_worker", *args,
        cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_line(process: asyncio.subprocess.Process) -> str:
    """One line of the worker's output, within a bound."""
    assert process.stdout is not None
    async with asyncio.timeout(30):
        return (await process.stdout.readline()).decode().strip()


async def test_three_limiters_on_three_connections_admit_exactly_the_limit_together(
    redis_url: str,
) -> None:
    async with limiters(redis_url, 3, max_connections=1, op_timeout_s=5.0) as replicas:
        results = await asyncio.gather(
            *(replicas[n % 3].admit("team:t", PER_MINUTE_100, 0, False) for n in range(1000)),
            return_exceptions=True,
        )
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert (len(admitted), len(refused)) == (100, 900)


async def test_three_processes_sharing_redis_admit_exactly_the_limit_together(
    redis_url: str,
) -> None:
    processes = [await worker("admit", redis_url, "team:t", str(n)) for n in (334, 333, 333)]
    try:
        for process in processes:
            assert await read_line(process) == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        counts = [tuple(map(int, (await read_line(p)).split())) for p in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
    assert sum(admitted for admitted, _ in counts) == 100
    assert sum(refused for _, refused in counts) == 900


async def test_a_dead_replicas_stream_slot_expires_after_its_lease(redis_url: str) -> None:
    spec = LimitSpec(concurrent_streams=1)
    holder = await worker("hold", redis_url, "team:t", "1.5")
    try:
        assert await read_line(holder) == "held"
        async with limiters(redis_url, 1) as (limiter,):
            with pytest.raises(RateLimited):
                await limiter.admit("team:t", spec, 0, True)
            holder.kill()  # like a replica that crashed: no settle, no more lease refreshes
            await holder.wait()

            async def admitted() -> bool:
                try:
                    await limiter.admit("team:t", spec, 0, True)
                except RateLimited:
                    return False
                return True

            assert await eventually(admitted)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_a_live_stream_keeps_its_slot_beyond_one_lease(redis_url: str) -> None:
    spec = LimitSpec(concurrent_streams=1)
    async with limiters(redis_url, 2, lease_s=0.3) as (holder, other):
        streaming = await holder.admit("team:t", spec, 0, True)
        await asyncio.sleep(1.0)  # three leases: only refreshes keep the slot
        with pytest.raises(RateLimited):
            await other.admit("team:t", spec, 0, True)
        await streaming.settle(0)
        await other.admit("team:t", spec, 0, True)


async def test_every_key_written_expires_by_itself(redis_url: str) -> None:
    spec = LimitSpec(requests_per_minute=10, tokens_per_minute=100, concurrent_streams=2)
    async with limiters(redis_url, 1, lease_s=30) as (limiter,), raw_client(redis_url) as client:
        await limiter.admit("team:t", spec, 10, True)
        keys = await client.keys("*")
        assert len(keys) == 3
        for key in keys:
            assert 0 < await client.pttl(key) <= 61_000


async def test_scripts_are_reloaded_after_the_server_forgets_them(redis_url: str) -> None:
    async with limiters(redis_url, 1) as (limiter,), raw_client(redis_url) as client:
        await limiter.admit("team:t", PER_MINUTE_100, 0, False)
        await client.script_flush()
        admission = await limiter.admit("team:t", PER_MINUTE_100, 0, False)
        assert admission.headers["x-ratelimit-remaining-requests"] == "98"
        assert not limiter.degraded


async def test_overage_is_pushed_in_batches_not_per_chunk(redis_url: str) -> None:
    spec = LimitSpec(tokens_per_minute=10_000)
    async with limiters(redis_url, 2, charge_batch_tokens=100) as (streamer, other):
        streaming = await streamer.admit("team:t", spec, 10, True)
        for _ in range(59):
            streaming.charge(1)  # 49 beyond the reservation: below one batch, nothing pushed
        await asyncio.sleep(0.05)
        seen = await other.admit("team:t", spec, 0, True)
        assert seen.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 10)
        for _ in range(60):
            streaming.charge(1)  # the batch is full now: pushed in the background

        async def pushed() -> bool:
            seen = await other.admit("team:t", spec, 0, True)
            return int(seen.headers["x-ratelimit-remaining-tokens"]) <= 10_000 - 110

        assert await eventually(pushed)
        await streaming.settle(500)
        seen = await other.admit("team:t", spec, 0, True)
        assert seen.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 500)


async def test_fail_open_admits_and_reports_degraded_while_redis_is_down_then_recovers(
    private_redis_server: RedisServer,
) -> None:
    spec = LimitSpec(requests_per_minute=2)
    options: dict[str, Any] = {"op_timeout_s": 0.2, "probe_interval_s": 0.05}
    async with limiters(private_redis_server.url, 1, on_backend_error="fail_open",
                        **options) as (limiter,):  # fmt: skip
        before = await limiter.admit("team:t", spec, 0, True)
        await private_redis_server.astop(kill=True)
        during = [await limiter.admit("team:t", spec, 0, True) for _ in range(5)]
        assert all(isinstance(a, UnlimitedAdmission) for a in during)
        assert limiter.degraded
        async with asyncio.timeout(5):
            await before.settle(10)  # a stream admitted before the outage ends cleanly
        await private_redis_server.astart()

        async def recovered() -> bool:
            return not limiter.degraded

        assert await eventually(recovered)
        await limiter.admit("team:t", spec, 0, True)
        await limiter.admit("team:t", spec, 0, True)
        with pytest.raises(RateLimited):  # counting again: the limit means what it says
            await limiter.admit("team:t", spec, 0, True)


async def test_fail_closed_refuses_while_redis_is_down_then_recovers(
    private_redis_server: RedisServer,
) -> None:
    spec = LimitSpec(requests_per_minute=2)
    options: dict[str, Any] = {"op_timeout_s": 0.2, "probe_interval_s": 0.05}
    async with limiters(private_redis_server.url, 1, on_backend_error="fail_closed",
                        **options) as (limiter,):  # fmt: skip
        await limiter.admit("team:t", spec, 0, False)
        await private_redis_server.astop(kill=True)
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as unavailable:
                await limiter.admit("team:t", spec, 0, False)
        assert unavailable.value.retry_after_s >= 1
        assert limiter.degraded
        await private_redis_server.astart()

        async def admitted() -> bool:
            try:
                await limiter.admit("team:t", spec, 0, False)
            except BackendUnavailable:
                return False
            return True

        assert await eventually(admitted)
        assert not limiter.degraded


async def test_an_unreachable_redis_never_wedges_admission(
    private_redis_server: RedisServer,
) -> None:
    await private_redis_server.astop()
    options: dict[str, Any] = {"op_timeout_s": 0.2, "probe_interval_s": 0.05}
    async with limiters(private_redis_server.url, 1, on_backend_error="fail_open",
                        **options) as (limiter,):  # fmt: skip
        async with asyncio.timeout(5):
            admissions = await asyncio.gather(
                *(limiter.admit("team:t", PER_MINUTE_100, 0, True) for _ in range(200))
            )
    assert all(isinstance(a, UnlimitedAdmission) for a in admissions)


async def test_an_admission_cancelled_in_flight_gives_back_its_stream_slot(redis_url: str) -> None:
    spec = LimitSpec(requests_per_minute=10, concurrent_streams=1, tokens_per_minute=100)
    async with limiters(redis_url, 1, lease_s=60) as (limiter,), raw_client(redis_url) as client:
        admitting = asyncio.ensure_future(limiter.admit("team:t", spec, 100, True))
        await asyncio.sleep(0)  # the script is on its way to Redis
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting

        async def script_ran() -> bool:
            counts = await client.hvals("gw:rl:{team:t}:req")
            return sum(map(int, counts)) == 1

        async def slot_and_tokens_returned() -> bool:
            streams = await client.zcard("gw:rl:{team:t}:conc")
            tokens = sum(map(int, await client.hvals("gw:rl:{team:t}:tok")))
            return (streams, tokens) == (0, 0)

        assert await eventually(script_ran)
        assert await eventually(slot_and_tokens_returned)  # long before the 60 s lease ends


async def test_a_settle_cancelled_while_waiting_for_redis_still_frees_the_slot(
    redis_url: str,
) -> None:
    spec = LimitSpec(concurrent_streams=1, tokens_per_minute=1000)
    async with limiters(redis_url, 1, charge_batch_tokens=1) as (limiter,):
        admission = await limiter.admit("team:t", spec, 10, True)
        admission.charge(50)  # beyond the reservation: a push to Redis is now in flight
        settling = asyncio.ensure_future(admission.settle(50))
        await asyncio.sleep(0)  # settle is waiting behind that push...
        settling.cancel()  # ...when its caller is cancelled again
        with pytest.raises(asyncio.CancelledError):
            await settling

        async def admitted() -> bool:
            try:
                await limiter.admit("team:t", spec, 10, True)
            except RateLimited:
                return False
            return True

        assert await eventually(admitted, within_s=5)  # long before the 30 s lease ends
