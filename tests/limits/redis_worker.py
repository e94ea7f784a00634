"""A separate gateway-like process for the multi-process Redis tests.

``python -m tests.limits.redis_worker admit URL KEY COUNT``: connect, print ``ready``, wait
for a line on stdin, fire COUNT admissions at once against 100 requests per minute, print
how many were admitted.

``python -m tests.limits.redis_worker hold URL KEY LEASE_S``: admit one stream against a cap
of one concurrent stream, print ``held``, then keep it (refreshing its lease) until killed.
"""

from __future__ import annotations

import asyncio
import sys

from gateway.limits import Admission, LimitSpec, RateLimited, RedisLimiter


async def admit_many(url: str, key: str, count: int) -> None:
    """Wait for the go line, then admit ``count`` requests concurrently and report."""
    limiter = RedisLimiter(url, "fail_closed", op_timeout_s=5.0)
    spec = LimitSpec(requests_per_minute=100)
    await limiter.admit("warmup:" + key, LimitSpec(requests_per_minute=1000), 0, False)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    results = await asyncio.gather(
        *(limiter.admit(key, spec, 0, False) for _ in range(count)), return_exceptions=True
    )
    admitted = sum(isinstance(result, Admission) for result in results)
    refused = sum(isinstance(result, RateLimited) for result in results)
    print(f"{admitted} {refused}", flush=True)
    await limiter.aclose()


async def hold(url: str, key: str, lease_s: float) -> None:
    """Hold one stream slot until killed."""
    limiter = RedisLimiter(url, "fail_closed", lease_s=lease_s)
    await limiter.admit(key, LimitSpec(concurrent_streams=1), 0, True)
    print("held", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    """Dispatch on the mode argument."""
    mode, url, key, value = argv
    if mode == "admit":
        asyncio.run(admit_many(url, key, int(value)))
    elif mode == "hold":
        asyncio.run(hold(url, key, float(value)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
