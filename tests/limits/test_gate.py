"""The process-wide in-flight gate: a bounded wait, in a bounded queue, then 503."""

from __future__ import annotations

import asyncio

import pytest

from gateway.limits import InflightGate, QueueFull, QueueTimeout


async def hold(gate: InflightGate, release: asyncio.Event) -> None:
    """Hold a place in ``gate`` until ``release`` is set."""
    async with gate:
        await release.wait()


async def settle_tasks() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_within_max_inflight_enter_at_once() -> None:
    gate = InflightGate(max_inflight=2, queue_timeout_s=1.0)
    async with gate, gate:
        assert (gate.inflight, gate.waiting) == (2, 0)
    assert (gate.inflight, gate.waiting) == (0, 0)


async def test_excess_waits_at_most_queue_timeout_then_gets_queue_timeout() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=0.1, retry_after_s=2.0)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(gate, release))
    await settle_tasks()
    with pytest.raises(QueueTimeout) as timed_out:
        async with gate:
            pytest.fail("entered a full gate")
    assert not isinstance(timed_out.value, QueueFull)
    assert timed_out.value.retry_after_s == 2.0
    assert (gate.inflight, gate.waiting) == (1, 0)
    release.set()
    await holder


async def test_a_leaving_holder_hands_its_place_to_the_oldest_waiter() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=5.0, max_waiting=3)
    order: list[int] = []
    release = asyncio.Event()

    async def enter(n: int) -> None:
        async with gate:
            order.append(n)

    holder = asyncio.create_task(hold(gate, release))
    await settle_tasks()
    waiters = [asyncio.create_task(enter(n)) for n in range(3)]
    await settle_tasks()
    assert (gate.inflight, gate.waiting) == (1, 3)
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == [0, 1, 2]
    assert (gate.inflight, gate.waiting) == (0, 0)


async def test_past_max_waiting_requests_are_refused_without_waiting() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=5.0, max_waiting=2)
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(gate, release)) for _ in range(3)]
    await settle_tasks()
    assert (gate.inflight, gate.waiting) == (1, 2)
    for _ in range(10):
        with pytest.raises(QueueFull):
            await gate.__aenter__()
    assert gate.waiting == 2  # the queue never grew past its bound
    release.set()
    await asyncio.gather(*tasks)
    assert (gate.inflight, gate.waiting) == (0, 0)


async def test_the_wait_queue_is_bounded_by_max_inflight_unless_told_otherwise() -> None:
    gate = InflightGate(max_inflight=2, queue_timeout_s=5.0)
    assert gate.max_waiting == 2


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=5.0)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(gate, release))
    await settle_tasks()
    waiter = asyncio.create_task(hold(gate, asyncio.Event()))
    await settle_tasks()
    assert gate.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (gate.inflight, gate.waiting) == (1, 0)
    release.set()
    await holder
    assert gate.inflight == 0


async def test_a_waiter_cancelled_just_after_the_handover_passes_its_place_on() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=5.0, max_waiting=2)
    release, second_release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(gate, release))
    await settle_tasks()
    first = asyncio.create_task(hold(gate, asyncio.Event()))
    second = asyncio.create_task(hold(gate, second_release))
    await settle_tasks()
    await gate.__aexit__(None, None, None)  # the holder leaves: its place goes to `first`...
    first.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    await settle_tasks()
    assert (gate.inflight, gate.waiting) == (1, 0)  # `second` holds the place now
    second_release.set()
    await second
    assert gate.inflight == 0
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder


async def test_zero_queue_timeout_refuses_at_once_when_full() -> None:
    gate = InflightGate(max_inflight=1, queue_timeout_s=0)
    async with gate:
        with pytest.raises(QueueTimeout):
            await gate.__aenter__()
        assert gate.waiting == 0
