"""The allow-list of series added by issues 16/17: known until an issue lands, then checked."""

from __future__ import annotations

from tests.deploy.exported import (
    SERIES_ADDED_BY_ISSUES_16_17,
    awaited_sample_names,
    exported_sample_names,
    known_sample_names,
)

ISSUE_16 = SERIES_ADDED_BY_ISSUES_16_17[16]
ISSUE_17 = SERIES_ADDED_BY_ISSUES_16_17[17]


def test_series_of_issues_whose_metrics_are_not_exported_are_awaited() -> None:
    assert awaited_sample_names({"gateway_requests_total"}) == ISSUE_16 | ISSUE_17


def test_an_issue_that_exports_any_of_its_metrics_is_no_longer_awaited() -> None:
    """A metric that lands under another name must then fail the dashboard and rule checks."""
    exported = {"gateway_requests_total", "gateway_upstream_inflight"}
    assert awaited_sample_names(exported) == ISSUE_17


def test_known_names_are_the_exported_ones_plus_the_awaited_ones() -> None:
    exported = exported_sample_names()
    assert "gateway_tokens_total" in exported
    assert known_sample_names() == exported | awaited_sample_names(exported)
