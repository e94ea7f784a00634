"""The sample names the gateway really exports, read from its metrics class.

A dashboard query or a rule that names a series the gateway does not export shows nothing and
alerts never; checking names against `GatewayMetrics` catches that without a running gateway.

The dashboard and the alert rules also read series that issues 16 (balancing, passive health,
retries) and 17 (budgets, keys, cost) add to the gateway on their own branches. Until an issue's
metrics land, its names are known from `../shared/DESIGN.md`'s metrics table through
`SERIES_ADDED_BY_ISSUES_16_17`. The allowance is per issue and ends as soon as the gateway
exports any metric of that issue: from then on every name listed for it must be exported for
real, so a metric that lands under another name fails the checks instead of hiding behind the
list. Once both issues are on `main`, the list can go.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics

#: the sample names each metric type exposes, by suffix
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}

#: series added by issues 16/17 (DESIGN.md's metrics table), by issue, as sample names
SERIES_ADDED_BY_ISSUES_16_17: dict[int, frozenset[str]] = {
    16: frozenset(
        {
            "gateway_upstream_inflight",
            "gateway_upstream_healthy",
            "gateway_upstream_cooldowns_total",
            "gateway_upstream_retries_total",
        }
    ),
    17: frozenset(
        {
            "gateway_cost_usd_total",
            "gateway_budget_used_ratio",
            "gateway_unpriced_tokens_total",
        }
    ),
}


def exported_sample_names() -> set[str]:
    """Every sample name a fresh `GatewayMetrics` can expose (`_created` left out)."""
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def awaited_sample_names(exported: set[str]) -> set[str]:
    """The listed series of the issues none of whose metrics the gateway exports yet."""
    return set().union(
        *(names for names in SERIES_ADDED_BY_ISSUES_16_17.values() if not names & exported)
    )


def known_sample_names() -> set[str]:
    """What the shipped queries may read: the exported series, and those still awaited."""
    exported = exported_sample_names()
    return exported | awaited_sample_names(exported)
