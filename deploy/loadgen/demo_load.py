"""Demo traffic for the compose stack: streaming chat completions for several teams and models.

It exists so that `docker compose up` shows tokens, streams and latencies moving on the
dashboard without anyone typing a request. It needs only aiohttp (already in the gateway
image) and steers the simulator through the request's `sim` field, so the streams differ in
length and pace. Not a benchmark: see bench/ for that.

    python demo_load.py --base-url http://gateway:8080/v1 --key K1 --key K2 --model sim-small
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send: the keys (one per team) and models to mix, and how much."""

    base_url: str
    keys: tuple[str, ...]
    models: tuple[str, ...]
    concurrency: int
    requests: int | None  # None: run until stopped
    pause_s: float


def parse_args(argv: Sequence[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the gateway's /v1 URL")
    parser.add_argument("--key", action="append", required=True, help="a team key (repeat)")
    parser.add_argument("--model", action="append", required=True, help="a model (repeat)")
    parser.add_argument("--concurrency", type=int, default=4, help="streams open at once")
    parser.add_argument("--requests", type=int, help="stop after this many (default: never)")
    parser.add_argument("--pause-s", type=float, default=0.5, help="pause between requests")
    args = parser.parse_args(argv)
    return Plan(
        base_url=args.base_url.rstrip("/"),
        keys=tuple(args.key),
        models=tuple(args.model),
        concurrency=max(1, args.concurrency),
        requests=args.requests,
        pause_s=args.pause_s,
    )


def request_body(model: str, rng: random.Random) -> dict[str, object]:
    """A streaming chat request whose `sim` field varies the stream's length and pace."""
    return {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me about token accounting."}],
        "sim": {"chunks": rng.randint(8, 64), "delay_ms": rng.choice([5, 20, 50])},
    }


async def stream_once(
    session: aiohttp.ClientSession, plan: Plan, rng: random.Random
) -> tuple[int, int]:
    """Send one streaming request and read it to the end; return (status, bytes read)."""
    headers = {"Authorization": f"Bearer {rng.choice(plan.keys)}"}
    body = request_body(rng.choice(plan.models), rng)
    url = f"{plan.base_url}/chat/completions"
    async with session.post(url, json=body, headers=headers) as response:
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
        return response.status, size


class Budget:
    """Requests left to send, shared by the workers (None: unbounded)."""

    def __init__(self, total: int | None) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def worker(session: aiohttp.ClientSession, plan: Plan, budget: Budget, seed: int) -> int:
    """Send requests until the budget is spent; return how many failed to connect or read."""
    rng = random.Random(seed)
    failures = 0
    while budget.take():
        try:
            status, size = await stream_once(session, plan, rng)
            print(f"status={status} bytes={size}", flush=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures += 1
            print(f"request failed: {exc!r}", file=sys.stderr, flush=True)
        await asyncio.sleep(plan.pause_s)
    return failures


async def run(plan: Plan) -> int:
    """Run the workers; exit status 1 if any request failed outright (bounded runs only)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    budget = Budget(plan.requests)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(
            *(worker(session, plan, budget, seed) for seed in range(plan.concurrency))
        )
    return 1 if sum(results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
