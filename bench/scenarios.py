"""The measurements: each runs the load generator against one target and reads its cost.

The load generator prints a marker as its measured window opens and closes; the proxy's CPU
and memory are read from `/proc` right then, so the figures cover exactly the window the
event count covers. Every function returns one row; ratios between targets are worked out
later (`bench.report`), once every target of the run has its row.
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import msgspec

from bench import procs
from bench.calls import CallKind
from bench.loadgen import LoadResult, LoadSpec, Marker, Percentiles
from bench.sse import Api
from bench.targets import Target

SATURATED_CORES = 0.95
FOREIGN_RETRY_CORES = 0.2


class BenchError(Exception):
    """A measurement could not be taken (the load generator failed or overran its time)."""


class PacedRow(msgspec.Struct, kw_only=True):
    """CPU per event at a paced load: the figure that compares relays honestly."""

    target: str
    streams: int
    delay_ms: float
    offered_events_per_s: float
    events_per_s: float
    proxy_cpu_us_per_event: float | None
    proxy_cpu_cores: float | None
    load_cpu_cores: float
    streams_exact: int
    errors: dict[str, int]
    saturated: bool  # the proxy's core was full or it fell behind the offered load
    foreign_cores: float | None  # other processes on the proxy's CPU: the figure is suspect
    attempts: int = 1  # 2 when the first window was contended (the quieter one is kept)
    ratio_to_nginx: float | None = None
    #: with several rounds: which one (a round row), or how many (the summary row), and
    #: the lowest and highest cost per event over the rounds
    round: int = 1
    rounds: int = 1
    cpu_us_per_event_range: tuple[float, float] | None = None
    #: the user-space part of `proxy_cpu_us_per_event` (the rest is the kernel's TCP work)
    proxy_user_us_per_event: float | None = None
    #: the streams' API: chat chunks, or Responses API events (bigger, typed)
    api: Api = "chat"


class CapacityRow(msgspec.Struct, kw_only=True):
    """Events per second with no delay: capacity, never cost per event."""

    target: str
    workers: int
    streams: int
    events_per_s: float
    proxy_cpu_cores: float | None
    events_per_proxy_core_s: float | None  # capacity per core actually used: scaling sans load
    process_cores: list[float]  # per proxy process, busiest first: are workers evenly loaded?
    foreign_cores: float | None
    load_cpu_cores: float
    streams_exact: int
    errors: dict[str, int]
    placement: str = "pinned"
    scaling_vs_1_worker: float | None = None


class Added(msgspec.Struct):
    """Milliseconds a target adds over the direct connection at p50 and p99."""

    p50: float | None
    p99: float | None


class LatencyRow(msgspec.Struct, kw_only=True):
    """Time to first body byte and to the end of the stream, few vs many streams."""

    target: str
    streams: int
    delay_ms: float
    events: int
    ttft_ms: Percentiles
    total_ms: Percentiles
    errors: dict[str, int]
    added_ttft_ms: Added | None = None
    added_total_ms: Added | None = None
    #: with several rounds: which one (a round row), or how many (the summary row, whose
    #: figures are the medians of the rounds')
    round: int = 1
    rounds: int = 1


class SlowRow(msgspec.Struct, kw_only=True):
    """N slow streams held at once: who completes, at what memory per stream."""

    target: str
    n: int
    events: int
    delay_ms: float
    completed_exact: int
    completed_share: float
    rss_before_kb: float | None
    rss_peak_kb: float | None
    rss_per_stream_kb: float | None
    ttft_ms: Percentiles
    load_cpu_cores: float  # over the whole run: near 1.0 means the load side limited TTFT
    errors: dict[str, int]
    ttft_p99_ratio_to_nginx: float | None = None


class FirstByteRow(msgspec.Struct, kw_only=True):
    """One client, one small stream at a time: the first byte at light load."""

    target: str
    connection: str  # `keep-alive`, or `new` (a connection per request, timed from connect)
    events: int
    first_byte_ms: Percentiles
    total_ms: Percentiles
    #: CPU of the proxy per request over the sequential run (mostly per-request work)
    proxy_cpu_us_per_request: float | None
    errors: dict[str, int]
    added_first_byte_ms: Added | None = None
    #: with several rounds: which one (a round row), or how many (the summary row, whose
    #: figures are the medians of the rounds')
    round: int = 1
    rounds: int = 1


class ShortCallsRow(msgspec.Struct, kw_only=True):
    """Short non-streaming calls with no pause: requests per second and CPU per request."""

    target: str
    call: str  # chat or embeddings
    concurrency: int
    requests_per_s: float
    proxy_cpu_us_per_request: float | None
    proxy_user_us_per_request: float | None
    proxy_cpu_cores: float | None
    requests_per_proxy_core_s: float | None  # 1e6 / cpu_us_per_request
    saturated: bool  # the proxy's core was full: requests/s is its capacity
    foreign_cores: float | None
    load_cpu_cores: float
    errors: dict[str, int]
    #: requests per proxy core against the bare aiohttp relay's, same call; in a summary row,
    #: the median of the ratios taken within each round
    per_core_vs_bare_relay: float | None = None
    #: with several rounds: which one (a round row), or how many (the summary row), and the
    #: lowest and highest requests per proxy core over the rounds
    round: int = 1
    rounds: int = 1
    per_core_range: tuple[float, float] | None = None


@dataclass(slots=True)
class Measured:
    """A load generator's result with the proxy and load-side readings at its markers."""

    result: LoadResult
    proxy: dict[str, procs.Usage] = field(default_factory=dict)
    load: dict[str, procs.Usage] = field(default_factory=dict)
    proxy_rss_peak: int = 0
    proxy_cpu_busy: dict[str, float] = field(default_factory=dict)  # /proc/stat, by marker

    def foreign_cores(self, side: LoadSide) -> float | None:
        """Cores' worth of time processes outside the bench took on the proxy's CPUs."""
        if not side.proxy_cpus:
            return None
        busy = self.proxy_cpu_busy["window_end"] - self.proxy_cpu_busy["window_start"]
        elapsed = self.proxy["window_end"].at - self.proxy["window_start"].at
        ours = self.cores(self.proxy) + (
            self.cores(self.load) if side.load_shares_proxy_cpus else 0
        )
        return max(0.0, busy / elapsed - ours)

    def cores(self, which: dict[str, procs.Usage], start: str = "window_start",
              end: str = "window_end") -> float:  # fmt: skip
        """Average cores busy between two readings (by default, over the window)."""
        return which[end].cores_since(which[start])

    def cpu_s(self, which: dict[str, procs.Usage]) -> float:
        """CPU seconds spent over the window."""
        return which["window_end"].cpu_s - which["window_start"].cpu_s

    def user_s(self, which: dict[str, procs.Usage]) -> float:
        """The user-space part of `cpu_s`."""
        return which["window_end"].user_s - which["window_start"].user_s


@dataclass(frozen=True, slots=True)
class LoadSide:
    """Where the load generator runs, which processes are the load side, and the proxy's CPUs."""

    cpus: str | None
    upstream_pid: int
    proxy_cpus: tuple[int, ...] = ()  # empty: the proxy is not pinned, no foreign-load figure

    @property
    def load_shares_proxy_cpus(self) -> bool:
        """Whether the load side runs on the proxy's CPUs too (the --workers comparison)."""
        return bool(set(procs.cpu_list(self.cpus)) & set(self.proxy_cpus))


_LINE = msgspec.json.Decoder(Marker | LoadResult)


def run_load(
    side: LoadSide, target: Target, spec: LoadSpec, timeout_s: float, *, sample_rss: bool = False
) -> Measured:
    """Run one load generator to its end, reading the target's usage at every marker."""
    command = [sys.executable, "-m", "bench.loadgen", msgspec.json.encode(spec).decode()]
    with tempfile.TemporaryFile() as stderr:
        proc = procs.spawn(command, side.cpus, stdout=subprocess.PIPE, stderr=stderr)
        try:
            return _follow(proc, side, target, time.monotonic() + timeout_s, sample_rss)
        except BenchError as error:
            stderr.seek(0)
            raise BenchError(f"{error}: {stderr.read()[-800:].decode(errors='replace')}") from None
        finally:
            procs.stop(proc, grace_s=1.0)


def _follow(
    proc: subprocess.Popen[bytes],
    side: LoadSide,
    target: Target,
    deadline: float,
    sample_rss: bool,
) -> Measured:
    """Read the load generator's lines as they come; sample the proxy's RSS meanwhile.

    Besides the generator's own markers, `start` and `end` readings bracket the whole run.
    """
    assert proc.stdout is not None
    proxy_pids, load_pids = procs.tree(target.roots()), procs.tree([side.upstream_pid, proc.pid])
    m = Measured(LoadResult.empty())
    m.proxy["start"], m.load["start"] = procs.usage(proxy_pids), procs.usage(load_pids)
    pending, result = b"", None
    while result is None:
        if time.monotonic() > deadline:
            raise BenchError(f"load generator overran its time against {target.name}")
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise BenchError(f"load generator died against {target.name}")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                message = _LINE.decode(line)
                name = message.name if isinstance(message, Marker) else "end"
                m.proxy[name], m.load[name] = procs.usage(proxy_pids), procs.usage(load_pids)
                m.proxy_cpu_busy[name] = procs.cpu_busy_s(side.proxy_cpus)
                if isinstance(message, LoadResult):
                    result = message
        if sample_rss:
            m.proxy_rss_peak = max(m.proxy_rss_peak, procs.usage(proxy_pids).rss_bytes)
    m.result = result
    return m


def run_loop(
    side: LoadSide,
    target: Target,
    *,
    streams: int,
    events: int,
    delay_ms: float,
    warmup_s: float,
    window_s: float,
    api: Api = "chat",
) -> Measured:
    """A closed-loop load (`streams` users, stream after stream) on `target`, bounded by its
    own length plus room to start and stop."""
    spec = LoadSpec(
        mode="loop",
        port=target.port,
        events=events,
        delay_ms=delay_ms,
        concurrency=streams,
        warmup_s=warmup_s,
        window_s=window_s,
        api=api,
        api_key=target.api_key,
    )
    return run_load(side, target, spec, warmup_s + window_s + 30.0)


def paced(
    side: LoadSide,
    target: Target,
    streams: int,
    delay_ms: float,
    events: int,
    warmup_s: float,
    window_s: float,
    api: Api = "chat",
) -> PacedRow:
    """CPU per event of the proxy while `streams` streams each send one event per `delay_ms`.

    A contended core makes a relay look cheaper (it wakes less often and reads several events
    at once), so a window where other processes took the proxy's CPU is taken once more and
    the quieter of the two is kept.
    """
    row = _paced_once(side, target, streams, delay_ms, events, warmup_s, window_s, api)
    if target.roots() and (row.foreign_cores or 0.0) > FOREIGN_RETRY_CORES:
        again = _paced_once(side, target, streams, delay_ms, events, warmup_s, window_s, api)
        row.attempts = again.attempts = 2
        row = min(row, again, key=lambda r: r.foreign_cores or 0.0)
    return row


def _paced_once(
    side: LoadSide,
    target: Target,
    streams: int,
    delay_ms: float,
    events: int,
    warmup_s: float,
    window_s: float,
    api: Api,
) -> PacedRow:
    """One paced window."""
    m = run_loop(
        side, target, streams=streams, events=events, delay_ms=delay_ms,
        warmup_s=warmup_s, window_s=window_s, api=api,
    )  # fmt: skip
    has_proxy = bool(target.roots())
    events_seen = max(1, m.result.events)
    offered = streams * 1000 / delay_ms
    events_per_s = m.result.events / m.result.window_s
    proxy_cores = m.cores(m.proxy) if has_proxy else 0.0
    return PacedRow(
        target=target.name,
        streams=streams,
        delay_ms=delay_ms,
        offered_events_per_s=round(offered, 1),
        events_per_s=round(events_per_s, 1),
        proxy_cpu_us_per_event=_round(m.cpu_s(m.proxy) / events_seen * 1e6) if has_proxy else None,
        proxy_cpu_cores=_round(proxy_cores) if has_proxy else None,
        proxy_user_us_per_event=_round(m.user_s(m.proxy) / events_seen * 1e6)
        if has_proxy
        else None,
        load_cpu_cores=_round(m.cores(m.load)),
        streams_exact=m.result.streams_exact,
        errors=m.result.errors,
        saturated=proxy_cores > SATURATED_CORES or events_per_s < 0.97 * offered,
        foreign_cores=_round_opt(m.foreign_cores(side)),
        api=api,
    )


def capacity(
    side: LoadSide,
    target: Target,
    streams: int,
    events: int,
    warmup_s: float,
    window_s: float,
    *,
    workers: int = 1,
    placement: str = "pinned",
) -> CapacityRow:
    """Events per second with no pacing: how much one target can relay at most."""
    m = run_loop(
        side, target, streams=streams, events=events, delay_ms=0,
        warmup_s=warmup_s, window_s=window_s,
    )  # fmt: skip
    events_per_s = m.result.events / m.result.window_s
    proxy_cores = m.cores(m.proxy) if target.roots() else None
    return CapacityRow(
        target=target.name,
        workers=workers,
        streams=streams,
        events_per_s=round(events_per_s, 1),
        proxy_cpu_cores=_round(proxy_cores) if proxy_cores is not None else None,
        events_per_proxy_core_s=round(events_per_s / proxy_cores, 1) if proxy_cores else None,
        process_cores=m.proxy["window_end"].cores_by_pid_since(m.proxy["window_start"]),
        foreign_cores=_round_opt(m.foreign_cores(side)),
        load_cpu_cores=_round(m.cores(m.load)),
        streams_exact=m.result.streams_exact,
        errors=m.result.errors,
        placement=placement,
    )


def latency(
    side: LoadSide,
    target: Target,
    streams: int,
    delay_ms: float,
    events: int,
    warmup_s: float,
    window_s: float,
) -> LatencyRow:
    """TTFT and total time of streams that started and ended inside the window."""
    m = run_loop(
        side, target, streams=streams, events=events, delay_ms=delay_ms,
        warmup_s=warmup_s, window_s=window_s,
    )  # fmt: skip
    return LatencyRow(
        target=target.name,
        streams=streams,
        delay_ms=delay_ms,
        events=events,
        ttft_ms=m.result.ttft_ms,
        total_ms=m.result.total_ms,
        errors=m.result.errors,
    )


@dataclass(frozen=True, slots=True)
class SlowPlan:
    """How slow streams are opened and how long they are held."""

    delay_ms: float = 200.0
    ramp_per_s: float = 2000.0
    hold_s: float = 6.0
    grace_s: float = 10.0

    def events(self, n: int) -> int:
        """Enough events that the first stream is still open when the last one has started."""
        return max(3, math.ceil((n / self.ramp_per_s + self.hold_s) * 1000 / self.delay_ms) + 1)


def slow(side: LoadSide, target: Target, n: int, plan: SlowPlan) -> SlowRow:
    """Hold `n` slow streams at once on a freshly started target; memory per stream."""
    target.restart()
    # load lazy state before "before"
    run_loop(side, target, streams=10, events=20, delay_ms=0, warmup_s=0.3, window_s=0.5)
    before = procs.usage(procs.tree(target.roots())).rss_bytes
    events = plan.events(n)
    spec = LoadSpec(
        mode="slow",
        port=target.port,
        events=events,
        delay_ms=plan.delay_ms,
        n=n,
        ramp_per_s=plan.ramp_per_s,
        grace_s=plan.grace_s,
        api_key=target.api_key,
    )
    stream_s = (events - 1) * plan.delay_ms / 1000
    timeout = n / plan.ramp_per_s + stream_s + plan.grace_s + 30.0
    m = run_load(side, target, spec, timeout, sample_rss=True)
    has_proxy = bool(target.roots())
    return SlowRow(
        target=target.name,
        n=n,
        events=events,
        delay_ms=plan.delay_ms,
        completed_exact=m.result.streams_exact,
        completed_share=round(m.result.streams_exact / n, 4),
        rss_before_kb=_round(before / 1024) if has_proxy else None,
        rss_peak_kb=_round(m.proxy_rss_peak / 1024) if has_proxy else None,
        rss_per_stream_kb=_round((m.proxy_rss_peak - before) / 1024 / n) if has_proxy else None,
        ttft_ms=m.result.ttft_ms,
        load_cpu_cores=_round(m.cores(m.load, "start", "end")),
        errors=m.result.errors,
    )


def _round(value: float) -> float:
    """Three significant decimals are plenty for figures that drift by percents."""
    return round(value, 3)


def _round_opt(value: float | None) -> float | None:
    return None if value is None else _round(value)


def first_byte(
    side: LoadSide, target: Target, *, requests: int, events: int, new_connection: bool
) -> FirstByteRow:
    """`requests` small streams one after another from one client, after 50 to warm up."""
    spec = LoadSpec(
        mode="sequential",
        port=target.port,
        events=events,
        delay_ms=0,
        requests=requests,
        new_connection=new_connection,
        api_key=target.api_key,
    )
    m = run_load(side, target, spec, 30.0 + requests * 0.05)
    has_proxy = bool(target.roots())
    cpu_us = m.cpu_s(m.proxy) / max(1, m.result.requests) * 1e6
    return FirstByteRow(
        target=target.name,
        connection="new" if new_connection else "keep-alive",
        events=events,
        first_byte_ms=m.result.ttft_ms,
        total_ms=m.result.total_ms,
        proxy_cpu_us_per_request=_round(cpu_us) if has_proxy else None,
        errors=m.result.errors,
    )


def short_calls(
    side: LoadSide,
    target: Target,
    call: CallKind,
    concurrency: int,
    warmup_s: float,
    window_s: float,
) -> ShortCallsRow:
    """Back-to-back short calls from `concurrency` keep-alive clients: the proxy's core fills."""
    spec = LoadSpec(
        mode="loop",
        port=target.port,
        events=3,
        delay_ms=0,
        concurrency=concurrency,
        warmup_s=warmup_s,
        window_s=window_s,
        call=call,
        api_key=target.api_key,
    )
    m = run_load(side, target, spec, warmup_s + window_s + 30.0)
    has_proxy = bool(target.roots())
    done = max(1, m.result.requests)
    proxy_cores = m.cores(m.proxy) if has_proxy else None
    return ShortCallsRow(
        target=target.name,
        call=call,
        concurrency=concurrency,
        requests_per_s=round(m.result.requests / m.result.window_s, 1),
        proxy_cpu_us_per_request=_round(m.cpu_s(m.proxy) / done * 1e6) if has_proxy else None,
        proxy_user_us_per_request=_round(m.user_s(m.proxy) / done * 1e6) if has_proxy else None,
        proxy_cpu_cores=_round_opt(proxy_cores),
        requests_per_proxy_core_s=round(m.result.requests / m.result.window_s / proxy_cores, 1)
        if proxy_cores
        else None,
        saturated=(proxy_cores or 0.0) > SATURATED_CORES,
        foreign_cores=_round_opt(m.foreign_cores(side)),
        load_cpu_cores=_round(m.cores(m.load)),
        errors=m.result.errors,
    )
