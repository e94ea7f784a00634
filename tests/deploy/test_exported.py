"""The gateway exports every metric of the contract (`../shared/DESIGN.md`'s metrics table):
dashboards, alert rules and users' own queries read these names."""

from __future__ import annotations

from tests.deploy.exported import exported_sample_names

#: DESIGN.md's metrics table, as the sample names Prometheus sees
CONTRACT = frozenset(
    {
        "gateway_requests_total",
        "gateway_tokens_total",
        "gateway_active_streams",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_inter_chunk_seconds_bucket",
        "gateway_stream_duration_seconds_bucket",
        "gateway_rate_limited_total",
        "gateway_upstream_errors_total",
        "gateway_finish_reason_total",
        "gateway_client_disconnects_total",
        "gateway_upstream_inflight",
        "gateway_upstream_healthy",
        "gateway_upstream_cooldowns_total",
        "gateway_upstream_retries_total",
        "gateway_cost_usd_total",
        "gateway_budget_used_ratio",
        "gateway_unpriced_tokens_total",
    }
)


def test_every_metric_of_the_contract_is_exported() -> None:
    assert CONTRACT - exported_sample_names() == set()
