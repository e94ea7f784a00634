"""Every Prometheus metric the gateway exports, in one class that takes a registry.

Names and labels are the contract of DESIGN.md. Labels are bounded: `team` is a configured
team or `anonymous`, `model` is a configured model name or route pattern or `other` (see
`routing.Router.model_label`), `code`, `reason`, `limit` and `type` come from fixed sets.
Tests build a fresh `CollectorRegistry` each; the app builds one per process.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from .debt import DebtCounters
from .meter_batch import FlushOnCollect, MeterBatch

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_CHUNK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


#: children kept per metric; past that (not reached with bounded labels) lookups go through
CHILD_CACHE_ENTRIES = 4096


class _KeptChildren(MetricWrapperBase):
    """`labels(*values)` keeps each child after its first lookup.

    prometheus-client's `labels` validates the values, takes a lock and builds a tuple per
    call (0.8 us hot); a streamed request asks for about a dozen children. The gateway never
    removes a child, so a kept one stays the registry's own.
    """

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        kept: dict[tuple[Any, ...], Self] | None = self.__dict__.get("_kept")
        if kept is None:
            kept = self.__dict__["_kept"] = {}
        child = kept.get(labelvalues)
        if child is None or labelkwargs:
            child = super().labels(*labelvalues, **labelkwargs)
            if not labelkwargs and len(kept) < CHILD_CACHE_ENTRIES:
                kept[labelvalues] = child
        return child


class _Counter(_KeptChildren, Counter):
    pass


class _Gauge(_KeptChildren, Gauge):
    pass


class _Histogram(_KeptChildren, Histogram):
    pass


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: stream pieces waiting to be metered, and batched gap observations: collecting
        #: the registry adds whatever waits first
        self.batch = MeterBatch()
        self._gaps: dict[str, BatchedObserver] = {}
        registry.register(FlushOnCollect(self.flush_pending))
        self.requests = _Counter(
            "gateway_requests",
            "Requests answered, by final HTTP status code.",
            ["team", "model", "upstream", "code"],
            registry=registry,
        )
        self.tokens = _Counter(
            "gateway_tokens",
            "Tokens, counted while streams run (prompt, completion, reasoning).",
            ["team", "model", "type"],
            registry=registry,
        )
        self.active_streams = _Gauge(
            "gateway_active_streams",
            "Streams being relayed now.",
            ["team", "model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ttft = _Histogram(
            "gateway_time_to_first_token_seconds",
            "From the request's arrival to the first upstream body byte sent to the client.",
            ["model", "upstream"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_chunk = _Histogram(
            "gateway_inter_chunk_seconds",
            "Time between two upstream reads relayed within a stream.",
            ["model"],
            buckets=INTER_CHUNK_BUCKETS,
            registry=registry,
        )
        self.stream_duration = _Histogram(
            "gateway_stream_duration_seconds",
            "From the request's arrival to the end of the stream.",
            ["model", "upstream"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.rate_limited = _Counter(
            "gateway_rate_limited",
            "Requests refused by a limit (requests, tokens, concurrency, inflight, budget).",
            ["team", "limit"],
            registry=registry,
        )
        self.upstream_errors = _Counter(
            "gateway_upstream_errors",
            "Upstream failures, by reason.",
            ["upstream", "reason"],
            registry=registry,
        )
        self.finish_reasons = _Counter(
            "gateway_finish_reason",
            "Choices finished, by finish_reason (none when a stream ended without one).",
            ["model", "reason"],
            registry=registry,
        )
        self.client_disconnects = _Counter(
            "gateway_client_disconnects",
            "Requests whose client went away before the answer ended (or began).",
            ["team", "model"],
            registry=registry,
        )
        self.inflight = _Gauge(
            "gateway_inflight_requests",
            "Requests being handled now (admitted past max_inflight).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.limits_degraded = _Gauge(
            "gateway_limits_backend_degraded",
            "1 while the shared limits backend is unreachable.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.usage_estimated = _Counter(
            "gateway_usage_estimated_tokens",
            "Completion tokens the gateway counted, on requests whose upstream reported usage.",
            ["model"],
            registry=registry,
        )
        self.usage_upstream = _Counter(
            "gateway_usage_upstream_tokens",
            "Completion tokens the upstream reported, on the same requests.",
            ["model"],
            registry=registry,
        )
        self.decode_errors = _Counter(
            "gateway_sse_decode_errors",
            "Upstream SSE events whose data was not valid JSON (relayed unchanged).",
            ["model"],
            registry=registry,
        )
        self.cost_usd = _Counter(
            "gateway_cost_usd",
            "Cost of the tokens at the `pricing` table, counted while streams run (USD).",
            ["team", "model"],
            registry=registry,
        )
        self.budget_used_ratio = _Gauge(
            "gateway_budget_used_ratio",
            "Spend of the current period over the budget (key: a key name, or none).",
            ["team", "key", "budget"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.unpriced_tokens = _Counter(
            "gateway_unpriced_tokens",
            "Tokens of models the `pricing` table does not price (they cost 0).",
            ["model"],
            registry=registry,
        )
        #: live counters that settle to the upstream's usage (see gateway.debt)
        self.settled_tokens = DebtCounters(self.tokens)
        self.settled_cost = DebtCounters(self.cost_usd)

    def flush_pending(self) -> None:
        """Meter the waiting stream pieces and add the batched gaps now."""
        self.batch.flush()
        for gaps in self._gaps.values():
            gaps.flush()

    def gaps(self, model: str) -> BatchedObserver:
        """The inter-chunk gaps of a model's streams, gathered in batches. One per model
        label, shared by its streams (all on the event loop's thread): no object per stream."""
        found = self._gaps.get(model)
        if found is None:
            found = self._gaps[model] = BatchedObserver(self.inter_chunk.labels(model))
        return found


FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})


def finish_reason_label(reason: str | None) -> str:
    """Bound the finish_reason label: known values pass, anything else is `other`."""
    if reason is None:
        return "none"
    return reason if reason in FINISH_REASONS else "other"


class BatchedObserver:
    """A histogram child's observations, gathered and added `batch` at a time.

    `Histogram.observe` takes a lock and walks the buckets on every call, which is most of
    the cost of watching the gaps of streams that send an event per token. This keeps its
    own bucket counts and adds them to the child in one go every `batch` observations and
    at `flush()` (a stream's end, a collection of the registry): the exported histogram is
    the same, at most `batch - 1` observations late. It writes the child's own bucket and sum values
    (`_upper_bounds`, `_buckets`, `_sum` of prometheus-client's `Histogram`), which also
    hold in multiprocess mode; `tests/accounting/test_metrics.py` checks the result
    against `observe`.
    """

    __slots__ = ("_batch", "_bounds", "_child", "_counts", "_pending", "_sum")

    def __init__(self, child: Histogram, batch: int = 64) -> None:
        self._child = child
        self._bounds = child._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._batch = batch
        self._pending = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # the first bucket whose upper bound is >= value, as Histogram.observe picks it
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._pending += 1
        if self._pending >= self._batch:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        child, counts = self._child, self._counts
        child._sum.inc(self._sum)
        for i, count in enumerate(counts):
            if count:
                child._buckets[i].inc(count)
                counts[i] = 0
        self._pending, self._sum = 0, 0.0
