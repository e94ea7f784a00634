"""Soak: mixed traffic with faults for a while, then everything returns to where it was.

Sixteen clients loop over a mix of good streams, whole answers, every upstream fault of the
simulator, clients that leave mid-stream, keep-alive slow starts and bad requests, through one
gateway, for `RELIABILITY_SOAK_S` seconds (60 by default, in CI; set it to 3600 by hand). After
a warm-up, memory, open file descriptors, asyncio tasks and upstream connections are measured;
once the load stops they must come back to that baseline, within the stated tolerances, every
client must have had the answer its scenario expects, and every request must have had its log
line (an accounting record is never lost).

Everything runs in this process (gateway, simulator and clients), so the measures cover all
three; the clients' own sockets are closed before the final measure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict, WrappedLogger

from gateway.config import Route
from tests.support.gateway import RunningGateway

from .helpers import SIM, chat, eventually, gateway, pool_idle, settled, sim_settings, sim_state

SOAK_S = float(os.environ.get("RELIABILITY_SOAK_S", "60"))
WARMUP_S = 3.0
CLIENTS = 16
MAX_CONNECTIONS = 32
#: what "back to baseline" allows: allocator slack, not a leak. A CI run sends about 40,000
#: requests (2 cores): a leak of 1 KiB a request would show as 40 MiB; measured growth is ~6 MiB
RSS_TOLERANCE_MIB = 24
FD_TOLERANCE = 8

Scenario = Callable[[aiohttp.ClientSession, str], Awaitable[str]]


async def _chat(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(f"{url}/v1/chat/completions", data=body) as resp:
        try:
            return resp.status, await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, b"<broken>"


def expect(sim: dict[str, Any] | None, status: int, ending: bytes, **kw: Any) -> Scenario:
    """A request whose answer must have `status` and end with `ending`."""
    body = chat(sim, **kw)

    async def run(session: aiohttp.ClientSession, url: str) -> str:
        got, answer = await _chat(session, url, body)
        return (
            "ok"
            if got == status and answer.rstrip().endswith(ending)
            else f"{got} {answer[-80:]!r}"
        )

    return run


async def leave_mid_stream(session: aiohttp.ClientSession, url: str) -> str:
    body = chat({"chunks": 400, "delay_ms": 2})
    async with session.post(f"{url}/v1/chat/completions", data=body) as resp:
        # on a saturated machine the upstream idle timeout may end the stream first
        with contextlib.suppress(asyncio.IncompleteReadError):
            await resp.content.readexactly(600)
        resp.close()  # the client goes away with the stream running
    return "ok"


async def malformed(session: aiohttp.ClientSession, url: str) -> str:
    got, _ = await _chat(session, url, b'{"model": "sim-1", "messages": [')
    return "ok" if got == 400 else str(got)


DONE, ERROR = b"data: [DONE]", b"}}"
SCENARIOS: dict[str, Scenario] = {
    "stream": expect({"chunks": 20}, 200, DONE),
    "whole": expect({"chunks": 20}, 200, b"}}", stream=False),
    "reset_mid_stream": expect({"fault": "reset_mid_stream", "fail_after": 3}, 200, ERROR),
    "stall_mid_stream": expect({"fault": "stall", "fail_after": 2}, 200, ERROR),
    "invalid_json": expect({"fault": "invalid_json", "fail_after": 2}, 200, DONE),
    "html_500": expect({"fault": "html_500"}, 502, ERROR),
    "reset_before_headers": expect({"fault": "reset_before_headers"}, 502, ERROR),
    "no_done": expect({"fault": "no_done"}, 200, b"}]}"),
    "error_event": expect({"fault": "error_event", "fail_after": 2}, 200, ERROR),
    "big_line": expect({"fault": "big_line", "fail_after": 1, "big_bytes": 256 * 1024}, 200, DONE),
    "keepalive_slow_start": expect({"ttft_ms": 120}, 200, DONE, model="ka-1"),
    "unknown_model": expect(None, 404, ERROR, model="nope"),
    "leave_mid_stream": leave_mid_stream,
    "malformed": malformed,
}
#: the order clients cycle through; streams are the bulk of real traffic
MIX = ["stream"] * 4 + ["whole"] * 2 + list(SCENARIOS)


@dataclass
class Measure:
    rss_mib: float
    fds: int
    tasks: int
    upstream_connections: int

    @property
    def own_fds(self) -> int:
        """Descriptors less the pooled upstream connections (both ends live in this process)."""
        return self.fds - 2 * self.upstream_connections

    @property
    def own_tasks(self) -> int:
        """Tasks less the simulator's one per pooled connection (it serves them in-process)."""
        return self.tasks - self.upstream_connections


def _rss_and_fds() -> tuple[float, int]:
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, len(os.listdir("/proc/self/fd"))


async def measure(gw: RunningGateway) -> Measure:
    gc.collect()
    rss, fds = await asyncio.to_thread(_rss_and_fds)
    return Measure(rss, fds, len(asyncio.all_tasks()), sim_state(gw).connections_open)


async def back_to(gw: RunningGateway, baseline: Measure, timeout_s: float = 10.0) -> Measure:
    """Measure until tasks and descriptors are back at the baseline, or the time is up (the
    server side of the clients' closed connections ends a moment after the clients)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        now = await measure(gw)
        back = now.own_tasks <= baseline.own_tasks and now.own_fds <= baseline.own_fds
        if back or asyncio.get_running_loop().time() > deadline:
            return now
        await asyncio.sleep(0.2)


async def client_loop(
    url: str, start: int, until: float, tally: collections.Counter[str], sent: list[int]
) -> None:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        for name in itertools.islice(itertools.cycle(MIX), start, None):
            if loop.time() >= until:
                return
            sent[0] += 1
            outcome = await SCENARIOS[name](session, url)
            tally[name if outcome == "ok" else f"{name}: {outcome}"] += 1


async def load(url: str, seconds: float, sent: list[int]) -> collections.Counter[str]:
    tally: collections.Counter[str] = collections.Counter()
    until = asyncio.get_running_loop().time() + seconds
    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(client_loop(url, i * 3, until, tally, sent) for i in range(CLIENTS)))
    return tally


def count_requests(counter: list[int]) -> Callable[[WrappedLogger, str, EventDict], EventDict]:
    """A structlog processor that counts canonical lines and keeps none (no memory growth)."""

    def processor(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        if event.get("event") == "request":
            counter[0] += 1
        raise structlog.DropEvent

    return processor


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 150)
async def test_soak_with_faults_returns_to_baseline() -> None:
    settings = sim_settings(read_idle_timeout_s=1.0, max_connections=MAX_CONNECTIONS, chunks=8)
    slow_start = Route(models=("ka-*",), upstreams=("sim",), tokenizer="chunks",
                       keepalive_comment_s=0.05)  # fmt: skip
    settings = msgspec.structs.replace(settings, routes=(*settings.routes, slow_start))
    logged, sent = [0], [0]
    with capture_logs(processors=[count_requests(logged)]):
        async with gateway(settings) as gw:
            await load(gw.url, WARMUP_S, sent)
            await settled(gw, timeout_s=10)
            baseline = await measure(gw)
            tally = await load(gw.url, SOAK_S, sent)
            await settled(gw, timeout_s=10)
            await eventually(lambda: logged[0] == sent[0], timeout_s=10)
            after = await back_to(gw, baseline)
            streams = sum(
                gw.metric("gateway_active_streams", team="anonymous", model=model)
                for model in (SIM, "ka-*")
            )
            pools_free = pool_idle(gw)
    print(f"soak: {sent[0]} requests in {SOAK_S + WARMUP_S:.0f} s; {baseline=}; {after=}")
    failures = {name: n for name, n in tally.items() if name not in SCENARIOS}
    assert not failures, failures
    assert set(tally) == set(SCENARIOS)  # every scenario ran
    assert logged[0] == sent[0]  # one log line per request, none lost
    assert streams == 0 and pools_free
    assert after.upstream_connections <= MAX_CONNECTIONS
    assert after.own_tasks <= baseline.own_tasks, (baseline, after)
    assert after.own_fds <= baseline.own_fds + FD_TOLERANCE, (baseline, after)
    assert after.rss_mib <= baseline.rss_mib + RSS_TOLERANCE_MIB, (baseline, after, sent)
