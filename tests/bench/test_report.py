"""The paced table keeps, per target and load, the median of its rounds."""

from __future__ import annotations

from bench.report import PACED, Report, derive, render
from bench.scenarios import PacedRow
from bench.sse import Api


def row(target: str, round_: int, cost: float, api: Api = "chat") -> PacedRow:
    return PacedRow(
        target=target, streams=250, delay_ms=10.0, offered_events_per_s=25000.0,
        events_per_s=25000.0, proxy_cpu_us_per_event=cost, proxy_cpu_cores=cost / 40,
        load_cpu_cores=0.4, streams_exact=500, errors={}, saturated=False, foreign_cores=0.0,
        round=round_, api=api,
    )  # fmt: skip


def test_medians_and_ratios_within_each_round() -> None:
    report = Report(meta={}, targets=[])
    # nginx drifts from round to round; the gateway drifts with it (same machine, same minutes)
    report.paced_rounds = [
        row("nginx", 1, 8.0), row("gateway", 1, 20.0),
        row("nginx", 2, 10.0), row("gateway", 2, 30.0),
        row("nginx", 3, 9.0), row("gateway", 3, 18.0),
    ]  # fmt: skip
    derive(report)
    by_target = {r.target: r for r in report.paced}
    gateway, nginx = by_target["gateway"], by_target["nginx"]
    assert gateway.proxy_cpu_us_per_event == 20.0
    assert gateway.cpu_us_per_event_range == (18.0, 30.0)
    assert gateway.rounds == 3
    assert gateway.ratio_to_nginx == 2.5  # of 2.5, 3.0 and 2.0: not 20 / 9
    assert nginx.ratio_to_nginx == 1.0
    assert [r.ratio_to_nginx for r in report.paced_rounds] == [1.0, 2.5, 1.0, 3.0, 1.0, 2.0]


def test_responses_rows_are_compared_with_nginx_relaying_responses() -> None:
    report = Report(meta={}, targets=[])
    report.paced_rounds = [
        row("nginx", 1, 8.0), row("nginx", 1, 12.0, "responses"),
        row("gateway", 1, 20.0), row("gateway", 1, 36.0, "responses"),
    ]  # fmt: skip
    derive(report)

    assert [(r.api, r.target, r.ratio_to_nginx) for r in report.paced] == [
        ("chat", "nginx", 1.0),
        ("chat", "gateway", 2.5),
        ("responses", "nginx", 1.0),
        ("responses", "gateway", 3.0),
    ]
    assert PACED[0][0] == "api"
    assert "responses" in render(report)
