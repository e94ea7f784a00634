"""Every private prometheus-client internal the gateway relies on, in one place.

Tested with prometheus-client 0.26.0 (`constraints.txt`); `tests/core/test_private_api.py`
checks each name below on a real `Histogram` and fails by name when a release removes or
renames one.

- A `Histogram` child's `_upper_bounds` (the buckets' upper bounds, ending with +Inf),
  `_buckets` (one value per bound, each the count of that bucket alone, with `inc(n)`) and
  `_sum` (with `inc(x)`): `batch_adder` adds a batch of observations to them in one go,
  which also holds in multiprocess mode (the values are then `MultiProcessValue`s). When any
  is missing or not shaped so, it falls back to `Histogram.observe`, one call per value:
  the same histogram, slower.
- `KeptChildren` relies on no private name at run time: it overrides the public `labels()`
  and keeps the children it returned in its own attribute `_gateway_kept`, a name
  prometheus-client does not use (the canary test checks it). It relies on behaviour:
  `labels()` returns the one child the metric keeps for those values until `remove()`,
  which the gateway never calls. For the type checker only, it is a `MetricWrapperBase`
  (`prometheus_client.metrics`, the undocumented base of `Counter`, `Gauge`, `Histogram`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import Histogram

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase as _Wrapper
else:
    _Wrapper = object

#: a Histogram child's upper bounds, per-bucket counts and sum
HISTOGRAM_PARTS = ("_upper_bounds", "_buckets", "_sum")
#: where `KeptChildren` keeps its children
KEPT = "_gateway_kept"
#: children kept per metric; past that (not reached with bounded labels) lookups go through
CHILD_CACHE_ENTRIES = 4096

#: adds a batch of observed values to a histogram child
AddBatch = Callable[[Sequence[float]], None]


def batch_adder(child: Histogram) -> AddBatch:
    """How to add a batch of values to `child`: to its buckets and sum at once when its
    internals are the tested ones, else one `observe` per value."""
    parts: list[Any] = [getattr(child, name, None) for name in HISTOGRAM_PARTS]
    bounds, buckets, total = parts
    if not _histogram_shaped(bounds, buckets, total):
        return _observe_each(child)
    width = len(bounds)

    def add(values: Sequence[float]) -> None:
        counts = [0] * width
        for value in values:
            # the first bucket whose upper bound is >= value, as Histogram.observe picks it
            counts[bisect_left(bounds, value)] += 1
        total.inc(sum(values))
        for bucket, count in zip(buckets, counts, strict=True):
            if count:
                bucket.inc(count)

    return add


def _histogram_shaped(bounds: Any, buckets: Any, total: Any) -> bool:
    return (
        isinstance(bounds, Sequence)
        and len(bounds) > 0
        and bounds[-1] == math.inf
        and isinstance(buckets, Sequence)
        and len(buckets) == len(bounds)
        and all(callable(getattr(bucket, "inc", None)) for bucket in buckets)
        and callable(getattr(total, "inc", None))
    )


def _observe_each(child: Histogram) -> AddBatch:
    observe = child.observe

    def add(values: Sequence[float]) -> None:
        for value in values:
            observe(value)

    return add


class KeptChildren(_Wrapper):
    """Mixed in before `Counter`, `Gauge` or `Histogram`: `labels(*values)` keeps each child
    after its first lookup.

    prometheus-client's `labels` validates the values, takes a lock and builds a tuple per
    call (0.8 us hot); a streamed request asks for about a dozen children. The gateway never
    removes a child, so a kept one stays the registry's own.
    """

    _gateway_kept: dict[tuple[Any, ...], Any] | None = None

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        kept = self._gateway_kept
        if kept is None:
            kept = self._gateway_kept = {}
        child: Self | None = kept.get(labelvalues)
        if child is None or labelkwargs:
            child = super().labels(*labelvalues, **labelkwargs)
            if not labelkwargs and len(kept) < CHILD_CACHE_ENTRIES:
                kept[labelvalues] = child
        return child
