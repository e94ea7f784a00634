"""`python -m bench`: run the whole matrix against every target in one run, then report.

The run starts the bench upstream on the load CPU, starts every proxy target pinned to the
proxy CPU, and then goes scenario by scenario, target by target, so each comparison is taken
minutes apart at most. Slow-stream steps restart the proxy first so memory starts from its
base. Everything listens on 127.0.0.1 and every child is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from bench import calls, procs, report, scenarios
from bench.runtime import raise_nofile_limit
from bench.sse import APIS, Api
from bench.targets import (
    REPO,
    BareRelay,
    Direct,
    Env,
    Gateway,
    Nginx,
    Target,
    TargetError,
    gateway_available,
)
from bench.upstream import Listening

ALL_TARGETS = (
    "direct",
    "nginx",
    "aiohttp-relay",
    "gateway",
    "gateway-noacct",
    "gateway-team",
    "gateway-budget",
)
ALL_SCENARIOS = ("paced", "capacity", "latency", "slow", "workers", "first-byte", "short-calls")


@dataclass(frozen=True, slots=True)
class Profile:
    """The matrix one run measures; `--quick` and the flags replace parts of it."""

    name: str = "full"
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    events: int = 260
    paced_streams: tuple[int, ...] = (100, 250)
    paced_delay_ms: float = 10.0
    #: paced windows per target and load, taken round-robin over the targets: the report
    #: keeps the median (one window can be off by 10-15% on a shared machine)
    paced_rounds: int = 3
    #: the APIs the paced scenario streams: chat chunks, and Responses API events
    apis: tuple[Api, ...] = APIS
    capacity_streams: int = 50
    latency_streams: tuple[int, ...] = (5, 50)
    latency_delay_ms: float = 5.0
    latency_events: int = 40
    slow_streams: tuple[int, ...] = (1000, 5000, 9000, 12000)
    slow_hold_s: float = 6.0
    warmup_s: float = 3.0
    window_s: float = 8.0
    #: first byte: requests measured per target and connection kind, events per stream
    first_byte_requests: int = 1000
    first_byte_events: int = 3
    short_calls: tuple[calls.CallKind, ...] = ("chat", "embeddings")
    short_calls_concurrency: int = 32
    #: windows per target of the per-request scenarios (latency, first-byte, short-calls),
    #: round-robin over the targets, medians kept: one window's figure can be off by 30% on
    #: a shared machine
    request_rounds: int = 3


QUICK = Profile(
    name="quick",
    scenarios=("paced", "capacity", "latency", "slow", "first-byte", "short-calls"),
    paced_streams=(250,),
    paced_rounds=1,
    latency_streams=(50,),
    slow_streams=(1000,),
    slow_hold_s=2.0,
    warmup_s=1.0,
    window_s=2.0,
    first_byte_requests=500,
    request_rounds=1,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated subset of `allowed`."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part for part in text.split(",") if part)
        unknown = set(names) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {allowed}")
        return names

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line; every matrix flag overrides the chosen profile."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced matrix, a few minutes")
    p.add_argument("--targets", type=_names(ALL_TARGETS), default=ALL_TARGETS)
    p.add_argument(
        "--base",
        type=_base,
        action="append",
        metavar="NAME=DIR",
        help="another checkout (a git worktree of the commit to compare): its gateway, "
        "gateway-noacct and gateway-team run too, as TARGET@NAME, in the same run; repeatable",
    )
    p.add_argument("--scenarios", type=_names(ALL_SCENARIOS))
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/<time>.json)")
    p.add_argument("--proxy-cpus", default="1", help="taskset list for the proxy under test")
    p.add_argument("--load-cpus", default="0", help="taskset list for upstream + load gen")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--events", type=int, help="events per paced/capacity stream")
    p.add_argument("--paced-streams", type=_ints)
    p.add_argument("--paced-rounds", type=int, help="paced windows per target (median kept)")
    p.add_argument("--apis", type=_names(APIS), help="paced streams: chat,responses (default both)")
    p.add_argument("--capacity-streams", type=int)
    p.add_argument("--latency-streams", type=_ints)
    p.add_argument("--slow-streams", type=_ints)
    p.add_argument("--slow-hold", type=float, dest="slow_hold_s")
    p.add_argument("--warmup", type=float, dest="warmup_s")
    p.add_argument("--window", type=float, dest="window_s")
    p.add_argument("--first-byte-requests", type=int, help="sequential requests measured")
    p.add_argument("--short-calls", type=_names(("chat", "embeddings")))
    p.add_argument("--short-calls-concurrency", type=int)
    p.add_argument(
        "--request-rounds",
        type=int,
        help="latency, first-byte and short-calls windows per target (medians kept)",
    )
    return p


def profile_from(args: argparse.Namespace) -> Profile:
    """The profile `--quick` picks, with every flag the user gave laid over it."""
    base = QUICK if args.quick else Profile()
    fields = set(asdict(base)) - {"name"}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return replace(base, **overrides)


@dataclass(frozen=True, slots=True)
class Placement:
    """Which CPUs the proxy and the load side get (None: no pinning)."""

    proxy: str | None
    load: str | None
    shared: str | None  # for --workers, where the gateway needs every core

    @classmethod
    def choose(cls, args: argparse.Namespace) -> tuple[Placement, str]:
        """Pin as asked when the machine has the CPUs, else run unpinned and say so."""
        cpus = sorted(os.sched_getaffinity(0))
        every = ",".join(map(str, cpus))
        if args.no_pin:
            return cls(None, None, None), "pinning off (--no-pin)"
        if len(cpus) < 2:
            return cls(None, None, None), f"pinning off: only CPUs {every} available"
        return cls(args.proxy_cpus, args.load_cpus, every), "pinned"


@contextlib.contextmanager
def upstream(cpus: str | None) -> Iterator[tuple[int, int]]:
    """The bench upstream on the load CPUs; yields (pid, port)."""
    command = [sys.executable, "-m", "bench.upstream", "--port", "0"]
    proc = procs.spawn(command, cpus, stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 30)[0]:
            raise scenarios.BenchError("bench upstream did not start in 30 s")
        line = proc.stdout.readline()
        yield proc.pid, msgspec.json.decode(line, type=Listening).port
    finally:
        procs.stop(proc)


def build_targets(
    names: tuple[str, ...], env: Env, bases: dict[str, Path] | None = None
) -> list[Target]:
    """The targets asked for, in the fixed order the tables use."""
    factories: dict[str, Callable[[], Target]] = {
        "direct": lambda: Direct(env),
        "nginx": lambda: Nginx(env, "nginx", env.proxy_cpus),
        "gateway": lambda: Gateway(env, "gateway", env.proxy_cpus, accounting=True),
        "gateway-noacct": lambda: Gateway(env, "gateway-noacct", env.proxy_cpus, accounting=False),
        "aiohttp-relay": lambda: BareRelay(env, "aiohttp-relay", env.proxy_cpus),
        "gateway-team": lambda: Gateway(
            env, "gateway-team", env.proxy_cpus, accounting=True, team=True
        ),
        "gateway-budget": lambda: Gateway(
            env, "gateway-budget", env.proxy_cpus, accounting=True, budget=True
        ),
    }
    built = [factories[name]() for name in ALL_TARGETS if name in names]
    for label, checkout in (bases or {}).items():  # the same gateways from other checkouts
        built += [
            Gateway(env, f"{name}@{label}", env.proxy_cpus, cwd=checkout, **BASE_TWINS[name])
            for name in ALL_TARGETS
            if name in names and name in BASE_TWINS
        ]
    return built


def _base(text: str) -> tuple[str, Path]:
    """`--base NAME=DIR` (or just DIR, named `base`)."""
    label, sep, checkout = text.rpartition("=")
    if not sep:
        label = "base"
    if not label.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"{label!r}: a name of letters, digits, - and _")
    return label, Path(checkout)


#: the targets `--base` runs again from the other checkout, and how
BASE_TWINS: dict[str, dict[str, bool]] = {
    "gateway": {"accounting": True},
    "gateway-noacct": {"accounting": False},
    "gateway-team": {"accounting": True, "team": True},
}


def start_targets(targets: list[Target]) -> tuple[list[Target], list[report.TargetStatus]]:
    """Start each target; the ones that cannot run are reported, not fatal."""
    gateway_missing = None
    if any(isinstance(t, Gateway) for t in targets):
        gateway_missing = gateway_available()
    running, statuses = [], []
    for target in targets:
        try:
            if isinstance(target, Gateway) and gateway_missing:
                raise TargetError("unavailable", gateway_missing)
            target.start()
        except TargetError as error:
            statuses.append(
                report.TargetStatus(name=target.name, status=error.status, detail=error.detail)
            )
            continue
        running.append(target)
        statuses.append(report.TargetStatus(name=target.name, status="ok"))
    return running, statuses


Step = Callable[[], None]
R = TypeVar("R")


def plan(
    prof: Profile,
    side: scenarios.LoadSide,
    targets: list[Target],
    rep: report.Report,
    env: Env,
    place: Placement,
) -> Iterator[tuple[str, str, Step]]:
    """Every measurement of the run as (scenario, target, step), in the order they run."""
    for scenario in prof.scenarios:
        if scenario == "workers":
            yield from _worker_steps(prof, side, rep, env, place, targets)
        elif scenario == "paced":
            for round_ in range(1, prof.paced_rounds + 1):
                for target in targets:
                    if round_ == 1 or not isinstance(target, Direct):  # no CPU figure to repeat
                        yield from _paced_steps(prof, side, target, rep, round_)
        elif scenario in PER_REQUEST:
            for round_ in range(1, prof.request_rounds + 1):
                for target in targets:
                    yield from _per_request_steps(scenario, prof, side, target, rep, round_)
        else:
            for target in targets:
                yield from _steps(scenario, prof, side, target, rep)


#: the scenarios measured in rounds by `--request-rounds`
PER_REQUEST = ("latency", "first-byte", "short-calls")


def _into(rows: list[R], make: Callable[[], R]) -> Step:
    """A step that takes one measurement and keeps its row."""
    return lambda: rows.append(make())


def _steps(
    scenario: str, prof: Profile, side: scenarios.LoadSide, target: Target, rep: report.Report
) -> Iterator[tuple[str, str, Step]]:
    """The steps of one scenario on one target."""
    name, warmup, window = target.name, prof.warmup_s, prof.window_s
    if scenario == "capacity":
        make_capacity = partial(scenarios.capacity, side, target, prof.capacity_streams,
                                prof.events, warmup, window)  # fmt: skip
        yield scenario, name, _into(rep.capacity, make_capacity)
    elif scenario == "slow":
        yield from _slow_steps(prof, side, target, rep)


def _paced_steps(
    prof: Profile, side: scenarios.LoadSide, target: Target, rep: report.Report, round_: int
) -> Iterator[tuple[str, str, Step]]:
    """One round of paced windows on one target, one per API and load."""
    for api in prof.apis:
        for n in prof.paced_streams:
            make_paced = partial(scenarios.paced, side, target, n, prof.paced_delay_ms,
                                 prof.events, prof.warmup_s, prof.window_s, api)  # fmt: skip
            step = "paced" if api == "chat" else f"paced {api}"
            yield step, target.name, _into(rep.paced_rounds, _in_round(make_paced, round_))


def _per_request_steps(
    scenario: str,
    prof: Profile,
    side: scenarios.LoadSide,
    target: Target,
    rep: report.Report,
    round_: int,
) -> Iterator[tuple[str, str, Step]]:
    """One round of a per-request scenario's windows on one target. Direct, the base of the
    added latencies, runs every round; it has no CPU figure, so short calls skip it after
    the first."""
    name, warmup, window = target.name, prof.warmup_s, prof.window_s
    if scenario == "latency":
        for n in prof.latency_streams:
            make_latency = partial(scenarios.latency, side, target, n, prof.latency_delay_ms,
                                   prof.latency_events, min(warmup, 1.0), window)  # fmt: skip
            yield scenario, name, _into(rep.latency_rounds, _in_round(make_latency, round_))
    elif scenario == "first-byte":
        for new_connection in (False, True):
            make_first_byte = partial(scenarios.first_byte, side, target,
                                      requests=prof.first_byte_requests,
                                      events=prof.first_byte_events,
                                      new_connection=new_connection)  # fmt: skip
            yield scenario, name, _into(rep.first_byte_rounds, _in_round(make_first_byte, round_))
    elif scenario == "short-calls" and (round_ == 1 or not isinstance(target, Direct)):
        for call in prof.short_calls:
            make_short = partial(scenarios.short_calls, side, target, call,
                                 prof.short_calls_concurrency, warmup, window)  # fmt: skip
            yield scenario, name, _into(rep.short_calls_rounds, _in_round(make_short, round_))


class _Rounded(Protocol):
    round: int


Rounded = TypeVar("Rounded", bound=_Rounded)


def _in_round(make: Callable[[], Rounded], round_: int) -> Callable[[], Rounded]:
    def measure() -> Rounded:
        row = make()
        row.round = round_
        return row

    return measure


def _slow_steps(
    prof: Profile, side: scenarios.LoadSide, target: Target, rep: report.Report
) -> Iterator[tuple[str, str, Step]]:
    """Raise N until a step does not complete every stream (the fd limit, usually)."""
    slow_plan = scenarios.SlowPlan(hold_s=prof.slow_hold_s)
    nofile = raise_nofile_limit()
    for n in prof.slow_streams:
        if n > nofile - 200:
            return  # the load generator itself could not hold that many
        if any(r.target == target.name and r.completed_share < 1 for r in rep.slow):
            return  # the previous step already found this target's limit
        yield (
            "slow",
            target.name,
            _into(rep.slow, partial(scenarios.slow, side, target, n, slow_plan)),
        )


def _worker_steps(
    prof: Profile,
    side: scenarios.LoadSide,
    rep: report.Report,
    env: Env,
    place: Placement,
    targets: list[Target],
) -> Iterator[tuple[str, str, Step]]:
    """Gateway capacity with 1 and 2 workers, everything sharing every core."""
    if not any(t.name == "gateway" for t in targets):
        return
    shared = procs.cpu_list(place.shared)
    shared_side = scenarios.LoadSide(place.shared, side.upstream_pid, shared)  # all share all
    for workers in (1, 2):

        def step(workers: int = workers) -> None:
            gw = Gateway(env, f"gateway-w{workers}", place.shared, accounting=True, workers=workers)
            gw.start()
            try:
                row = scenarios.capacity(
                    shared_side,
                    gw,
                    prof.capacity_streams,
                    prof.events,
                    prof.warmup_s,
                    prof.window_s,
                    workers=workers,
                    placement="shared",
                )
                row.target = "gateway"
                rep.workers.append(row)
            finally:
                gw.stop()

        yield "workers", f"gateway-w{workers}", step


def meta(prof: Profile, place: Placement, note: str, nofile: int) -> dict[str, Any]:
    """How and where the run was taken, so a reader can reproduce it."""
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        text=True,
        capture_output=True,
        check=False,
    ).stdout.strip()
    return {
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git,
        "profile": asdict(prof),
        "placement": {"proxy": place.proxy, "load": place.load, "note": note},
        "host": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "nofile_limit": nofile,
        },
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def run(args: argparse.Namespace) -> report.Report:
    """Run the matrix and return the report (ratios derived)."""
    prof = profile_from(args)
    place, note = Placement.choose(args)
    nofile = raise_nofile_limit()
    if place.load is not None:
        os.sched_setaffinity(0, {int(c) for c in place.load.split(",")})  # keep off the proxy
    rep = report.Report(meta=meta(prof, place, note, nofile), targets=[])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, upstream(place.load) as (pid, port):
        env = Env(Path(tmp), port, place.proxy, nofile)
        side = scenarios.LoadSide(place.load, pid, procs.cpu_list(place.proxy))
        targets = build_targets(args.targets, env, dict(args.base or []))
        running, rep.targets = start_targets(targets)
        try:
            for scenario, name, step in plan(prof, side, running, rep, env, place):
                _progress(f"{scenario:9} {name}")
                try:
                    step()
                except (scenarios.BenchError, TargetError) as error:
                    rep.failures.append(
                        report.Failure(scenario=scenario, target=name, detail=str(error))
                    )
        finally:
            for target in targets:
                target.stop()
    report.derive(rep)
    return rep


def _progress(message: str) -> None:
    """Progress on stderr, so stdout carries only the tables."""
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run, print the tables, write the JSON; exit 0 even when a target could not run."""
    args = parser().parse_args(argv)
    rep = run(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or REPO / "bench" / "results" / f"{stamp}.json"
    report.write(rep, out)
    print(report.render(rep))
    print(f"JSON written to {out}")
    return 0
