"""The bench load generator: many concurrent streams, each checked byte for byte.

`python -m bench.loadgen '<LoadSpec as JSON>'` runs one load and prints JSON lines: markers
(`Marker`) as the run passes its milestones, so the orchestrator can read the proxy's CPU and
memory at the right moments, then one `LoadResult`. Two shapes of load:

- `loop`: `concurrency` users, each running stream after stream on a keep-alive connection
  (closed loop), starts staggered so streams do not move in lockstep; a warm-up, then a
  measured window. Used for paced CPU, capacity and latency.
- `slow`: `n` streams opened at `ramp_per_s`, one connection each, all held open at once;
  used to find how many concurrent streams a proxy carries and at what memory.
- `sequential`: one client, one request at a time, `warmup_requests` then `requests`
  measured, on one keep-alive connection or on a new connection each (`new_connection`, the
  time then counts from the connect); used for the first byte at light load.

`call` picks what each request is: a stream (`bench.sse`), or a short non-streaming call
(`chat`, `embeddings`: one JSON answer each, see `bench.calls`), then counted as one event.

Each connection is a plain `asyncio.Protocol`: the per-read work is a de-chunk, one memory
compare against the expected body and an event count, so the load side stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, cast

import msgspec

from bench import calls, runtime
from bench.http1 import HEAD_END, MAX_HEAD, BodyDecoder, FramingError, body_decoder, parse_head
from bench.sse import PATHS, Api, ExpectedBody, StreamSpec, expected_body, request_body


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One load run, as the orchestrator asks for it."""

    mode: Literal["loop", "slow", "sequential"]
    port: int
    events: int
    delay_ms: float
    host: str = "127.0.0.1"
    api: Api = "chat"
    concurrency: int = 1  # loop mode
    warmup_s: float = 1.0  # loop mode
    window_s: float = 2.0  # loop mode
    n: int = 0  # slow mode
    ramp_per_s: float = 2000.0  # slow mode
    grace_s: float = 10.0  # slow mode: how long past its due end a stream may take
    call: Literal["stream", "chat", "embeddings"] = "stream"
    call_size: int = 0  # chat: words in the answer; embeddings: floats (0: bench.calls' default)
    requests: int = 0  # sequential mode: measured requests
    warmup_requests: int = 50  # sequential mode
    new_connection: bool = False  # sequential mode: a new connection for every request
    api_key: str | None = None  # sent as `Authorization: Bearer` (a gateway with a team)


class Marker(msgspec.Struct, frozen=True, tag=True):
    """A milestone: `window_start`/`window_end` (loop), `all_sent`/`all_open` (slow)."""

    name: str
    t: float


class Percentiles(msgspec.Struct, frozen=True):
    """p50/p99 of a sample in milliseconds (None when there is no sample)."""

    p50: float | None
    p99: float | None
    samples: int


class LoadResult(msgspec.Struct, frozen=True, tag=True):
    """What one load run measured (loop: inside the window; slow: over the whole run)."""

    mode: str
    events: int  # SSE events received in the window (loop) or in all (slow)
    window_s: float
    streams_started: int
    streams_exact: int  # completed with exactly the expected bytes
    errors: dict[str, int]
    ttft_ms: Percentiles
    total_ms: Percentiles
    unfinished: int  # streams still running when the run stopped
    requests: int = 0  # answers completed byte-exact inside the window (loop, sequential)

    @classmethod
    def empty(cls) -> LoadResult:
        """A placeholder until the real result arrives."""
        nothing = Percentiles(None, None, 0)
        return cls("", 0, 0.0, 0, 0, {}, nothing, nothing, 0)


@dataclass(slots=True)
class Outcome:
    """How one stream went."""

    started: float
    ttft: float | None = None
    total: float | None = None
    error: str | None = None


@dataclass(slots=True)
class Tally:
    """Counters every connection of a run adds to."""

    events: int = 0
    started: int = 0
    first_bytes: int = 0
    never_opened: int = 0
    completed: int = 0  # answers that ended byte-exact
    outcomes: list[Outcome] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    expected: int = 0  # slow mode: streams that must open before `all_open` is set
    all_open: asyncio.Event = field(default_factory=asyncio.Event)

    def opened(self) -> None:
        """A stream received its first body byte."""
        self.first_bytes += 1
        self._maybe_all_open()

    def _maybe_all_open(self) -> None:
        if self.expected and self.first_bytes + self.never_opened >= self.expected:
            self.all_open.set()

    def record(self, outcome: Outcome) -> None:
        """Keep a finished stream; errors are counted by kind."""
        self.outcomes.append(outcome)
        self.completed += outcome.error is None
        if outcome.error is not None:
            self.fail(outcome.error, opened=outcome.ttft is not None)

    def fail(self, kind: str, *, opened: bool = False) -> None:
        """Count an error; `opened` says whether the stream had received its first byte."""
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.never_opened += not opened
        self._maybe_all_open()


class StreamClient(asyncio.Protocol):
    """One client connection carrying one stream at a time.

    `stream()` sends a request and returns a future that resolves to the stream's `Outcome`
    when the body ends, the bytes stop matching, or the connection drops.
    """

    def __init__(self, exchange: Exchange, tally: Tally) -> None:
        self._expected = exchange.expected
        self._view = memoryview(self._expected.body)
        self._request = exchange.request
        self._tally = tally
        self._transport: asyncio.Transport | None = None
        self._outcome: Outcome | None = None
        self._future: asyncio.Future[Outcome] | None = None
        self._head_buf = b""
        self._body: BodyDecoder | None = None
        self._offset = 0
        self._events = 0
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.reusable = False
        self._end("connection_lost")

    def close(self) -> None:
        """Drop the connection (a stream in flight is abandoned, not counted as an error)."""
        self._outcome = self._future = None
        if self._transport is not None:
            self._transport.abort()

    def stream(self, started: float | None = None) -> asyncio.Future[Outcome]:
        """Send one request; the future resolves when its response is over. Its times count
        from `started` (a `perf_counter` reading, such as before the connect), else from now."""
        assert self._transport is not None
        assert self._future is None
        self._future = asyncio.get_running_loop().create_future()
        self._outcome = Outcome(time.perf_counter() if started is None else started)
        self._head_buf, self._body, self._offset, self._events = b"", None, 0, 0
        self.reusable = False
        self._tally.started += 1
        self._transport.write(self._request)
        return self._future

    def data_received(self, data: bytes) -> None:
        if self._outcome is None:
            self._end("unexpected_bytes")
            return
        try:
            if self._body is None:
                data = self._read_head(data)
                if self._body is None:
                    return
            self._check(self._body.feed(data))
        except FramingError:
            self._end("framing")

    def _read_head(self, data: bytes) -> bytes:
        """Collect the status line and headers; return the body bytes that followed them."""
        buf = self._head_buf + data
        end = buf.find(HEAD_END)
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise FramingError("response head too large")
            self._head_buf = buf
            return b""
        head = parse_head(buf[:end])
        if head.start[1] != "200":
            self._end(f"status_{head.start[1]}")
            return b""
        self._body = body_decoder(head)
        self.reusable = head.keep_alive()
        return buf[end + len(HEAD_END) :]

    def _check(self, pieces: list[bytes]) -> None:
        """Compare each piece with the expected bytes at its offset; count completed events."""
        outcome = self._outcome
        assert outcome is not None
        assert self._body is not None
        for piece in pieces:
            if not piece:
                continue
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - outcome.started
                self._tally.opened()
            end = self._offset + len(piece)
            if self._view[self._offset : end] != piece:
                self._end("mismatch")
                return
            self._offset = end
        events = self._expected.events_before(self._offset)
        self._tally.events += events - self._events
        self._events = events
        if self._body.done:
            exact = self._offset == len(self._expected.body) and not self._body.tail
            self._end(None if exact else "short_body")

    def _end(self, error: str | None) -> None:
        """Resolve the current stream once; a failed stream also ends its connection."""
        outcome, future = self._outcome, self._future
        self._outcome = self._future = None
        if outcome is None:
            return
        if error is None:
            outcome.total = time.perf_counter() - outcome.started
        else:
            outcome.error = error
            self.reusable = False
            if self._transport is not None:
                self._transport.abort()
        self._tally.record(outcome)
        if future is not None and not future.done():
            future.set_result(outcome)


def percentiles(values: list[float]) -> Percentiles:
    """Nearest-rank p50 and p99 of seconds, reported in milliseconds."""
    if not values:
        return Percentiles(None, None, 0)
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000, 3)

    return Percentiles(rank(0.50), rank(0.99), len(ordered))


@dataclass(frozen=True, slots=True)
class Exchange:
    """What a connection sends for each request, and the body it must get back."""

    request: bytes
    expected: ExpectedBody


@functools.cache
def exchange(spec: LoadSpec) -> Exchange:
    """The run's request, built once: a stream's, or a short call's (see `bench.calls`)."""
    if spec.call == "stream":
        stream = StreamSpec(spec.events, spec.delay_ms, spec.api)
        path, body = PATHS[spec.api], request_body(stream)
        expected = expected_body(spec.events, spec.api)
    else:
        call = calls.CallSpec(spec.call, spec.call_size or calls.DEFAULT_SIZE[spec.call])
        answer = calls.answer_body(call)  # one answer is one event
        path, body = call.path, calls.request_body(call)
        expected = ExpectedBody(answer, (len(answer),))
    auth = f"Authorization: Bearer {spec.api_key}\r\n" if spec.api_key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return Exchange(head.encode() + body, expected)


async def connect(spec: LoadSpec, tally: Tally) -> StreamClient:
    """Open one connection to the target."""
    made = exchange(spec)
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: StreamClient(made, tally), spec.host, spec.port
    )
    return client


async def closed_loop_user(spec: LoadSpec, tally: Tally, delay_s: float) -> None:
    """Run streams back to back, reusing the connection while the target keeps it alive."""
    await asyncio.sleep(delay_s)
    client: StreamClient | None = None
    try:
        while True:
            if client is None or not client.reusable:
                if client is not None:
                    client.close()
                client = await connect(spec, tally)
            await client.stream()
    except OSError:
        tally.fail("connect_failed")
    finally:
        if client is not None:
            client.close()


def stream_seconds(spec: LoadSpec) -> float:
    """How long one stream lasts at the upstream's pace."""
    return (spec.events - 1) * spec.delay_ms / 1000


async def run_loop(spec: LoadSpec) -> LoadResult:
    """Closed loop: warm up, then count events and keep stream timings inside one window."""
    tally = Tally()
    stagger = min(stream_seconds(spec), spec.warmup_s)
    users = [
        asyncio.create_task(closed_loop_user(spec, tally, stagger * i / spec.concurrency))
        for i in range(spec.concurrency)
    ]
    await asyncio.sleep(spec.warmup_s)
    start, events0, completed0 = time.perf_counter(), tally.events, tally.completed
    runtime.emit(Marker("window_start", start))
    await asyncio.sleep(spec.window_s)
    end, events = time.perf_counter(), tally.events - events0
    completed = tally.completed - completed0
    runtime.emit(Marker("window_end", end))
    for user in users:
        user.cancel()
    await asyncio.gather(*users, return_exceptions=True)
    inside = [o for o in tally.outcomes if o.started >= start and o.started + (o.total or 0) <= end]
    unfinished = tally.started - len(tally.outcomes)
    return _result(spec, tally, inside, events, end - start, unfinished, completed)


async def slow_stream(spec: LoadSpec, tally: Tally, start_at: float) -> None:
    """Open one connection at its slot in the ramp and carry one stream on it."""
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    try:
        client = await connect(spec, tally)
    except OSError:
        tally.fail("connect_failed")
        return
    try:
        await client.stream()
    finally:
        client.close()


async def run_slow(spec: LoadSpec) -> LoadResult:
    """Open `n` streams at the ramp rate, hold them all, and wait for every one to end."""
    tally = Tally(expected=spec.n)
    t0 = time.perf_counter()
    ramp_s = spec.n / spec.ramp_per_s
    tasks = [
        asyncio.create_task(slow_stream(spec, tally, t0 + i / spec.ramp_per_s))
        for i in range(spec.n)
    ]
    deadline = t0 + ramp_s + stream_seconds(spec) + spec.grace_s
    await asyncio.sleep(ramp_s)
    runtime.emit(Marker("all_sent", time.perf_counter()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.all_open.wait(), max(0.0, deadline - time.perf_counter()))
    runtime.emit(Marker("all_open", time.perf_counter()))
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for _ in pending:
        tally.fail("timeout", opened=True)
    elapsed = time.perf_counter() - t0
    return _result(spec, tally, tally.outcomes, tally.events, elapsed, unfinished=len(pending))


def _result(
    spec: LoadSpec,
    tally: Tally,
    outcomes: list[Outcome],
    events: int,
    window_s: float,
    unfinished: int,
    requests: int = 0,
) -> LoadResult:
    """Summarise the streams of interest."""
    exact = [o for o in outcomes if o.error is None]
    return LoadResult(
        mode=spec.mode,
        events=events,
        window_s=round(window_s, 4),
        streams_started=tally.started,
        streams_exact=len(exact),
        errors=dict(tally.errors),
        ttft_ms=percentiles([o.ttft for o in outcomes if o.ttft is not None]),
        total_ms=percentiles([o.total for o in exact if o.total is not None]),
        unfinished=unfinished,
        requests=requests,
    )


async def run_sequential(spec: LoadSpec) -> LoadResult:
    """One request at a time: `warmup_requests`, then `requests` inside the window.

    With `new_connection`, every request opens its own connection (closed once the answer is
    whole) and its times count from before the connect: what a client without keep-alive
    waits for.
    """
    tally = Tally()
    window: list[tuple[float, int, int]] = []  # (start, events, outcomes) once it opened
    client: StreamClient | None = None
    try:
        for i in range(spec.warmup_requests + spec.requests):
            if i == spec.warmup_requests:
                window.append(_open_window(tally))
            began = time.perf_counter()
            if spec.new_connection or client is None or not client.reusable:
                if client is not None:
                    client.close()
                client = await connect(spec, tally)
            await client.stream(began if spec.new_connection else None)
    except OSError:
        tally.fail("connect_failed")
    finally:
        if client is not None:
            client.close()
    start, events0, first = window[0] if window else _open_window(tally)
    end = time.perf_counter()
    runtime.emit(Marker("window_end", end))
    inside = tally.outcomes[first:]
    completed = sum(o.error is None for o in inside)
    return _result(spec, tally, inside, tally.events - events0, end - start, 0, completed)


def _open_window(tally: Tally) -> tuple[float, int, int]:
    """Announce the window's start; what the tally holds then."""
    start = time.perf_counter()
    runtime.emit(Marker("window_start", start))
    return start, tally.events, len(tally.outcomes)


async def run(spec: LoadSpec) -> LoadResult:
    """Dispatch on the mode."""
    if spec.mode == "sequential":
        return await run_sequential(spec)
    return await (run_loop(spec) if spec.mode == "loop" else run_slow(spec))


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m bench.loadgen '<LoadSpec JSON>'`; prints JSON lines."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.loadgen '<LoadSpec as JSON>'")
    spec = msgspec.json.decode(args[0], type=LoadSpec)
    runtime.raise_nofile_limit()
    runtime.emit(runtime.run(run(spec)))


if __name__ == "__main__":
    main()
