"""The sample names the gateway really exports, read from its metrics class.

A dashboard query or a rule that names a series the gateway does not export shows nothing and
alerts never; checking names against `GatewayMetrics` catches that without a running gateway.
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


def exported_sample_names() -> set[str]:
    """Every sample name a fresh `GatewayMetrics` can expose (`_created` left out)."""
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }
