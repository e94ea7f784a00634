"""The run's report: ratios between targets, a printed table, and the JSON file.

Ratios are only ever taken between rows of the same run, since absolute times drift on a
shared machine: CPU per event and slow-stream TTFT against nginx, latency against direct,
capacity with two workers against one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bench.loadgen import Percentiles
from bench.scenarios import (
    Added,
    CapacityRow,
    FirstByteRow,
    LatencyRow,
    PacedRow,
    ShortCallsRow,
    SlowRow,
)


class TargetStatus(msgspec.Struct, kw_only=True):
    """Whether a target ran, and if not, why (`unavailable`, `unsupported`, `failed`)."""

    name: str
    status: str
    detail: str = ""


class Failure(msgspec.Struct, kw_only=True):
    """A measurement that could not be taken, kept in the report instead of stopping the run."""

    scenario: str
    target: str
    detail: str


class Report(msgspec.Struct, kw_only=True):
    """Everything one run measured; `meta` says how and where."""

    meta: dict[str, Any]
    targets: list[TargetStatus]
    paced: list[PacedRow] = msgspec.field(default_factory=list)
    #: every paced window, round by round; `paced` holds their medians
    paced_rounds: list[PacedRow] = msgspec.field(default_factory=list)
    capacity: list[CapacityRow] = msgspec.field(default_factory=list)
    latency: list[LatencyRow] = msgspec.field(default_factory=list)
    slow: list[SlowRow] = msgspec.field(default_factory=list)
    workers: list[CapacityRow] = msgspec.field(default_factory=list)
    failures: list[Failure] = msgspec.field(default_factory=list)
    first_byte: list[FirstByteRow] = msgspec.field(default_factory=list)
    short_calls: list[ShortCallsRow] = msgspec.field(default_factory=list)
    #: every window of the per-request scenarios, round by round; `latency`, `first_byte`
    #: and `short_calls` hold their medians
    latency_rounds: list[LatencyRow] = msgspec.field(default_factory=list)
    first_byte_rounds: list[FirstByteRow] = msgspec.field(default_factory=list)
    short_calls_rounds: list[ShortCallsRow] = msgspec.field(default_factory=list)


def _ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or the base is zero."""
    if value is None or not base:
        return None
    return round(value / base, 3)


def _minus(value: float | None, base: float | None) -> float | None:
    """value - base in ms, or None when either is missing."""
    return None if value is None or base is None else round(value - base, 3)


def _added(row: Percentiles, base: Percentiles) -> Added:
    return Added(_minus(row.p50, base.p50), _minus(row.p99, base.p99))


def derive(report: Report) -> None:
    """Fill in every figure that compares two rows of this run."""
    report.paced = _paced_medians(report.paced_rounds)
    report.latency = _latency_medians(report.latency_rounds or report.latency)
    nginx_ttft = {r.n: r.ttft_ms.p99 for r in report.slow if r.target == "nginx"}
    for s in report.slow:
        s.ttft_p99_ratio_to_nginx = _ratio(s.ttft_ms.p99, nginx_ttft.get(s.n))
    one_worker = {r.target: r.events_per_s for r in report.workers if r.workers == 1}
    for w in report.workers:
        w.scaling_vs_1_worker = _ratio(w.events_per_s, one_worker.get(w.target))
    _derive_per_request(report)


def _derive_per_request(report: Report) -> None:
    """First byte added over direct (same kind of connection); short calls per proxy core
    against the bare aiohttp relay's (same call). Each is taken within a round, then the
    rounds' medians kept (a report with no rounds has one)."""
    report.first_byte = _first_byte_medians(report.first_byte_rounds or report.first_byte)
    report.short_calls = _short_call_medians(report.short_calls_rounds or report.short_calls)


G = TypeVar("G", LatencyRow, FirstByteRow, ShortCallsRow, PacedRow)


def _groups(rows: list[G], key: Callable[[G], tuple[object, ...]]) -> list[list[G]]:
    """Rows of one target and load across rounds, in the order they first came."""
    groups: dict[tuple[object, ...], list[G]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return list(groups.values())


def _beside(rows: list[G], base_target: str, load: Callable[[G], object]) -> Iterator[tuple[G, G]]:
    """Each row with `base_target`'s row of the same round and load, where one was taken:
    added times and ratios are only ever taken within a round."""
    bases = {(r.round, load(r)): r for r in rows if r.target == base_target}
    for row in rows:
        if (base := bases.get((row.round, load(row)))) is not None:
            yield row, base


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _median_percentiles(values: list[Percentiles]) -> Percentiles:
    """Each percentile's median over the rounds, and every round's samples."""
    return Percentiles(
        _median([v.p50 for v in values]),
        _median([v.p99 for v in values]),
        sum(v.samples for v in values),
    )


def _median_added(values: list[Added | None]) -> Added | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return Added(_median([v.p50 for v in known]), _median([v.p99 for v in known]))


def _summed_errors(rows: Sequence[LatencyRow | FirstByteRow]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for row in rows:
        for kind, n in row.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    return errors


def _latency_medians(rounds: list[LatencyRow]) -> list[LatencyRow]:
    """Added latency over direct within each round, then per target and load the medians."""
    for lat, base in _beside(rounds, "direct", lambda r: r.streams):
        lat.added_ttft_ms = _added(lat.ttft_ms, base.ttft_ms)
        lat.added_total_ms = _added(lat.total_ms, base.total_ms)
    return [
        msgspec.structs.replace(
            group[0],
            rounds=len(group),
            ttft_ms=_median_percentiles([r.ttft_ms for r in group]),
            total_ms=_median_percentiles([r.total_ms for r in group]),
            added_ttft_ms=_median_added([r.added_ttft_ms for r in group]),
            added_total_ms=_median_added([r.added_total_ms for r in group]),
            errors=_summed_errors(group),
        )
        for group in _groups(rounds, lambda r: (r.target, r.streams))
    ]


def _first_byte_medians(rounds: list[FirstByteRow]) -> list[FirstByteRow]:
    """First byte added over direct on the same kind of connection within each round, then
    per target and connection the medians."""
    for fb, base in _beside(rounds, "direct", lambda r: r.connection):
        fb.added_first_byte_ms = _added(fb.first_byte_ms, base.first_byte_ms)
    return [
        msgspec.structs.replace(
            group[0],
            rounds=len(group),
            first_byte_ms=_median_percentiles([r.first_byte_ms for r in group]),
            total_ms=_median_percentiles([r.total_ms for r in group]),
            proxy_cpu_us_per_request=_median([r.proxy_cpu_us_per_request for r in group]),
            added_first_byte_ms=_median_added([r.added_first_byte_ms for r in group]),
            errors=_summed_errors(group),
        )
        for group in _groups(rounds, lambda r: (r.target, r.connection))
    ]


def _short_call_medians(rounds: list[ShortCallsRow]) -> list[ShortCallsRow]:
    """One row per target and call: the median round by requests per core, its ratio the
    median of the ratios to the bare relay taken within each round (minutes apart at most)."""
    for sc, bare in _beside(rounds, "aiohttp-relay", lambda r: r.call):
        sc.per_core_vs_bare_relay = _ratio(
            sc.requests_per_proxy_core_s, bare.requests_per_proxy_core_s
        )
    medians = []
    for group in _groups(rounds, lambda r: (r.target, r.call)):
        ranked = sorted(group, key=lambda r: r.requests_per_proxy_core_s or 0.0)
        middle = msgspec.structs.replace(ranked[(len(ranked) - 1) // 2], rounds=len(group))
        per_core = [x for r in ranked if (x := r.requests_per_proxy_core_s) is not None]
        if per_core:
            middle.requests_per_proxy_core_s = statistics.median(per_core)
            middle.per_core_range = (per_core[0], per_core[-1])
        middle.per_core_vs_bare_relay = _median([r.per_core_vs_bare_relay for r in group])
        medians.append(middle)
    return medians


def _paced_medians(rounds: list[PacedRow]) -> list[PacedRow]:
    """One row per target and load: the median round, its ratio the median of the ratios
    taken within each round (nginx measured minutes apart from the target at most)."""
    for row, nginx in _beside(rounds, "nginx", lambda r: (r.streams, r.api)):
        row.ratio_to_nginx = _ratio(row.proxy_cpu_us_per_event, nginx.proxy_cpu_us_per_event)
    medians = []
    for group in _groups(rounds, lambda r: (r.api, r.target, r.streams)):
        costs = sorted(c for r in group if (c := r.proxy_cpu_us_per_event) is not None)
        ratios = [x for r in group if (x := r.ratio_to_nginx) is not None]
        middle = msgspec.structs.replace(_median_by_cost(group), rounds=len(group))
        if costs:
            middle.proxy_cpu_us_per_event = statistics.median(costs)
            middle.cpu_us_per_event_range = (costs[0], costs[-1])
        middle.ratio_to_nginx = round(statistics.median(ratios), 3) if ratios else None
        medians.append(middle)
    return sorted(medians, key=lambda r: r.api != "chat")  # chat's rows first, as they came


def _median_by_cost(group: list[PacedRow]) -> PacedRow:
    """The round whose cost per event is the median one (the first when there is none)."""
    ranked = sorted(group, key=lambda r: r.proxy_cpu_us_per_event or 0.0)
    return ranked[(len(ranked) - 1) // 2]


def _fmt(value: object) -> str:
    """A table cell: numbers compact, missing values as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, list):
        return "/".join(_fmt(v) for v in value) or "-"
    if isinstance(value, tuple):  # a (low, high) range
        return "-".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "0"
    return str(value)[:120]


Column = tuple[str, Callable[[Any], object]]


def _cols(spec: str) -> list[Column]:
    """Columns from `header=attr.path` pairs, one per line: the tables read like their specs."""
    columns: list[Column] = []
    for line in spec.strip().splitlines():
        header, _, path = line.strip().partition("=")
        columns.append((header, attrgetter(path)))
    return columns


TARGETS = _cols("target=name\nstatus=status\ndetail=detail")
PACED = _cols("""
    api=api
    target=target
    streams=streams
    delay_ms=delay_ms
    events/s=events_per_s
    cpu_us/event=proxy_cpu_us_per_event
    min-max=cpu_us_per_event_range
    user_us=proxy_user_us_per_event
    x nginx=ratio_to_nginx
    rounds=rounds
    proxy_cores=proxy_cpu_cores
    saturated=saturated
    foreign=foreign_cores
    load_cores=load_cpu_cores
    errors=errors
""")
CAPACITY = _cols("""
    target=target
    workers=workers
    streams=streams
    events/s=events_per_s
    x 1 worker=scaling_vs_1_worker
    proxy_cores=proxy_cpu_cores
    events/s/core=events_per_proxy_core_s
    per_process=process_cores
    foreign=foreign_cores
    load_cores=load_cpu_cores
    errors=errors
""")
LATENCY = _cols("""
    target=target
    streams=streams
    ttft p50=ttft_ms.p50
    ttft p99=ttft_ms.p99
    +ttft p50=added_ttft_ms.p50
    +ttft p99=added_ttft_ms.p99
    total p50=total_ms.p50
    total p99=total_ms.p99
    +total p50=added_total_ms.p50
    +total p99=added_total_ms.p99
    samples=total_ms.samples
    rounds=rounds
    errors=errors
""")
SLOW = _cols("""
    target=target
    n=n
    exact share=completed_share
    rss_before_kb=rss_before_kb
    rss_peak_kb=rss_peak_kb
    kb/stream=rss_per_stream_kb
    ttft p99 ms=ttft_ms.p99
    x nginx=ttft_p99_ratio_to_nginx
    load_cores=load_cpu_cores
    errors=errors
""")
FIRST_BYTE = _cols("""
    target=target
    connection=connection
    fb p50=first_byte_ms.p50
    fb p99=first_byte_ms.p99
    +fb p50=added_first_byte_ms.p50
    +fb p99=added_first_byte_ms.p99
    total p50=total_ms.p50
    total p99=total_ms.p99
    cpu_us/req=proxy_cpu_us_per_request
    samples=first_byte_ms.samples
    rounds=rounds
    errors=errors
""")
SHORT_CALLS = _cols("""
    target=target
    call=call
    clients=concurrency
    req/s=requests_per_s
    cpu_us/req=proxy_cpu_us_per_request
    user_us=proxy_user_us_per_request
    req/s/core=requests_per_proxy_core_s
    min-max=per_core_range
    x bare relay=per_core_vs_bare_relay
    rounds=rounds
    proxy_cores=proxy_cpu_cores
    saturated=saturated
    foreign=foreign_cores
    load_cores=load_cpu_cores
    errors=errors
""")
FAILURES = _cols("scenario=scenario\ntarget=target\ndetail=detail")


def _cell(row: object, get: Callable[[Any], object]) -> str:
    """One cell; a missing nested figure (e.g. no `added_*` for direct) shows as a dash."""
    try:
        return _fmt(get(row))
    except AttributeError:
        return "-"


def table(title: str, columns: Sequence[Column], rows: Sequence[object]) -> str:
    """A plain fixed-width table; empty when there are no rows."""
    if not rows:
        return ""
    cells = [[h for h, _ in columns], *([_cell(r, get) for _, get in columns] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([f"== {title}", *lines, ""])


def render(report: Report) -> str:
    """Every table of the report, in the order the issue lists the measurements."""
    parts = [
        table("Targets", TARGETS, report.targets),
        table("Paced CPU per relayed event (proxy process tree)", PACED, report.paced),
        table("Capacity (no delay: events/s, not cost per event)", CAPACITY, report.capacity),
        table("Latency in ms (+ = added over direct)", LATENCY, report.latency),
        table("Slow streams held at once", SLOW, report.slow),
        table("Workers (gateway and load side share every core)", CAPACITY, report.workers),
        table(
            "First byte in ms, one sequential client (+ = added over direct)",
            FIRST_BYTE,
            report.first_byte,
        ),
        table(
            "Short non-streaming calls at saturation (per request, proxy process tree)",
            SHORT_CALLS,
            report.short_calls,
        ),
        table("Failures", FAILURES, report.failures),
    ]
    return "\n".join(part for part in parts if part)


def write(report: Report, path: Path) -> None:
    """Write the report as indented JSON, creating the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
