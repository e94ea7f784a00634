"""The report's derived figures: paced medians per round, per-request figures against the
right base row, and the tables that print them."""

from __future__ import annotations

from bench.loadgen import Percentiles
from bench.report import PACED, Report, derive, render
from bench.scenarios import Added, FirstByteRow, LatencyRow, PacedRow, ShortCallsRow
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


def first_byte(
    target: str, connection: str, p50: float, p99: float, round_: int = 1
) -> FirstByteRow:
    return FirstByteRow(
        target=target, connection=connection, events=3,
        first_byte_ms=Percentiles(p50, p99, 1000), total_ms=Percentiles(p50, p99, 1000),
        proxy_cpu_us_per_request=None, errors={}, round=round_,
    )  # fmt: skip


def latency(target: str, ttft_p50: float, ttft_p99: float, round_: int) -> LatencyRow:
    return LatencyRow(
        target=target, streams=50, delay_ms=5.0, events=40,
        ttft_ms=Percentiles(ttft_p50, ttft_p99, 2000), total_ms=Percentiles(200.0, 210.0, 2000),
        errors={"timeout": 1} if target == "gateway" else {}, round=round_,
    )  # fmt: skip


def short(target: str, call: str, per_core: float | None, round_: int = 1) -> ShortCallsRow:
    return ShortCallsRow(
        target=target, call=call, concurrency=32, requests_per_s=5000.0,
        proxy_cpu_us_per_request=None, proxy_user_us_per_request=None,
        proxy_cpu_cores=0.5, requests_per_proxy_core_s=per_core, saturated=False,
        foreign_cores=0.0, load_cpu_cores=0.5, errors={}, round=round_,
    )  # fmt: skip


def test_first_byte_is_added_over_direct_on_the_same_kind_of_connection() -> None:
    report = Report(meta={}, targets=[])
    report.first_byte = [
        first_byte("direct", "keep-alive", 0.05, 0.2), first_byte("direct", "new", 0.3, 0.9),
        first_byte("gateway", "keep-alive", 0.75, 1.2), first_byte("gateway", "new", 1.3, 2.9),
    ]  # fmt: skip
    derive(report)
    added = {(r.target, r.connection): r.added_first_byte_ms for r in report.first_byte}

    assert added["gateway", "keep-alive"] == Added(0.7, 1.0)
    assert added["gateway", "new"] == Added(1.0, 2.0)
    assert added["direct", "new"] == Added(0.0, 0.0)
    printed = render(report)
    assert "== First byte in ms, one sequential client (+ = added over direct)" in printed
    assert "keep-alive" in printed and "0.7" in printed


def test_short_calls_per_core_are_compared_with_the_bare_relays_same_call() -> None:
    report = Report(meta={}, targets=[])
    report.short_calls = [
        short("aiohttp-relay", "chat", 8000.0), short("aiohttp-relay", "embeddings", 10000.0),
        short("gateway-team", "chat", 5600.0), short("gateway-team", "embeddings", 5000.0),
        short("direct", "chat", None),
    ]  # fmt: skip
    derive(report)
    ratio = {(r.target, r.call): r.per_core_vs_bare_relay for r in report.short_calls}

    assert ratio["gateway-team", "chat"] == 0.7
    assert ratio["gateway-team", "embeddings"] == 0.5
    assert ratio["aiohttp-relay", "chat"] == 1.0
    assert ratio["direct", "chat"] is None  # no proxy, no CPU to compare
    assert "x bare relay" in render(report)


def test_short_calls_keep_the_median_round_and_the_median_of_each_rounds_ratio() -> None:
    report = Report(meta={}, targets=[])
    # the machine slows down in round 2: both targets drop, their ratio holds
    report.short_calls_rounds = [
        short("aiohttp-relay", "chat", 8000.0, 1), short("gateway-team", "chat", 6000.0, 1),
        short("aiohttp-relay", "chat", 4000.0, 2), short("gateway-team", "chat", 3200.0, 2),
        short("aiohttp-relay", "chat", 7000.0, 3), short("gateway-team", "chat", 4900.0, 3),
    ]  # fmt: skip
    derive(report)
    team = {r.target: r for r in report.short_calls}["gateway-team"]

    assert team.requests_per_proxy_core_s == 4900.0
    assert team.per_core_range == (3200.0, 6000.0)
    assert team.rounds == 3
    assert team.per_core_vs_bare_relay == 0.75  # of 0.75, 0.8 and 0.7: not 4900 / 7000
    assert [r.per_core_vs_bare_relay for r in report.short_calls_rounds][1::2] == [0.75, 0.8, 0.7]
    assert "min-max" in render(report) and "rounds" in render(report)


def test_added_latency_is_taken_within_each_round_then_the_rounds_medians_kept() -> None:
    report = Report(meta={}, targets=[])
    # round 2 is slow for everyone: direct's TTFT rises with the gateway's
    report.latency_rounds = [
        latency("direct", 0.2, 0.5, 1), latency("gateway", 0.7, 2.5, 1),
        latency("direct", 0.9, 3.0, 2), latency("gateway", 1.3, 4.0, 2),
        latency("direct", 0.3, 0.4, 3), latency("gateway", 0.9, 2.9, 3),
    ]  # fmt: skip
    derive(report)
    gateway = {r.target: r for r in report.latency}["gateway"]

    # the median of +0.5/+2.0, +0.4/+1.0 and +0.6/+2.5, not 0.9 - 0.3 and 2.9 - 0.5
    assert gateway.added_ttft_ms == Added(0.5, 2.0)
    assert gateway.ttft_ms == Percentiles(0.9, 2.9, 6000)
    assert gateway.rounds == 3 and gateway.errors == {"timeout": 3}
    assert [r.added_ttft_ms for r in report.latency_rounds][1::2] == [
        Added(0.5, 2.0),
        Added(0.4, 1.0),
        Added(0.6, 2.5),
    ]


def test_first_byte_rounds_are_compared_with_direct_in_the_same_round() -> None:
    report = Report(meta={}, targets=[])
    report.first_byte_rounds = [
        first_byte("direct", "keep-alive", 0.05, 0.2, 1),
        first_byte("gateway", "keep-alive", 0.3, 0.6, 1),
        first_byte("direct", "keep-alive", 0.25, 0.4, 2),
        first_byte("gateway", "keep-alive", 0.45, 1.0, 2),
    ]  # fmt: skip
    derive(report)
    gateway = {r.target: r for r in report.first_byte}["gateway"]

    assert gateway.added_first_byte_ms == Added(0.225, 0.5)  # of +0.25/+0.4 and +0.2/+0.6
    assert gateway.rounds == 2
