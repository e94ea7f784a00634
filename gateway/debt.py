"""Counters that grow live and still agree with the bill: a per-label "debt".

`gateway_tokens_total{type="completion"|"reasoning"}` and `gateway_cost_usd_total` grow while
a stream runs, from the gateway's own live count. When the stream ends, the upstream's usage
is the truth; it may be lower than what was counted, and a Prometheus counter cannot go down.
The overcount becomes the label's debt: later increments of the same label pay it off before
the counter moves. So the counter never runs ahead of the truth by more than the overcount of
the requests whose debt no later traffic has paid yet (at most the drift of the streams in
flight, once traffic continues), and over time it equals the sum of the settled figures in the
log lines.
"""

from __future__ import annotations

from typing import Any


class DebtCounter:
    """One counter child, with the overcount its live increments still owe."""

    __slots__ = ("_child", "debt")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.debt: float = 0

    def inc(self, amount: float) -> None:
        """A live increment: pays the debt first, the rest moves the counter."""
        if self.debt:
            if amount <= self.debt:
                self.debt -= amount
                return
            amount -= self.debt
            self.debt = 0
        if amount:
            self._child.inc(amount)

    def settle(self, final: float, counted: float) -> None:
        """A request's true figure is `final`, and `counted` of it was counted live."""
        if final >= counted:
            self.inc(final - counted)
        else:
            self.debt += counted - final


class DebtCounters:
    """A counter's children as `DebtCounter`s, one per label values, kept."""

    __slots__ = ("_counter", "_kept")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._kept: dict[tuple[str, ...], DebtCounter] = {}

    def labels(self, *values: str) -> DebtCounter:
        found = self._kept.get(values)
        if found is None:
            found = self._kept[values] = DebtCounter(self._counter.labels(*values))
        return found
