"""Every Prometheus metric the gateway exports, in one class that takes a registry.

Names and labels are the contract of DESIGN.md. Labels are bounded: `team` is a configured
team or `anonymous`, `model` is a configured model name or route pattern or `other` (see
`routing.RouteMatch.label`), `code`, `reason`, `limit` and `type` come from fixed sets.
Tests build a fresh `CollectorRegistry` each; the app builds one per process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .debt import DebtCounter, DebtCounters
from .meter_batch import FlushOnCollect, MeterBatch
from .prometheus_private import CHILD_CACHE_ENTRIES, KeptChildren, batch_adder

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_CHUNK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Counter(KeptChildren, Counter):
    pass


class _Gauge(KeptChildren, Gauge):
    pass


class _Histogram(KeptChildren, Histogram):
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
            "Tokens, counted while streams run (prompt, completion, reasoning; cached_prompt "
            "is the part of prompt the upstream read from its cache).",
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
        self.upstream_inflight = _Gauge(
            "gateway_upstream_inflight",
            "Requests in flight to each upstream (whole streams, every endpoint).",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream_healthy = _Gauge(
            "gateway_upstream_healthy",
            "1 while the upstream is trusted, 0 while cooled down or awaiting its trial request.",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.upstream_cooldowns = _Counter(
            "gateway_upstream_cooldowns",
            "Upstreams cooled down, by reason (failures, probe_failed, retry_after).",
            ["upstream", "reason"],
            registry=registry,
        )
        self.upstream_retries = _Counter(
            "gateway_upstream_retries",
            "Attempts that followed a failed one before the first byte, by the failed upstream.",
            ["upstream", "reason"],
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
        #: the children a request needs, per (team, model, upstream): `children[labels]`
        self.children: Built[tuple[str, str, str], RequestChildren] = Built(
            lambda labels: RequestChildren(self, *labels)
        )

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


FINISH_REASONS = frozenset(
    {"stop", "length", "content_filter", "tool_calls", "function_call", "error"}
)


def finish_reason_label(reason: str | None) -> str:
    """Bound the finish_reason label: known values pass, anything else is `other`."""
    if reason is None:
        return "none"
    return reason if reason in FINISH_REASONS else "other"


class BatchedObserver:
    """A histogram child's observations, gathered and added `batch` at a time.

    `Histogram.observe` takes a lock and walks the buckets on every call, which is most of
    the cost of watching the gaps of streams that send an event per token. This keeps the
    values and adds them to the child in one go every `batch` observations and at `flush()`
    (a stream's end, a collection of the registry): the exported histogram is the same, at
    most `batch - 1` observations late. Adding a batch writes the child's own bucket and sum
    values, prometheus-client internals kept behind `prometheus_private.batch_adder` (which
    falls back to `observe` per value); `tests/accounting/test_metrics.py` checks the result
    against `observe`.
    """

    __slots__ = ("_add", "_batch", "_values")

    def __init__(self, child: Histogram, batch: int = 64) -> None:
        self._add = batch_adder(child)
        self._values: list[float] = []
        self._batch = batch

    def observe(self, value: float) -> None:
        values = self._values
        values.append(value)
        if len(values) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if self._values:
            self._add(self._values)
            self._values.clear()


K = TypeVar("K")
V = TypeVar("V")


class Built(dict[K, V]):
    """A dict that builds a missing value from its key, once, and keeps it: a hit is a plain
    subscript, no Python call (unlike `labels()`). It keeps at most `CHILD_CACHE_ENTRIES`
    values (not reached with bounded labels), and only those whose key passes `keep`: past
    that, it builds one each time."""

    __slots__ = ("_build", "_keep")

    def __init__(self, build: Callable[[K], V], keep: Callable[[K], bool] | None = None) -> None:
        super().__init__()
        self._build, self._keep = build, keep

    def __missing__(self, key: K) -> V:
        value = self._build(key)
        if len(self) < CHILD_CACHE_ENTRIES and (self._keep is None or self._keep(key)):
            self[key] = value
        return value


class RequestChildren:
    """The metric children of the requests with one (team, model, upstream), resolved once.

    A streamed request asks for about a dozen children; through this bundle each is an
    attribute (or a subscript) after its first use. Each child is looked up on first use
    only, as `labels()` would be: a series appears in /metrics once a request counted in it,
    never earlier. Children that do not name a team or an upstream are the same objects in
    every bundle that shares their labels (the metric keeps one child per label values).
    """

    def __init__(self, metrics: GatewayMetrics, team: str, model: str, upstream: str) -> None:
        self._metrics = metrics
        self.team, self.model, self.upstream = team, model, upstream
        #: gateway_requests_total by final status code
        self.requests: Built[int, Counter] = Built(
            lambda status: metrics.requests.labels(team, model, upstream, str(status))
        )
        #: gateway_finish_reason_total by the finish_reason read (None: none); a reason
        #: outside FINISH_REASONS (its label is `other`) is not kept: an upstream names it
        self.finish_reasons: Built[str | None, Counter] = Built(
            lambda reason: metrics.finish_reasons.labels(model, finish_reason_label(reason)),
            lambda reason: reason is None or reason in FINISH_REASONS,
        )

    @cached_property
    def client_disconnects(self) -> Counter:
        return self._metrics.client_disconnects.labels(self.team, self.model)

    @cached_property
    def ttft(self) -> Histogram:
        return self._metrics.ttft.labels(self.model, self.upstream)

    @cached_property
    def stream_duration(self) -> Histogram:
        return self._metrics.stream_duration.labels(self.model, self.upstream)

    @cached_property
    def active_streams(self) -> Gauge:
        return self._metrics.active_streams.labels(self.team, self.model)

    @cached_property
    def gaps(self) -> BatchedObserver:
        return self._metrics.gaps(self.model)

    @cached_property
    def prompt_tokens(self) -> Counter:
        return self._metrics.tokens.labels(self.team, self.model, "prompt")

    @cached_property
    def cached_prompt_tokens(self) -> Counter:
        return self._metrics.tokens.labels(self.team, self.model, "cached_prompt")

    @cached_property
    def completion_tokens(self) -> DebtCounter:
        return self._metrics.settled_tokens.labels(self.team, self.model, "completion")

    @cached_property
    def reasoning_tokens(self) -> DebtCounter:
        return self._metrics.settled_tokens.labels(self.team, self.model, "reasoning")

    @cached_property
    def unpriced_tokens(self) -> Counter:
        return self._metrics.unpriced_tokens.labels(self.model)

    @cached_property
    def usage_estimated(self) -> Counter:
        return self._metrics.usage_estimated.labels(self.model)

    @cached_property
    def usage_upstream(self) -> Counter:
        return self._metrics.usage_upstream.labels(self.model)

    @cached_property
    def decode_errors(self) -> Counter:
        return self._metrics.decode_errors.labels(self.model)
