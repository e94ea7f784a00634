"""A balanced tier when replicas fail, pause, pace or all go down; and a reload.

Every client is the official SDK with max_retries=0, so each error it raises is one the
gateway gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionChunk
from structlog.testing import capture_logs

from gateway.config import Health, Retry
from gateway.reload import Reloader
from tests.reliability.helpers import closed_port, eventually, request_lines
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import running_gateway

from .helpers import (
    balanced_settings,
    events,
    fast,
    replicas,
    run_many,
    sdk,
    stream_once,
)

QUICK = Health(max_failures=3, window_s=30, cooldown_s=0.3)


async def test_a_replica_killed_mid_run_is_cooled_down_probed_and_restored_unseen() -> None:
    async with replicas(a=fast(), b=fast(), c=fast()) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        started_errors: list[str] = []
        with capture_logs() as logs:
            async with running_gateway(balanced_settings(urls, health=QUICK)) as gw:
                metric = gw.metric
                client = await sdk(gw.base_url)
                running = True

                async def traffic() -> None:
                    while running:
                        chunks = 0
                        try:
                            stream = await client.chat.completions.create(
                                model="llama-1", messages=[{"role": "user", "content": "hi"}],
                                stream=True,
                            )  # fmt: skip
                            async for _ in stream:
                                chunks += 1
                        except openai.APIError as exc:
                            # only a stream that had started may fail (its SSE error event)
                            started_errors.append(f"{chunks} chunks, then {exc!r}")

                async with client:
                    workers = [asyncio.create_task(traffic()) for _ in range(8)]
                    await eventually(lambda: reps["b"].received >= 20)
                    await reps["b"].kill()  # its open streams are cut
                    await eventually(lambda: _cooled(gw, "b", "failures"))
                    assert metric("gateway_upstream_healthy", upstream="b") == 0
                    await asyncio.sleep(0.4)  # a trial or two fails while it is down
                    await reps["b"].start()  # back, on the same port
                    await eventually(lambda: metric("gateway_upstream_healthy", upstream="b") == 1)
                    served_before = reps["b"].states[-1].requests_received
                    await eventually(lambda: reps["b"].states[-1].requests_received > served_before)
                    running = False
                    await asyncio.gather(*workers)
                # connections refused, and streams reset before their first byte
                retries = sum(
                    metric("gateway_upstream_retries_total", upstream="b", reason=reason)
                    for reason in ("connect", "reset")
                )
                errors = sum(
                    metric("gateway_upstream_errors_total", upstream="b", reason=reason)
                    for reason in ("connect", "reset")
                )
    steps = [e["event"] for e in logs if e.get("upstream") == "b" and e["event"] != "request"]
    assert steps[0] == "upstream_cooled_down" and steps[-1] == "upstream_restored"
    assert "upstream_probing" in steps
    assert events(logs, "upstream_cooled_down", "b")[0]["reason"] == "failures"
    retried = [line for line in request_lines(logs) if line["attempts"] > 1]
    assert retried and all(line["status"] == 200 for line in retried)
    assert {line["upstream"] for line in retried} <= {"a", "b", "c"}
    assert retries >= 1 and errors >= 3
    assert not [error for error in started_errors if error.startswith("0 chunks")]
    print("killed replica: streams cut mid-way", len(started_errors), "retried", len(retried))


async def test_retry_after_from_one_replica_moves_traffic_away_for_that_long() -> None:
    async with fake_upstream() as paused, replicas(a=fast(), b=fast()) as reps:
        pausing(paused, retry_after="2")
        urls = {"paused": paused.base_url, **{name: rep.base_url for name, rep in reps.items()}}
        with capture_logs() as logs:
            async with running_gateway(balanced_settings(urls)) as gw:
                client = await sdk(gw.base_url)
                async with client:
                    deadline = time.monotonic() + 3.0

                    async def one(_: int) -> None:
                        if time.monotonic() < deadline:
                            assert await stream_once(client) == 4

                    await run_many(100_000, 4, one)
                cooled = gw.metric(
                    "gateway_upstream_cooldowns_total", upstream="paused", reason="retry_after"
                )
                failures = gw.metric(
                    "gateway_upstream_cooldowns_total", upstream="paused", reason="failures"
                )
                health = gw.components.balancer.upstreams["paused"].health
    gaps = [
        later - earlier
        for earlier, later in zip(paused.received_at, paused.received_at[1:], strict=False)
    ]
    print("429 Retry-After 2: gaps between requests to the paused replica", gaps)
    # requests already on their way when the first 429 came back arrive together; then none
    # for the pause, then it is asked again
    pauses = [gap for gap in gaps if gap >= 0.05]
    assert pauses and all(gap >= 1.9 for gap in pauses)
    assert cooled == len(paused.received_at) and failures == 0 and len(health.failures) == 0
    assert all(line["status"] == 200 for line in request_lines(logs))


async def test_a_single_upstream_answering_429_gives_the_client_its_429_and_retry_after() -> None:
    async with fake_upstream() as paused:
        pausing(paused, retry_after="2")
        with capture_logs() as logs:
            async with running_gateway(balanced_settings({"only": paused.base_url})) as gw:
                client = await sdk(gw.base_url)
                async with client:
                    with pytest.raises(openai.RateLimitError) as raised:
                        await stream_once(client)
    assert raised.value.response.headers["retry-after"] == "2"
    (line,) = request_lines(logs)
    assert (line["status"], line["attempts"], line["end"]) == (429, 1, "upstream_refused")
    assert paused.received_at and len(paused.received_at) == 1


async def test_every_member_down_waits_at_most_the_budget_then_502_with_retry_after() -> None:
    urls = {name: f"http://127.0.0.1:{closed_port()}/v1" for name in "abc"}
    # a budget shorter than any backoff: each member once, no retry
    tight = balanced_settings(urls, retry=Retry(attempts=6, backoff_ms=200, budget_s=0.05))
    # a budget that allows the backoffs: six sends in all
    roomy = balanced_settings(urls, retry=Retry(attempts=6, backoff_ms=10, budget_s=30))
    attempts = []
    for settings in (tight, roomy):
        with capture_logs() as logs:
            async with running_gateway(settings) as gw:
                client = await sdk(gw.base_url)
                async with client:
                    with pytest.raises(openai.APIStatusError) as raised:
                        await stream_once(client)
        (line,) = request_lines(logs)
        attempts.append(line["attempts"])
        assert raised.value.status_code == 502
        assert int(raised.value.response.headers["retry-after"]) >= 1
    assert attempts == [3, 6]


async def test_every_member_answering_5xx_gives_the_client_a_502_with_retry_after() -> None:
    async with replicas(a=fast(), b=fast()) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        with capture_logs() as logs:
            async with running_gateway(balanced_settings(urls)) as gw:
                client = await sdk(gw.base_url)
                async with client:
                    with pytest.raises(openai.APIStatusError) as raised:
                        await stream_once(client, extra_body={"sim": {"fault": "html_500"}})
    assert raised.value.status_code == 502
    assert int(raised.value.response.headers["retry-after"]) >= 1
    assert reps["a"].received == reps["b"].received == 1  # each member once
    (line,) = request_lines(logs)
    assert (line["attempts"], line["end"]) == (2, "upstream_error")


async def test_no_retry_after_the_first_byte_a_broken_stream_ends_with_an_sse_error() -> None:
    async with replicas(a=fast(), b=fast()) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        with capture_logs() as logs:
            async with running_gateway(balanced_settings(urls)) as gw:
                client = await sdk(gw.base_url)
                async with client:
                    stream = await client.chat.completions.create(
                        model="llama-1",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                        extra_body={"sim": {"fault": "reset_mid_stream", "fail_after": 2}},
                    )
                    received = [0]
                    with pytest.raises(openai.APIError):
                        await _read_content(stream, received)
    assert received == [2]
    assert reps["a"].received + reps["b"].received == 1
    (line,) = request_lines(logs)
    assert (line["attempts"], line["end"]) == (1, "upstream_error")


async def test_pacing_sends_at_most_what_aiolimiter_allows_and_bounds_its_waiters() -> None:
    budget_s = 2.5
    async with replicas(paced=fast(1, 0, 0)) as reps:
        settings = balanced_settings(
            {"paced": reps["paced"].base_url},
            rpm={"paced": 60},
            retry=Retry(budget_s=budget_s),
        )
        async with running_gateway(settings) as gw:
            state = gw.components.balancer.upstreams["paced"]
            most_waiting = 0

            async def watch() -> None:
                nonlocal most_waiting
                while True:
                    most_waiting = max(most_waiting, state.pace_waiters)
                    await asyncio.sleep(0.001)

            client = await sdk(gw.base_url)
            outcomes: list[str] = []
            watcher = asyncio.create_task(watch())
            started = time.monotonic()
            async with client:

                async def one(_: int) -> None:
                    try:
                        await stream_once(client)
                        outcomes.append("ok")
                    except openai.RateLimitError as exc:
                        outcomes.append(f"429 {exc.response.headers['retry-after']}")

                await run_many(200, 200, one)
            elapsed = time.monotonic() - started
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            left_waiting = state.pace_waiters
    sent = reps["paced"].received
    print(f"pacing 60/min, burst of 200: sent {sent}, refused {200 - sent}, "
          f"most waiters {most_waiting}, in {elapsed:.2f} s")  # fmt: skip
    # the bucket holds 60, then drips one a second
    refused = [outcome for outcome in outcomes if outcome.startswith("429")]
    assert outcomes.count("ok") == sent <= 60 + elapsed + 1
    assert len(refused) == 200 - sent
    assert all(int(outcome.split()[1]) >= 1 for outcome in refused)  # each with Retry-After
    # a waiter is let in only if its turn comes within the budget (one a second)
    assert 1 <= most_waiting <= budget_s + 1
    assert left_waiting == 0


async def test_pacing_moves_a_request_to_another_member_before_waiting() -> None:
    async with replicas(paced=fast(1, 0, 0), free=fast(1, 0, 0)) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        settings = balanced_settings(urls, rpm={"paced": 6}, balance="weighted")
        async with running_gateway(settings) as gw:
            client = await sdk(gw.base_url)
            async with client:
                await run_many(60, 6, lambda _: stream_once(client))  # type: ignore[arg-type,return-value]
    assert reps["paced"].received <= 6 + 1
    assert reps["paced"].received + reps["free"].received == 60


async def test_reload_applies_new_tiers_and_keeps_cooldowns_and_in_flight_counts(
    tmp_path: Path,
) -> None:
    async with replicas(a=fast(), b=fast(), c=fast()) as reps:
        urls = {name: rep.base_url for name, rep in reps.items()}
        health = Health(max_failures=1, cooldown_s=60)
        settings = balanced_settings(urls, tiers=(("a", "b"),), health=health)
        async with running_gateway(settings) as gw:
            balancer = gw.components.balancer
            a = balancer.upstreams["a"]
            plan = balancer.plan(settings.routes[0])
            balancer.failed(plan, a, "connect")  # a is cooled down for a minute
            held = balancer.upstreams["b"]
            held.start()  # a stream in flight on b
            same_health = {"max_failures": 1, "cooldown_s": 60}
            upstreams = {
                name: {"base_url": url, "weight": 3 if name == "c" else 1, "health": same_health}
                for name, url in urls.items()
            }
            route = {"models": ["llama-*"], "upstreams": [["a", "b", "c"]], "tokenizer": "chunks"}
            config = {"upstreams": upstreams, "routes": [{**route, "balance": "weighted"}]}
            path = tmp_path / "gateway.yaml"
            await asyncio.to_thread(path.write_text, yaml.safe_dump(config), "utf-8")
            assert await Reloader(gw.runner, path).reload()
            assert balancer.upstreams["a"] is a and not a.health.usable(balancer.now())
            assert balancer.upstreams["b"] is held and held.inflight == 1
            client = await sdk(gw.base_url)
            async with client:
                await run_many(80, 4, lambda _: stream_once(client))  # type: ignore[arg-type,return-value]
            held.end()
    assert reps["a"].received == 0  # still cooled down
    assert reps["c"].received > reps["b"].received > 0  # the new tier, weight 3 to 1


async def _read_content(stream: openai.AsyncStream[ChatCompletionChunk], count: list[int]) -> None:
    async for chunk in stream:
        count[0] += bool(chunk.choices and chunk.choices[0].delta.content)


def _cooled(gw: object, upstream: str, reason: str) -> bool:
    return bool(
        gw.metric("gateway_upstream_cooldowns_total", upstream=upstream, reason=reason)  # type: ignore[attr-defined]
    )


def pausing(upstream: FakeUpstream, retry_after: str) -> FakeUpstream:
    """`upstream` answers every request 429 with this Retry-After."""
    body = b'{"error":{"message":"slow down","type":"rate_limit_error","code":null}}'
    upstream.default = Script(
        [body], status=429, content_type="application/json", headers={"Retry-After": retry_after}
    )
    return upstream
