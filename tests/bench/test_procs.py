"""The bench's reading of a process's cost from /proc."""

from __future__ import annotations

import os
import time

from bench import procs


def test_usage_splits_user_time_from_the_kernels() -> None:
    before = procs.usage([os.getpid()])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # interpreter work only: user time
        sum(range(1000))
    after = procs.usage([os.getpid()])

    spent, user = after.cpu_s - before.cpu_s, after.user_s - before.user_s
    assert spent >= 0.2
    assert user >= 0.1
    # compared in clock ticks, /proc's own unit: the seconds are sums of floats
    assert round(user * procs.CLOCK_TICKS) <= round(spent * procs.CLOCK_TICKS)
