"""Python calls the gateway makes per request, by layer: cProfile's counts, not its times.

`python -m bench.profile_requests [--requests 1000] [--team] [--no-accounting]` serves the
bench's gateway configuration in this process, under cProfile only while the load
generator's measured window is open, for two loads one after the other: sequential keep-alive
streams of 3 events, sequential non-streaming chat calls, then sequential streams each on a
new client connection (each load after 100 requests to warm up).
It prints, per load, every layer's calls per request and the functions in it called at least
`--min` times per request. Call counts are deterministic: unlike times, they hold on a busy
machine. A builtin (a C function or method) is counted in the layer of the Python function
that called it; so is a standard-library function outside asyncio. A coroutine counts one call
each time it runs: its start and every resumption after an `await` that suspended it.

The gateway's log lines go to a temporary file, not to stdout, which carries the report.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.cli import upstream
from bench.loadgen import LoadResult, LoadSpec, Marker
from bench.targets import Env, Gateway

#: (path fragment, layer), first match wins: where a function's file says which layer it is
LAYERS: tuple[tuple[str, str], ...] = (
    ("/gateway/app.py", "middlewares"),
    ("/gateway/request_parse.py", "request_parse"),
    ("/gateway/routing.py", "routing"),
    ("/gateway/admission.py", "admission"),
    ("/gateway/limits/", "admission"),
    ("/gateway/auth.py", "middlewares"),
    ("/gateway/upstream.py", "upstream"),
    ("/gateway/upstream_http.py", "upstream"),
    ("/gateway/client_response.py", "client_response"),
    ("/gateway/aiohttp_private.py", "client_response"),
    ("/gateway/relay.py", "relay"),
    ("/gateway/relay_tap.py", "relay"),
    ("/gateway/ledger.py", "ledger"),
    ("/gateway/meter.py", "meter"),
    ("/gateway/meter_batch.py", "meter"),
    ("/gateway/sse.py", "meter"),
    ("/gateway/tokens.py", "tokens"),
    ("/gateway/outcome.py", "outcome"),
    ("/gateway/context.py", "outcome"),
    ("/gateway/errors.py", "outcome"),
    ("/gateway/proxy.py", "proxy"),
    ("/gateway/metrics.py", "metrics"),
    ("/gateway/prometheus_private.py", "metrics"),
    ("/prometheus_client/", "metrics"),
    ("/gateway/logs.py", "structlog"),
    ("/structlog/", "structlog"),
    ("/aiohttp/", "aiohttp server"),
    ("/multidict/", "aiohttp server"),
    ("/yarl/", "aiohttp server"),
    ("/asyncio/", "event loop"),
    ("/uvloop/", "event loop"),
    ("/gateway/", "gateway, other"),
    ("/bench/", "profiler's own"),
)


def layer_of(filename: str) -> str | None:
    """The layer of a Python file, or None (a builtin or the standard library)."""
    for fragment, layer in LAYERS:
        if fragment in filename:
            return layer
    _, packages, inside = filename.partition("/site-packages/")
    return inside.split("/")[0] if packages else None  # another dependency, by name


Key = tuple[str, int, str]


@dataclass(slots=True)
class Layers:
    """Calls per layer and per function, builtins counted where their callers are."""

    calls: dict[str, float] = field(default_factory=dict)
    functions: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, layer: str, name: str, count: float) -> None:
        self.calls[layer] = self.calls.get(layer, 0.0) + count
        by_name = self.functions.setdefault(layer, {})
        by_name[name] = by_name.get(name, 0.0) + count


def group(stats: pstats.Stats) -> Layers:
    """Every function's call count, in its layer or, for a builtin, in its callers' layers."""
    raw: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    layers = Layers()
    for key, (_, calls, _, _, callers) in raw.items():
        own = layer_of(key[0])
        name = _name(key)
        if own is not None:
            layers.add(own, name, calls)
            continue
        for caller, counts in callers.items():
            layers.add(layer_of(caller[0]) or "other", name, counts[1] if counts else 0)
    return layers


def _name(key: Key) -> str:
    filename, line, function = key
    if filename == "~":
        return function  # a builtin: `<method 'get' of 'dict' objects>`
    tail = "/".join(Path(filename).parts[-2:])
    return f"{tail}:{line} {function}"


def render(title: str, layers: Layers, requests: int, minimum: float) -> str:
    """One load's table: layers by calls per request, their busiest functions under them."""
    lines = [f"== {title}", f"{'calls per request':>18}  layer / function"]
    total = sum(layers.calls.values()) / requests
    lines.append(f"{total:18.1f}  all")
    for layer, count in sorted(layers.calls.items(), key=lambda kv: -kv[1]):
        if count / requests < minimum:
            continue
        lines.append(f"{count / requests:18.1f}  {layer}")
        functions = sorted(layers.functions[layer].items(), key=lambda kv: -kv[1])
        for name, calls in functions:
            if calls / requests >= minimum:
                lines.append(f"{calls / requests:18.2f}      {name}")
    return "\n".join(lines) + "\n"


#: the per-request steps issue 18 names, by the functions where each starts: every call made
#: below them (their subtree in the call graph) is counted to the step
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("structlog: bind, unbind, the bound logger's call (the log line)",
     ("structlog/_config.py:__getattr__", "structlog/_native.py:meth",
      "structlog/contextvars.py:bind_contextvars", "structlog/contextvars.py:unbind_contextvars")),
    ("metric label lookups (children cached per label values)",
     ("gateway/prometheus_private.py:labels",)),
    ("metric updates (inc, dec, observe)",
     ("prometheus_client/metrics.py:inc", "prometheus_client/metrics.py:dec",
      "prometheus_client/metrics.py:observe")),
    ("building the upstream request",
     ("gateway/upstream.py:target_for", "gateway/upstream.py:headers_for",
      "gateway/upstream.py:body_for", "gateway/upstream.py:__post_init__",
      "gateway/upstream_http.py:_head", "gateway/proxy.py:_forwarded_headers",
      "gateway/proxy.py:_injected_body")),
    ("reading the upstream's head (status, headers)",
     ("gateway/upstream_http.py:on_status", "gateway/upstream_http.py:on_header",
      "gateway/upstream_http.py:on_headers_complete", "gateway/upstream_http.py:head_done")),
    ("the client's head (headers copied, prepared)",
     ("gateway/client_response.py:prepare_stream", "gateway/upstream.py:response_headers")),
    ("prompt estimate", ("gateway/tokens.py:estimate_prompt_tokens",)),
    ("team limits: admit, usage headers, settle",
     ("gateway/admission.py:_admit_team", "gateway/admission.py:settle")),
    ("the tally at the end (final_tally, _record, _record_stream_end)",
     ("gateway/ledger.py:final_tally", "gateway/ledger.py:_record",
      "gateway/ledger.py:_record_stream_end")),
    ("outcome and log fields", ("gateway/outcome.py:conclude", "gateway/context.py:log_fields")),
    ("timers' callbacks: meter batch (2 ms), log flush (50 ms), idle sweep",
     ("gateway/meter_batch.py:flush@timer", "gateway/logs.py:_on_timer",
      "gateway/upstream_http.py:_sweep")),
)  # fmt: skip


def _matches(key: Key, spec: str) -> bool:
    """`path/file.py:function` against a profile key; `@timer`: only calls from the loop."""
    where, _, function = spec.partition(":")
    function = function.removesuffix("@timer")
    return key[2] == function and key[0].endswith("/" + where)


def step_calls(stats: pstats.Stats, roots: tuple[str, ...]) -> float:
    """Calls made in the subtrees of the functions `roots` names (the roots included).

    A profile keeps call counts per caller and callee, not per path, so a callee's calls are
    shared out as gprof does: a function called N times from inside the step, M times in
    all, brings N/M of its own callees' calls along. A root marked `@timer` counts only its
    calls that came from no Python caller: the event loop ran it."""
    raw: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    callees: dict[Key, list[tuple[Key, int]]] = {}
    for key, (_, _, _, _, callers) in raw.items():
        for caller, counts in callers.items():
            callees.setdefault(caller, []).append((key, counts[1]))
    flow: dict[Key, float] = {}
    for key, (_, calls, _, _, callers) in raw.items():
        for spec in roots:
            if _matches(key, spec):
                timer_only = "@timer" in spec
                flow[key] = calls - sum(c[1] for c in callers.values()) if timer_only else calls
    order = _reverse_postorder(list(flow), callees)
    position = {key: i for i, key in enumerate(order)}
    top = set(flow)
    for key in order:
        share = min(1.0, flow.get(key, 0.0) / max(1, raw[key][1]))
        for callee, count in callees.get(key, []):
            if callee not in top and position[callee] > position[key]:  # no recursion back up
                flow[callee] = flow.get(callee, 0.0) + count * share
    return sum(flow.values())


def _reverse_postorder(roots: list[Key], callees: dict[Key, list[tuple[Key, int]]]) -> list[Key]:
    """The functions reachable from `roots`, callers before their callees."""
    done: list[Key] = []
    seen: set[Key] = set()
    for root in roots:
        stack = [(root, iter(callees.get(root, [])))]
        seen.add(root)
        while stack:
            key, children = stack[-1]
            for child, _ in children:
                if child not in seen:
                    seen.add(child)
                    stack.append((child, iter(callees.get(child, []))))
                    break
            else:
                stack.pop()
                done.append(key)
    return done[::-1]


def render_steps(stats: pstats.Stats, requests: int) -> str:
    """Calls per request in each named step."""
    lines = [f"{'calls per request':>18}  in the step (its whole subtree)"]
    for title, roots in STEPS:
        lines.append(f"{step_calls(stats, roots) / requests:18.1f}  {title}")
    return "\n".join(lines) + "\n"


Profiled = tuple[str, pstats.Stats, LoadResult, list[int]]


async def profile_load(spec: LoadSpec) -> tuple[cProfile.Profile, LoadResult, list[int]]:
    """Run the load generator; profile this process between its window's markers. Also: the
    garbage collector's collections per generation in the window."""
    profiler = cProfile.Profile()
    collections = [0, 0, 0]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", msgspec.json.encode(spec).decode(),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    decoder = msgspec.json.Decoder(Marker | LoadResult)
    result: LoadResult | None = None
    async for line in proc.stdout:
        message = decoder.decode(line)
        if isinstance(message, LoadResult):
            result = message
        elif message.name == "window_start":
            collections = [-g["collections"] for g in gc.get_stats()]
            profiler.enable()
        elif message.name == "window_end":
            profiler.disable()
            collections = [
                n + g["collections"] for n, g in zip(collections, gc.get_stats(), strict=True)
            ]
    await proc.wait()
    assert result is not None, "the load generator ended without a result"
    return profiler, result, collections


async def profile_gateway(
    settings_doc: dict[str, Any], loads: Iterable[tuple[str, LoadSpec]], dump: Path | None
) -> list[Profiled]:
    """Serve the gateway here and profile each load against it."""
    from gateway.config import parse_settings
    from gateway.server import bound_port, settle_heap, start_server

    settings = parse_settings(json.dumps(settings_doc), os.environ)
    runner = await start_server(settings)
    settle_heap()
    port = bound_port(runner)
    done = []
    try:
        for number, (title, spec) in enumerate(loads, 1):
            profiler, result, collections = await profile_load(
                msgspec.structs.replace(spec, port=port)
            )
            stats = pstats.Stats(profiler)
            if dump is not None:
                stats.dump_stats(dump.with_suffix(f".{number}.{spec.call}.prof"))
            done.append((title, stats, result, collections))
    finally:
        await runner.cleanup()
    return done


def main(argv: list[str] | None = None) -> int:
    """Command line; prints the report on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--team", action="store_true", help="one team with a key and limits")
    parser.add_argument("--no-accounting", action="store_true")
    parser.add_argument("--min", type=float, default=0.5, help="calls per request to list")
    parser.add_argument("--dump", type=Path, help="also write pstats files next to this path")
    args = parser.parse_args(argv)
    report = os.fdopen(os.dup(1), "w")
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp, upstream(None) as (_, port):
        log = os.open(Path(tmp) / "gateway.log", os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1)  # the gateway's log lines (structlog writes to stdout)
        from gateway.logs import configure_logging
        from gateway.server import run_loop

        configure_logging("json")
        env = Env(Path(tmp), port, None, 4096)
        gateway = Gateway(env, "gateway", None, accounting=not args.no_accounting, team=args.team)
        doc = gateway.config()
        doc["listen"] = {"host": "127.0.0.1", "port": 0}
        common = {"port": 0, "delay_ms": 0, "requests": args.requests, "warmup_requests": 100}
        loads = [
            (f"(i) {args.requests} sequential keep-alive streams of 3 events",
             LoadSpec(mode="sequential", events=3, api_key=gateway.api_key, **common)),
            (f"(ii) {args.requests} sequential non-streaming chat calls",
             LoadSpec(mode="sequential", events=3, call="chat", api_key=gateway.api_key,
                      **common)),
            (f"(iii) {args.requests} sequential streams of 3 events, a new connection each",
             LoadSpec(mode="sequential", events=3, api_key=gateway.api_key,
                      new_connection=True, **common)),
        ]  # fmt: skip
        results: list[Profiled] = []

        async def run() -> None:
            results.extend(await profile_gateway(doc, loads, args.dump))

        run_loop(run())
    variant = f"accounting {'off' if args.no_accounting else 'on'}, team {args.team}"
    print(f"gateway: {variant}; builtins counted in their callers' layers", file=report)
    for title, stats, result, collections in results:
        if result.errors or result.requests != args.requests:
            print(f"!! {result.requests} exact answers, errors {result.errors}", file=report)
        print(render(title, group(stats), args.requests, args.min), file=report)
        print(render_steps(stats, args.requests), file=report)
        print(f"garbage collections in the window, by generation: {collections}\n", file=report)
    report.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
