"""Three simulator replicas in one tier, driven by the official SDK: where the streams land.

In-flight time per upstream is read from the gateway's own canonical log lines (`upstream`,
`duration_ms`): the time each replica spent serving the streams the gateway sent it.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from structlog.testing import capture_logs

from tests.reliability.helpers import LogEvent, request_lines
from tests.support.gateway import running_gateway

from .helpers import (
    balanced_settings,
    fast,
    inflight_time_shares,
    replicas,
    request_shares,
    run_many,
    sdk,
    stream_once,
)


async def test_least_inflight_with_weights_1_1_2_splits_in_flight_time_25_25_50() -> None:
    short = fast(chunks=1, delay_ms=0, ttft_ms=20)  # the gateway's work is per request
    async with replicas(a=short, b=short, c=short) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        settings = balanced_settings(urls, weights={"a": 1, "b": 1, "c": 2})
        with capture_logs() as logs:
            async with running_gateway(settings) as gw:
                client = await sdk(gw.base_url)
                async with client:

                    async def one(_: int) -> None:
                        assert await stream_once(client) == 1

                    await run_many(3000, 48, one)
    shares = inflight_time_shares(logs)
    print("least_inflight 1/1/2, in-flight time shares:", shares, "requests:", request_shares(logs))
    assert len(request_lines(logs)) == 3000
    assert shares == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5}, rel=0.10)


async def test_least_inflight_sends_new_requests_away_from_a_slow_replica() -> None:
    slow = fast(delay_ms=100)  # its streams last about ten times longer, or more
    async with replicas(a=fast(), b=fast(), slow=slow) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        with capture_logs() as logs:
            async with running_gateway(balanced_settings(urls)) as gw:
                client = await sdk(gw.base_url)
                async with client:

                    async def one(_: int) -> None:
                        await stream_once(client)

                    await run_many(600, 24, one)
    shares = request_shares(logs)
    print("least_inflight with a slow replica, request shares:", shares)
    # an even split would give each a third; the slow one holds its streams ten times longer
    assert shares["slow"] < 0.2
    assert shares["a"] > 0.35 and shares["b"] > 0.35


async def test_weighted_follows_the_weights_end_to_end() -> None:
    async with replicas(a=fast(1, 0, 0), b=fast(1, 0, 0), c=fast(1, 0, 0)) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        settings = balanced_settings(urls, weights={"a": 1, "b": 1, "c": 2}, balance="weighted")
        with capture_logs() as logs:
            async with running_gateway(settings) as gw:
                client = await sdk(gw.base_url)
                async with client:

                    async def one(_: int) -> None:
                        await stream_once(client)

                    await run_many(1000, 16, one)
        received = {name: rep.received for name, rep in reps.items()}
    shares = request_shares(logs)
    print("weighted 1/1/2 end to end, request shares:", shares)
    assert received == {name: round(share * 1000) for name, share in shares.items()}
    assert shares == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5}, abs=0.05)


async def test_affinity_keeps_each_session_on_one_replica_and_moves_only_a_cooled_ones() -> None:
    async with replicas(a=fast(1, 0, 0), b=fast(1, 0, 0), c=fast(1, 0, 0)) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        settings = balanced_settings(urls, balance="affinity", affinity_header="x-session-id")
        sessions = [f"session-{i}" for i in range(30)]
        with capture_logs() as logs:
            async with running_gateway(settings) as gw:
                client = await sdk(gw.base_url)
                async with client:

                    async def round_(tag: str) -> None:
                        for n in range(4):
                            for session in sessions:
                                await stream_once(
                                    client,
                                    extra_headers={
                                        "x-session-id": session,
                                        "x-request-id": f"{tag}.{session}.{n}",
                                    },
                                )

                    await round_("healthy")
                    home = _homes(logs, "healthy")
                    assert all(len(replicas_) == 1 for replicas_ in home.values())
                    lost = next(iter(home["session-0"]))  # session-0's replica goes down
                    await reps[lost].stop()
                    await round_("one-down")
        after = _homes(logs, "one-down")
    moved = {s for s in sessions if after[s] != home[s]}
    assert moved == {s for s in sessions if home[s] == {lost}}
    assert all(len(replicas_) == 1 for s, replicas_ in after.items() if s not in moved)
    print("affinity: sessions by replica", {r: sum(h == {r} for h in home.values()) for r in urls})


def _homes(logs: list[LogEvent], tag: str) -> dict[str, set[str]]:
    """The replicas that served each session's requests in the round `tag` (the request id
    names the round and the session)."""
    found: dict[str, set[str]] = defaultdict(set)
    for line in request_lines(logs):
        round_, session, _ = str(line["request_id"]).split(".")
        if round_ == tag and line["status"] == 200:
            found[session].add(str(line["upstream"]))
    return found
