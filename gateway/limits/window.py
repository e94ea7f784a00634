"""The counting algorithm both backends share: a sliding window of fixed slots.

A window of ``W`` seconds is cut into ``S`` slots (by default 60 s in 60 slots of 1 s). An
admission of cost ``c`` is counted in the slot of its admission time, and is admitted iff the
sum of the current slot and the ``S - 1`` before it, plus ``c``, stays within the limit.

Why this and not something else:

- **A token bucket / GCRA** (aiolimiter's leaky bucket is one) refills continuously, so a
  burst that lasts a second admits ``limit + refill`` and a minute admits up to twice the
  limit. "100 per minute" would not mean 100.
- **A fixed one-minute counter** is exact within its minute but lets ``2 x limit`` through
  across a minute boundary.
- **A sliding log** (one entry per admission) is exact for every 60 s interval, but its
  memory and Redis work grow with the limit, and tokens would need one entry per request.

The slotted window is exact where it matters: nothing refills while a slot stays in the
window, so 1,000 simultaneous requests against 100 per minute admit exactly 100, and no
interval of ``W - W/S`` seconds (59 s by default) ever admits more than the limit. Memory is
at most ``S`` integers per key. Capacity comes back one whole slot at a time, which is what
makes ``Retry-After`` exact: :meth:`SlidingWindow.retry_after_ms` returns when enough of the
oldest slots leave the window for the cost to fit.

Returning an unused token reservation subtracts it from the slot it was counted in (if that
slot is still in the window); tokens generated beyond a reservation are added to the current
slot without a check, since they have already been produced.

The Redis backend runs the same arithmetic in Lua (``redis_scripts``); this module is the
local backend's copy and the reference the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowShape:
    """The window length as ``slots`` slots of ``slot_ms`` whole milliseconds each."""

    slot_ms: int
    slots: int

    @classmethod
    def of(cls, window_s: float, slots: int) -> WindowShape:
        """Cut ``window_s`` seconds into ``slots`` slots of whole milliseconds."""
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        slot_ms = round(window_s * 1000 / slots)
        if slot_ms < 1:
            raise ValueError(f"window_s={window_s} is too short for {slots} slots")
        return cls(slot_ms=slot_ms, slots=slots)

    @property
    def window_ms(self) -> int:
        """The whole window in milliseconds."""
        return self.slot_ms * self.slots

    def slot_of(self, now_ms: int) -> int:
        """The index of the slot that holds instant ``now_ms``."""
        return now_ms // self.slot_ms

    def expires_at_ms(self, slot: int) -> int:
        """The instant at which ``slot`` leaves the window."""
        return (slot + self.slots) * self.slot_ms


class SlidingWindow:
    """Per-slot counts for one key and one dimension (requests or tokens).

    Slots are kept in a dict whose insertion order is slot order, because time only moves
    forward: expiring the oldest slots is popping from the front, so every operation is
    O(1) amortised except :meth:`retry_after_ms`, which walks at most ``S`` slots.

    Expiry runs once per slot of time, not once per call: the window remembers the slot it
    last expired for (``_current``), and a call in that same slot has nothing to drop, since
    nothing older than the window can have been added since. A request's admission (measure
    every dimension, then count) and its settle therefore each expire a window once.
    """

    __slots__ = ("_counts", "_current", "_slot_ms", "_slots", "_total", "shape")

    def __init__(self, shape: WindowShape) -> None:
        self.shape = shape
        self._slot_ms = shape.slot_ms
        self._slots = shape.slots
        self._counts: dict[int, int] = {}
        self._total = 0
        #: the slot the window was last expired for; None before the first call
        self._current: int | None = None

    def used(self, now_ms: int) -> int:
        """The cost counted in the window at ``now_ms``."""
        slot = now_ms // self._slot_ms
        if slot != self._current:
            self._expire(slot)
        return self._total

    def add(self, now_ms: int, amount: int) -> int:
        """Count ``amount`` in the current slot, unconditionally; return that slot."""
        slot = now_ms // self._slot_ms
        if slot != self._current:
            self._expire(slot)
        counts = self._counts
        counts[slot] = counts.get(slot, 0) + amount
        self._total += amount
        return slot

    def refund(self, now_ms: int, slot: int, amount: int) -> None:
        """Take back up to ``amount`` from ``slot``, if it is still in the window."""
        current = now_ms // self._slot_ms
        if current != self._current:
            self._expire(current)
        held = self._counts.get(slot, 0)
        taken = held if held < amount else amount
        if taken > 0:
            self._counts[slot] = held - taken
            self._total -= taken

    def retry_after_ms(self, now_ms: int, cost: int, limit: int) -> int:
        """Milliseconds until ``cost`` fits under ``limit``, if nobody else takes capacity."""
        used = self.used(now_ms)
        if used + cost <= limit:
            return 0
        freed = 0
        for slot, count in self._counts.items():
            freed += count
            if used - freed + cost <= limit:
                return max(0, self.shape.expires_at_ms(slot) - now_ms)
        return self.shape.window_ms

    def reset_ms(self, now_ms: int) -> int:
        """Milliseconds until the window is empty again (OpenAI's ``x-ratelimit-reset-*``)."""
        if self.used(now_ms) == 0:
            return 0
        newest = next(reversed(self._counts))
        return max(0, self.shape.expires_at_ms(newest) - now_ms)

    def __len__(self) -> int:
        """How many slots are stored (at most ``S`` after expiry)."""
        return len(self._counts)

    def _expire(self, slot: int) -> None:
        """Drop the slots that have left the window as of ``slot``, and remember ``slot``."""
        self._current = slot
        oldest_live = slot - self._slots + 1
        counts = self._counts
        while counts:
            first = next(iter(counts))
            if first >= oldest_live:
                return
            self._total -= counts.pop(first)
