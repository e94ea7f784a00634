"""The sliding-window arithmetic and OpenAI's header formats, without any backend."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.limits.errors import retry_after_header
from gateway.limits.headers import format_duration
from gateway.limits.window import SlidingWindow, WindowShape

SHAPE = WindowShape.of(60.0, 60)


def test_window_is_cut_into_whole_millisecond_slots() -> None:
    assert WindowShape(slot_ms=1000, slots=60) == SHAPE
    assert WindowShape.of(1.0, 10) == WindowShape(slot_ms=100, slots=10)


def test_nothing_comes_back_while_a_slot_stays_in_the_window() -> None:
    window = SlidingWindow(SHAPE)
    window.add(1_000, 100)
    assert window.used(60_999) == 100
    assert window.used(61_000) == 0


def test_retry_after_is_when_enough_old_slots_leave() -> None:
    window = SlidingWindow(SHAPE)
    window.add(0, 60)
    window.add(30_500, 40)
    assert window.retry_after_ms(45_000, 1, 100) == 15_000  # the first slot leaves at 60 s
    assert window.retry_after_ms(45_000, 61, 100) == 45_000  # both must leave
    assert window.retry_after_ms(45_000, 0, 100) == 0


def test_refund_goes_back_to_the_reservations_slot_only_while_it_is_in_the_window() -> None:
    window = SlidingWindow(SHAPE)
    slot = window.add(0, 50)
    window.refund(10_000, slot, 30)
    assert window.used(10_000) == 20
    window.refund(10_000, slot, 500)
    assert window.used(10_000) == 0
    late = window.add(20_000, 10)
    window.refund(81_000, late, 10)  # the slot already left: nothing to take back
    assert window.used(81_000) == 0


def test_expired_slots_are_dropped_so_memory_is_bounded() -> None:
    window = SlidingWindow(SHAPE)
    for second in range(600):
        window.add(second * 1000, 1)
    assert len(window) == SHAPE.slots


@given(
    st.lists(
        st.tuples(st.integers(0, 3_000), st.integers(1, 30)),  # (ms after previous, cost)
        max_size=200,
    )
)
def test_no_interval_shorter_than_window_minus_a_slot_admits_more_than_the_limit(
    arrivals: list[tuple[int, int]],
) -> None:
    shape = WindowShape.of(10.0, 10)
    window = SlidingWindow(shape)
    limit = 50
    admitted: list[tuple[int, int]] = []
    now = 0
    for gap, cost in arrivals:
        now += gap
        if window.used(now) + cost <= limit:
            window.add(now, cost)
            admitted.append((now, cost))
    span = shape.window_ms - shape.slot_ms
    for start, _ in admitted:
        assert sum(c for t, c in admitted if start <= t < start + span) <= limit


@given(st.lists(st.tuples(st.integers(0, 3_000), st.integers(1, 30)), max_size=100))
def test_waiting_retry_after_always_makes_room(arrivals: list[tuple[int, int]]) -> None:
    window = SlidingWindow(WindowShape.of(10.0, 10))
    limit = 50
    now = 0
    for gap, cost in arrivals:
        now += gap
        if window.used(now) + cost > limit:
            later = now + window.retry_after_ms(now, cost, limit)
            assert window.used(later - 1) + cost > limit  # not a millisecond earlier...
            assert window.used(later) + cost <= limit  # ...but then (time only moves on)
            now = later
            window.add(now, cost)
        else:
            window.add(now, cost)


def test_durations_are_written_the_way_openai_writes_them() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(20) == "20ms"
    assert format_duration(1000) == "1s"
    assert format_duration(1500) == "1.5s"
    assert format_duration(59_999) == "59.999s"
    assert format_duration(360_000) == "6m0s"
    assert format_duration(3_723_000) == "1h2m3s"


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(1.0) == "1"
    assert retry_after_header(1.01) == "2"
