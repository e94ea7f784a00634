"""A stream's inter-chunk gaps are gathered and added in batches: same histogram as observe."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import BatchedObserver, GatewayMetrics


def samples(values: list[float], *, batched: bool, batch: int = 64) -> dict[str, float]:
    """The histogram's samples by name and `le` (the sum may differ in its last bits: the
    batch adds in another order)."""
    metrics = GatewayMetrics(CollectorRegistry())
    child = metrics.inter_chunk.labels("m")
    if batched:
        observer = BatchedObserver(child, batch)
        for value in values:
            observer.observe(value)
        observer.flush()
    else:
        for value in values:
            child.observe(value)
    return {
        f"{sample.name}{sample.labels.get('le', '')}": sample.value
        for family in metrics.registry.collect()
        if family.name == "gateway_inter_chunk_seconds"
        for sample in family.samples
    }


def test_batched_observations_give_the_histogram_observe_gives() -> None:
    rng = random.Random(7)
    bounds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
    # every bucket edge exactly (le is inclusive), values between them, and past the last
    values = bounds + [rng.uniform(0, 7) for _ in range(500)] + [0.0, 60.0]
    expected = samples(values, batched=False)
    assert len(expected) == len(bounds) + 4  # the buckets, +Inf, count, sum, created
    for batch in (64, 1):
        got = samples(values, batched=True, batch=batch)
        created = "gateway_inter_chunk_seconds_created"
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if name != created:
                assert got[name] == pytest.approx(value, rel=1e-12), name


def test_observations_show_every_batch_and_all_of_them_after_flush() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    observer = BatchedObserver(metrics.inter_chunk.labels("m"), batch=10)

    def count() -> float | None:
        name = "gateway_inter_chunk_seconds_count"
        return metrics.registry.get_sample_value(name, {"model": "m"})

    for _ in range(9):
        observer.observe(0.01)
    assert count() == 0
    observer.observe(0.01)
    assert count() == 10
    observer.observe(0.01)
    observer.flush()
    observer.flush()  # nothing pending: a second flush adds nothing
    assert count() == 11


def test_collecting_the_registry_adds_the_gaps_still_waiting() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    gaps = metrics.gaps("m")
    assert metrics.gaps("m") is gaps  # one per model label, shared by its streams
    for _ in range(3):  # fewer than a batch
        gaps.observe(0.01)
    count = metrics.registry.get_sample_value("gateway_inter_chunk_seconds_count", {"model": "m"})
    assert count == 3


def series(metrics: GatewayMetrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every exported series (sample name and labels), values aside."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in metrics.registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_request_children_are_the_metrics_own_children_kept_per_label_values() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    children = metrics.children["team-a", "m", "up-1"]
    assert metrics.children["team-a", "m", "up-1"] is children
    assert children.ttft is metrics.ttft.labels("m", "up-1")
    assert children.active_streams is metrics.active_streams.labels("team-a", "m")
    assert children.prompt_tokens is metrics.tokens.labels("team-a", "m", "prompt")
    assert children.completion_tokens is metrics.settled_tokens.labels("team-a", "m", "completion")
    assert children.requests[200] is metrics.requests.labels("team-a", "m", "up-1", "200")
    assert children.finish_reasons["stop"] is metrics.finish_reasons.labels("m", "stop")
    assert children.finish_reasons[None] is metrics.finish_reasons.labels("m", "none")
    assert children.gaps is metrics.gaps("m")
    # a child that names no team or upstream is one object across bundles
    assert metrics.children["team-b", "m", "up-2"].unpriced_tokens is children.unpriced_tokens


def test_request_children_add_a_series_only_once_a_request_counts_in_it() -> None:
    """The bundle resolves a child on first use, as labels() does: /metrics is unchanged."""
    metrics = GatewayMetrics(CollectorRegistry())
    before = series(metrics)
    children = metrics.children["team-a", "m", "up-1"]
    assert series(metrics) == before
    children.requests[429].inc()
    added = series(metrics) - before
    labels = (("code", "429"), ("model", "m"), ("team", "team-a"), ("upstream", "up-1"))
    assert added == {("gateway_requests_total", labels)}


def test_finish_reasons_an_upstream_invents_count_as_other_and_are_not_kept() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    reasons = metrics.children["team-a", "m", "up-1"].finish_reasons
    for invented in ("made_up_1", "made_up_2"):
        reasons[invented].inc()
    reasons["length"].inc()
    assert set(reasons) == {"length"}
    assert (
        metrics.registry.get_sample_value(
            "gateway_finish_reason_total", {"model": "m", "reason": "other"}
        )
        == 2
    )
